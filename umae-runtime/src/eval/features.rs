//! Frozen-encoder features: extracted once per (checkpoint, pooling, split, image count) and
//! cached beside the run, so probes with other hyperparameters do not re-encode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use umae_api::Device;

use crate::checkpoint::source::Loaded;
use crate::checkpoint::{self, HostTensor};
use crate::data::{self, Dataset, Loader, Pipeline, Split};
use crate::model::{images_tensor, Model};
use crate::progress;
use umae_api::recipe::DataFormat;

/// Which feature of the encoder output to use: the recipe's `eval.pool` type.
pub use umae_api::recipe::FeaturePool as Pool;

/// L2-normalise each row in place.
pub fn normalize_rows(rows: &mut [f32], d: usize) {
    for r in rows.chunks_exact_mut(d) {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    }
}

/// `n` feature rows of width `dim` with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub data: Vec<f32>,
    pub labels: Vec<i64>,
    pub n: usize,
    pub dim: usize,
}

impl Features {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The first `k` rows.
    pub fn head(&self, k: usize) -> Features {
        let k = k.min(self.n);
        Features {
            data: self.data[..k * self.dim].to_vec(),
            labels: self.labels[..k].to_vec(),
            n: k,
            dim: self.dim,
        }
    }
}

/// Encode the images `indices` of a pipeline (eval transform, no masking).
pub fn encode(
    model: &Model,
    pipeline: &Pipeline,
    indices: Vec<usize>,
    pool: Pool,
    batch: usize,
    device: &Device,
    what: &str,
) -> Result<Features, String> {
    let n = indices.len();
    let mut data = Vec::new();
    let mut labels = Vec::with_capacity(n);
    let mut dim = 0;
    let bar = progress::bar(n as u64, what);
    for b in Loader::start(pipeline, indices, batch, false, 0, 2) {
        let b = b?;
        let x = images_tensor(b.images, b.n, &model.geometry, device);
        let f = pool.apply(model.encoder.forward(x, None))?;
        dim = f.dims()[1];
        data.extend(
            f.detach()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))?,
        );
        labels.extend(b.labels);
        progress::tick(&bar, b.n as u64);
    }
    progress::finish(bar);
    Ok(Features {
        data,
        labels,
        n,
        dim,
    })
}

/// Train and test features of a loaded model, from the cache when it holds them.
pub struct FeatureSet {
    pub train: Features,
    pub test: Features,
    pub classes: usize,
    /// Whether both came from the cache.
    pub cached: bool,
}

/// The cache folder of a loaded model (`<run>/features`), if it has a run.
pub fn cache_dir(loaded: &Loaded) -> Option<PathBuf> {
    loaded.run_dir.as_ref().map(|r| r.join("features"))
}

fn cache_key(loaded: &Loaded, split: Split, pool: Pool, n: usize) -> String {
    let d = &loaded.recipe.data;
    format!(
        "checkpoint={} step={} pool={} split={:?} n={n} format={:?} root={:?} size={} channels={} mean={:?} std={:?}",
        loaded
            .checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        loaded.step,
        pool.name(),
        split,
        d.format,
        d.root,
        d.image_size,
        d.channels,
        d.mean,
        d.std
    )
}

fn read_cached(path: &Path, key: &str) -> Option<Features> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    if meta.metadata().as_ref()?.get("key")? != key {
        return None;
    }
    let t = checkpoint::read_safetensors(path).ok()?;
    let f = t.get("features")?;
    let l = t.get("labels")?;
    let (n, dim) = (*f.shape.first()?, *f.shape.get(1)?);
    (l.data.len() == n).then(|| Features {
        data: f.data.clone(),
        labels: l.data.iter().map(|v| *v as i64).collect(),
        n,
        dim,
    })
}

fn write_cached(path: &Path, key: &str, f: &Features) -> Result<(), String> {
    let mut t = HashMap::new();
    t.insert(
        "features".to_string(),
        HostTensor {
            shape: vec![f.n, f.dim],
            data: f.data.clone(),
        },
    );
    t.insert(
        "labels".to_string(),
        HostTensor {
            shape: vec![f.n],
            data: f.labels.iter().map(|v| *v as f32).collect(),
        },
    );
    let tmp = path.with_extension("tmp");
    checkpoint::write_safetensors_meta(&tmp, &t, &[("key", key)])?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

/// Features of `split` (at most `limit` images, default: the recipe's limits), cached when the
/// model has a run directory and `use_cache` is set.
pub fn features(
    loaded: &Loaded,
    split: Split,
    pool: Pool,
    limit: Option<usize>,
    batch: usize,
    device: &Device,
    use_cache: bool,
) -> crate::Result<(Features, bool)> {
    let r = &loaded.recipe;
    let set: Arc<dyn Dataset> = data::open(&r.data, split, r.seed)?;
    let n = limit.unwrap_or(usize::MAX).min(set.len());
    let key = cache_key(loaded, split, pool, n);
    let file = cache_dir(loaded).filter(|_| use_cache).map(|d| {
        let ck = loaded.checkpoint_name();
        let split_name = if split == Split::Train {
            "train"
        } else {
            "test"
        };
        (
            d.clone(),
            d.join(format!("{ck}-{}-{split_name}-{n}.safetensors", pool.name())),
        )
    });
    if let Some((_, path)) = &file {
        if let Some(f) = read_cached(path, &key) {
            return Ok((f, true));
        }
    }
    let pipe = Pipeline::new(set, &r.data, false, r.seed);
    let what = if split == Split::Train {
        "encode train"
    } else {
        "encode test"
    };
    let f = encode(
        &loaded.model,
        &pipe,
        (0..n).collect(),
        pool,
        batch,
        device,
        what,
    )?;
    if let Some((dir, path)) = &file {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_cached(path, &key, &f)?;
    }
    Ok((f, false))
}

/// Train and test features with the number of classes.
pub fn feature_set(
    loaded: &Loaded,
    pool: Pool,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
    batch: usize,
    device: &Device,
    use_cache: bool,
) -> crate::Result<FeatureSet> {
    let d = &loaded.recipe.data;
    if matches!(d.format, DataFormat::Images | DataFormat::Shards)
        && !data::open(d, Split::Train, loaded.recipe.seed)?.labeled()
    {
        return Err(crate::Error::data(format!(
            "{}: the data has no labels, and the linear probe and kNN measure class accuracy: evaluate on labeled data (format: ImageFolder, or shards with KEY.cls members)",
            d.root
        )));
    }
    let (train, c1) = features(
        loaded,
        Split::Train,
        pool,
        train_limit,
        batch,
        device,
        use_cache,
    )?;
    let (test, c2) = features(
        loaded,
        Split::Eval,
        pool,
        test_limit,
        batch,
        device,
        use_cache,
    )?;
    Ok(FeatureSet {
        train,
        test,
        classes: loaded.recipe.data.num_classes,
        cached: c1 && c2,
    })
}
