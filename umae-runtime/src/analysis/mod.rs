//! The paper's analyses on a trained (or fresh) model: effective rank and singular spectrum
//! along training, the mask-ratio study, t-SNE of the features, and a reconstruction view.

pub mod maskratio;
pub mod plot;
pub mod rank;
pub mod tsne;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use umae_api::{Device, PixelTarget, Rng};

use crate::checkpoint;
use crate::checkpoint::source::{self, Loaded};
use crate::data::{self, Pipeline, Split};
use crate::eval::features::{self, Pool};
use crate::model::images_tensor;
use maskratio::{MaskRatioStudy, PatchDistance};
use tsne::TsneSpec;

/// Effective rank and spectrum of one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankPoint {
    /// `epoch-NNNN`, or `init` for a recipe's initial weights.
    pub checkpoint: String,
    pub epoch: usize,
    pub step: u64,
    pub samples: usize,
    pub dim: usize,
    pub erank: f64,
    /// Singular values of the L2-normalised features, descending.
    pub spectrum: Vec<f64>,
}

/// Spectrum and effective rank of the first `samples` test images' features.
pub fn rank_of(
    loaded: &Loaded,
    samples: usize,
    pool: Pool,
    device: &Device,
) -> crate::Result<RankPoint> {
    let (f, _) = features::features(loaded, Split::Eval, pool, Some(samples), 256, device, false)?;
    if f.n < 2 {
        return Err(crate::Error::data(format!(
            "the test split has {} image(s): the effective rank needs at least 2",
            f.n
        )));
    }
    let mut rows = f.data.clone();
    rank::normalize_rows(&mut rows, f.dim);
    let spectrum = rank::singular_values(&rows, f.n, f.dim);
    let epoch = match &loaded.checkpoint {
        Some(c) => checkpoint::read_state(c)?.epoch,
        None => 0,
    };
    Ok(RankPoint {
        checkpoint: loaded.checkpoint_name(),
        epoch,
        step: loaded.step,
        samples: f.n,
        dim: f.dim,
        erank: rank::erank_of_spectrum(&spectrum),
        spectrum,
    })
}

#[allow(clippy::too_many_arguments)]
/// [`rank_of`] for every checkpoint of a run (or the one named / the recipe's initial weights).
pub fn rank_series(
    source_path: &Path,
    checkpoint_name: Option<&str>,
    all: bool,
    sets: &[String],
    samples: usize,
    pool: Pool,
    device: &Device,
    mut each: impl FnMut(&RankPoint),
) -> crate::Result<(Option<PathBuf>, Vec<RankPoint>)> {
    let (recipe, run_dir, ckpt) = source::resolve(source_path, checkpoint_name, sets)?;
    let ckpts: Vec<Option<PathBuf>> = match (&run_dir, all && checkpoint_name.is_none()) {
        (Some(r), true) => source::checkpoints(r)
            .map_err(crate::Error::Failed)?
            .into_iter()
            .map(Some)
            .collect(),
        _ => vec![ckpt],
    };
    let mut out = Vec::new();
    for c in ckpts {
        let loaded = source::load_resolved(recipe.clone(), run_dir.clone(), c, device)?;
        let p = rank_of(&loaded, samples, pool, device)?;
        each(&p);
        out.push(p);
    }
    Ok((run_dir, out))
}

/// Folder for a source's analysis outputs: `<run>/analysis`, or `runs/<recipe name>/analysis`.
pub fn analysis_dir(run_dir: Option<&Path>, recipe_name: &str) -> PathBuf {
    match run_dir {
        Some(r) => r.join("analysis"),
        None => PathBuf::from("runs").join(recipe_name).join("analysis"),
    }
}

/// Write JSON atomically, creating the folder.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    checkpoint::write_file_atomic(path, &text)
}

/// Settings of the mask-ratio study.
#[derive(Debug, Clone)]
pub struct MaskRatioSpec {
    pub ratios: Vec<f64>,
    pub classes: usize,
    pub per_class: usize,
    pub draws: usize,
    pub distance: PatchDistance,
    pub seed: u64,
}

/// Run the mask-ratio study on the test split of a recipe's dataset, with its patch grid.
pub fn mask_ratio(loaded: &Loaded, spec: &MaskRatioSpec) -> crate::Result<MaskRatioStudy> {
    let r = &loaded.recipe;
    let set = data::open(&r.data, Split::Eval, r.seed)?;
    let g = loaded.model.geometry;
    // The first `per_class` test images of each of the first `classes` classes present.
    let mut picked: Vec<(usize, usize)> = Vec::new();
    let mut counts = std::collections::BTreeMap::<usize, usize>::new();
    for i in 0..set.len() {
        let label = set.label(i)?;
        let known = counts.len();
        let c = counts.entry(label).or_insert(0);
        if *c == 0 && known >= spec.classes {
            counts.remove(&label);
            continue;
        }
        if *c < spec.per_class {
            *c += 1;
            picked.push((i, label));
        }
        if counts.len() >= spec.classes && counts.values().all(|&v| v >= spec.per_class) {
            break;
        }
    }
    let pipe = Pipeline::new(set, &r.data, false, r.seed);
    let idx: Vec<usize> = picked.iter().map(|p| p.0).collect();
    let batch = pipe.batch(&idx, 0)?;
    let per = g.channels * g.height * g.width;
    let images: Vec<Vec<f32>> = batch
        .images
        .chunks_exact(per)
        .map(|im| patches_hwc(im, &g))
        .collect();
    let labels: Vec<usize> = picked.iter().map(|p| p.1).collect();
    Ok(maskratio::study(
        &images,
        &labels,
        g.num_patches(),
        &spec.ratios,
        spec.draws,
        spec.distance,
        spec.seed,
    )?)
}

/// One `[C, H, W]` image -> `N x (p*p*C)` patch values in (row, column, channel) order.
pub fn patches_hwc(img: &[f32], g: &umae_api::PatchGeometry) -> Vec<f32> {
    let (gh, gw) = g.grid();
    let (p, c, h, w) = (g.patch, g.channels, g.height, g.width);
    let mut out = Vec::with_capacity(img.len());
    for py in 0..gh {
        for px in 0..gw {
            for y in 0..p {
                for x in 0..p {
                    for ch in 0..c {
                        out.push(img[ch * h * w + (py * p + y) * w + px * p + x]);
                    }
                }
            }
        }
    }
    out
}

/// Inverse of [`patches_hwc`].
pub fn unpatch_hwc(patches: &[f32], g: &umae_api::PatchGeometry) -> Vec<f32> {
    let (gh, gw) = g.grid();
    let (p, c, h, w) = (g.patch, g.channels, g.height, g.width);
    let mut out = vec![0.0; c * h * w];
    let mut k = 0;
    for py in 0..gh {
        for px in 0..gw {
            for y in 0..p {
                for x in 0..p {
                    for ch in 0..c {
                        out[ch * h * w + (py * p + y) * w + px * p + x] = patches[k];
                        k += 1;
                    }
                }
            }
        }
    }
    out
}

/// t-SNE points of a model's features: `(x, y, label)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TsneResult {
    pub model: String,
    pub points: Vec<(f32, f32, usize)>,
    pub perplexity: f64,
}

pub fn tsne_of(
    loaded: &Loaded,
    samples: usize,
    pool: Pool,
    spec: &TsneSpec,
    device: &Device,
) -> crate::Result<TsneResult> {
    let (f, _) = features::features(loaded, Split::Eval, pool, Some(samples), 256, device, false)?;
    let mut rows = f.data.clone();
    rank::normalize_rows(&mut rows, f.dim);
    let y = tsne::tsne(&rows, f.n, f.dim, spec)?;
    Ok(TsneResult {
        model: loaded.label.clone(),
        points: (0..f.n)
            .map(|i| (y[2 * i], y[2 * i + 1], f.labels[i] as usize))
            .collect(),
        perplexity: spec.perplexity,
    })
}

/// Load the decoder weights of the loaded checkpoint as well (the reconstruction view).
pub fn load_decoder(loaded: &mut Loaded, device: &Device) -> Result<(), String> {
    let Some(dir) = &loaded.checkpoint else {
        return Ok(());
    };
    let file = dir.join("model.safetensors");
    let weights = checkpoint::read_safetensors(&file)?;
    checkpoint::load_params(
        &mut [("decoder", loaded.model.decoder.as_mut())],
        &weights,
        device,
        &file,
    )
}

/// Original, masked and reconstructed views of the first `n` test images, as a PNG grid.
/// Needs a target that predicts pixels (prediction width = patch size).
pub fn reconstruction_figure(
    loaded: &Loaded,
    n: usize,
    seed: u64,
    path: &Path,
    device: &Device,
) -> crate::Result<()> {
    let m = &loaded.model;
    let g = m.geometry;
    let pd = g.patch_dim();
    let Some(pixels) = m
        .target
        .predicts_pixels()
        .filter(|_| m.target.pred_dim() == pd)
    else {
        return Err(crate::Error::recipe(format!(
            "target `{}` predicts {} values per patch, not the pixels of a patch: the reconstruction view needs a pixel target such as `pixels`",
            m.names[3],
            m.target.pred_dim()
        )));
    };
    let r = &loaded.recipe;
    let set = data::open(&r.data, Split::Eval, r.seed)?;
    let n = n.min(set.len());
    let pipe = Pipeline::new(set, &r.data, false, r.seed);
    let batch = pipe.batch(&(0..n).collect::<Vec<_>>(), 0)?;
    let plan = m.masker.sample(&g, n, &mut Rng::derive(seed, &[0x5EE]));
    let mask = plan.to_device(device);
    let x = images_tensor(batch.images.clone(), n, &g, device);
    let pred = m.decoder.forward(&m.encoder.forward(x, Some(&mask)), &mask);
    let pred: Vec<f32> = pred
        .detach()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("{e:?}"))?;
    let norm_pix = pixels == PixelTarget::PerPatchNormalized;
    let (mean, std) = data::normalization(&r.data);
    let per = g.channels * g.height * g.width;
    let to_unit = |img: &[f32]| -> Vec<f32> {
        img.iter()
            .enumerate()
            .map(|(k, v)| v * std[k / (g.height * g.width)] + mean[k / (g.height * g.width)])
            .collect()
    };
    let hidden = plan.hidden();
    let np = g.num_patches();
    let mut rows = vec![Vec::new(), Vec::new(), Vec::new()];
    for i in 0..n {
        let orig = &batch.images[i * per..(i + 1) * per];
        let patches = patches_hwc(orig, &g);
        let mut masked = patches.clone();
        let mut recon = patches.clone();
        for p in 0..np {
            if !hidden[i][p] {
                continue;
            }
            let src = &patches[p * pd..(p + 1) * pd];
            let (mu, var) = if norm_pix {
                let mu = src.iter().sum::<f32>() / pd as f32;
                let var = src.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>()
                    / (pd as f32 - 1.0).max(1.0);
                (mu, var)
            } else {
                (0.0, 1.0 - 1e-6)
            };
            for k in 0..pd {
                // Grey (0.5 after un-normalising) marks hidden patches.
                let c = k % g.channels;
                masked[p * pd + k] = (0.5 - mean[c]) / std[c];
                recon[p * pd + k] = pred[(i * np + p) * pd + k] * (var + 1e-6).sqrt() + mu;
            }
        }
        for (row, img) in rows.iter_mut().zip([
            orig.to_vec(),
            unpatch_hwc(&masked, &g),
            unpatch_hwc(&recon, &g),
        ]) {
            row.push((g.channels, g.height, g.width, to_unit(&img)));
        }
    }
    let scale = (160 / g.height.max(1)).max(1);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    Ok(plot::image_grid(path, &rows, scale)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_order_round_trips() {
        let g = umae_api::PatchGeometry::new(3, 8, 8, 4).unwrap();
        let img: Vec<f32> = (0..3 * 64).map(|v| v as f32).collect();
        let p = patches_hwc(&img, &g);
        // First patch, first pixel: channels 0, 1, 2 of pixel (0, 0).
        assert_eq!(&p[..3], &[0.0, 64.0, 128.0]);
        assert_eq!(unpatch_hwc(&p, &g), img);
    }
}
