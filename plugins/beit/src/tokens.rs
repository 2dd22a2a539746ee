use std::path::{Path, PathBuf};
use std::time::Instant;

use umae_api::burn::tensor::activation::log_softmax;
use umae_api::burn::tensor::{Int, Tensor};
use umae_api::serde::{Deserialize, Serialize};
use umae_api::{BuildContext, Mask, PatchGeometry, PluginError, Preparation, Target, B};
use umae_plugin_pixels::{normalize_patches, patchify_hwc};

use crate::tokenizer::{kmeans, random_projection, Codebook};

/// Where the codebook comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "umae_api::serde")]
pub enum Tokenizer {
    /// k-means on patches of the training set, fitted before pretraining.
    KMeans,
    /// A frozen random projection and random codebook (BEST-RQ); needs no data.
    RandomProjection,
    /// A codebook file (`path`): the `tokenizer.safetensors` of another run, or your own.
    Checkpoint,
}

umae_api::params! {
    /// Parameters of the `tokens` target.
    pub struct TokensParams {
        /// KMeans, RandomProjection or Checkpoint.
        pub tokenizer: Tokenizer = Tokenizer::KMeans,
        /// Codebook size (default 512; Checkpoint reads it from the file).
        pub vocab: Option<usize> = None,
        /// KMeans: patches sampled from the training set to fit the codebook.
        pub fit_patches: usize = 100_000,
        /// KMeans: Lloyd iterations (stops earlier when assignments no longer change).
        pub fit_iters: usize = 20,
        /// RandomProjection: width of the projection (BEST-RQ: 16).
        pub proj_dim: usize = 16,
        /// Checkpoint: the codebook file.
        pub path: Option<String> = None,
        /// Standardise each patch before tokenizing it (as MAE's norm_pix).
        pub norm_pix: bool = false,
    }
}

/// Discrete visual tokens as the target: each patch becomes the id of its nearest code, and the
/// decoder's logits are scored by cross-entropy on the hidden patches (BEiT).
pub struct Tokens {
    pub geometry: PatchGeometry,
    pub params: TokensParams,
    pub vocab: usize,
    pub codebook: Option<Codebook>,
}

/// The file a run keeps its fitted codebook in.
pub const CACHE_FILE: &str = "tokenizer.safetensors";

impl Tokens {
    /// Patches as tokenizer input, `[B * N, P]`.
    fn patch_rows(&self, images: &Tensor<B, 4>) -> Tensor<B, 2> {
        let mut t = patchify_hwc(images.clone().detach(), self.geometry.patch);
        if self.params.norm_pix {
            t = normalize_patches(t);
        }
        let [b, n, p] = t.dims();
        t.reshape([b * n, p])
    }

    /// Token ids `[B, N]` of `images`.
    pub fn tokenize(&self, images: &Tensor<B, 4>) -> Tensor<B, 2, Int> {
        let book = self
            .codebook
            .as_ref()
            .expect("the tokens target is prepared before use");
        let b = images.dims()[0];
        book.assign(self.patch_rows(images))
            .reshape([b, self.geometry.num_patches()])
    }

    /// What identifies a fitted codebook: the tokenizer settings, the patch shape, the data and
    /// the seed. A cached codebook with another key is fitted again.
    fn cache_key(&self, prep: &Preparation<'_>) -> String {
        let p = &self.params;
        format!(
            "{:?} vocab {} fit_patches {} fit_iters {} proj_dim {} norm_pix {} patch {:?} data {} seed {}",
            p.tokenizer, self.vocab, p.fit_patches, p.fit_iters, p.proj_dim, p.norm_pix,
            self.geometry, prep.data, prep.seed
        )
    }

    fn fit(&self, prep: &mut Preparation<'_>) -> Result<(Codebook, String), PluginError> {
        let input = self.geometry.patch_dim();
        match self.params.tokenizer {
            Tokenizer::RandomProjection => Ok((
                random_projection(input, self.params.proj_dim, self.vocab, prep.seed),
                format!(
                    "random projection to {} values, {} random codes",
                    self.params.proj_dim, self.vocab
                ),
            )),
            Tokenizer::KMeans => {
                let start = Instant::now();
                let n = self.geometry.num_patches();
                let images = (prep.sample)(self.params.fit_patches.div_ceil(n))?;
                let rows = self.patch_rows(&images);
                let m = rows.dims()[0].min(self.params.fit_patches);
                let x: Vec<f32> = rows
                    .narrow(0, 0, m)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| PluginError::Failed(format!("{e:?}")))?;
                let codes = kmeans(
                    &x,
                    input,
                    self.vocab,
                    self.params.fit_iters,
                    prep.seed,
                    &prep.device,
                )
                .map_err(|e| {
                    PluginError::Invalid(format!("{e}: lower `vocab` or raise `fit_patches`"))
                })?;
                Ok((
                    Codebook::new(None, codes, input, input, false).map_err(PluginError::Failed)?,
                    format!(
                        "k-means with {} codes fitted on {m} patches in {:.1}s",
                        self.vocab,
                        start.elapsed().as_secs_f64()
                    ),
                ))
            }
            Tokenizer::Checkpoint => unreachable!("loaded when built"),
        }
    }
}

impl Target for Tokens {
    fn pred_dim(&self) -> usize {
        self.vocab
    }

    fn prepare(&mut self, prep: &mut Preparation<'_>) -> Result<Option<String>, PluginError> {
        if self.params.tokenizer == Tokenizer::Checkpoint {
            if let Some(book) = &mut self.codebook {
                book.to_device(&prep.device);
            }
            return Ok(None);
        }
        let key = self.cache_key(prep);
        let cache: Option<PathBuf> = prep.cache.map(|d| d.join(CACHE_FILE));
        if let Some(path) = cache.as_deref().filter(|p| p.exists()) {
            if let Ok((book, meta)) = Codebook::load(path, self.geometry.patch_dim()) {
                if meta.get("key") == Some(&key) {
                    let mut book = book;
                    book.to_device(&prep.device);
                    self.codebook = Some(book);
                    return Ok(Some(format!("tokenizer: reusing {}", path.display())));
                }
            }
        }
        let (mut book, what) = self.fit(prep)?;
        let mut line = format!("tokenizer: {what}");
        if let Some(path) = &cache {
            book.save(path, &[("key", key.as_str())])
                .map_err(PluginError::Failed)?;
            line += &format!(", saved to {}", path.display());
        }
        book.to_device(&prep.device);
        self.codebook = Some(book);
        Ok(Some(line))
    }

    fn target(&self, images: &Tensor<B, 4>) -> Tensor<B, 3> {
        let ids = self.tokenize(images);
        let [b, n] = ids.dims();
        let device = ids.device();
        let range =
            Tensor::<B, 1, Int>::arange(0..self.vocab as i64, &device).reshape([1, 1, self.vocab]);
        ids.reshape([b, n, 1]).equal(range).float()
    }

    fn loss(&self, images: &Tensor<B, 4>, pred: Tensor<B, 3>, mask: &Mask) -> Tensor<B, 1> {
        let ids = self.tokenize(images);
        let [b, n] = ids.dims();
        let logp = log_softmax(pred, 2).gather(2, ids.reshape([b, n, 1]));
        let nll = logp.reshape([b, n]).neg();
        let hidden = mask.hidden.clone();
        (nll * hidden.clone()).sum() / hidden.sum().clamp_min(1.0)
    }
}

fn build(p: &TokensParams, ctx: &BuildContext) -> Result<Tokens, PluginError> {
    let geometry = ctx.geometry()?;
    let bad = |m: String| Err(PluginError::Invalid(m));
    let (vocab, codebook) = match p.tokenizer {
        Tokenizer::Checkpoint => {
            let Some(path) = &p.path else {
                return bad("tokenizer Checkpoint needs `path: Some(\"file.safetensors\")`".into());
            };
            let (book, _) = Codebook::load(Path::new(path), geometry.patch_dim())
                .map_err(PluginError::Invalid)?;
            if p.vocab.is_some_and(|v| v != book.size()) {
                return bad(format!(
                    "vocab {} differs from the {} codes in {path}",
                    p.vocab.unwrap(),
                    book.size()
                ));
            }
            (book.size(), Some(book))
        }
        _ => {
            if p.path.is_some() {
                return bad(format!(
                    "`path` is only read by tokenizer Checkpoint, not {:?}",
                    p.tokenizer
                ));
            }
            (p.vocab.unwrap_or(512), None)
        }
    };
    if vocab < 2 {
        return bad(format!("vocab must be at least 2, found {vocab}"));
    }
    if p.tokenizer == Tokenizer::KMeans && (p.fit_patches < vocab || p.fit_iters == 0) {
        return bad(format!(
            "k-means needs fit_patches ({}) >= vocab ({vocab}) and fit_iters ({}) >= 1",
            p.fit_patches, p.fit_iters
        ));
    }
    if p.tokenizer == Tokenizer::RandomProjection && p.proj_dim == 0 {
        return bad("proj_dim must be positive".into());
    }
    Ok(Tokens {
        geometry,
        params: p.clone(),
        vocab,
        codebook,
    })
}

umae_api::register!(
    Target,
    "tokens",
    TokensParams,
    build,
    "Discrete visual tokens of hidden patches, cross-entropy (BEiT, Bao et al. 2022); k-means, random-projection (BEST-RQ) or file codebooks"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::{Distribution, TensorData};
    use umae_api::MaskPlan;

    fn device() -> umae_api::Device {
        umae_api::burn::DispatchDevice::Flex(Default::default())
    }

    fn level(i: usize) -> f32 {
        let (r, c) = ((i % 64) / 8, i % 8);
        ((r / 4) * 2 + c / 4) as f32
    }

    fn prepared(
        tokenizer: Tokenizer,
        vocab: usize,
        cache: Option<&Path>,
    ) -> (Tokens, Option<String>) {
        let g = PatchGeometry::new(1, 8, 8, 4).unwrap();
        let mut t = Tokens {
            geometry: g,
            params: TokensParams {
                tokenizer,
                vocab: Some(vocab),
                fit_patches: 400,
                ..Default::default()
            },
            vocab,
            codebook: None,
        };
        let mut sample = |n: usize| -> Result<Tensor<B, 4>, PluginError> {
            // Fixed images: patch (row, column) is flat at level 2 * row + column.
            let v: Vec<f32> = (0..n * 64).map(level).collect();
            Ok(Tensor::from_data(
                TensorData::new(v, [n, 1, 8, 8]),
                &device(),
            ))
        };
        let mut prep = Preparation {
            sample: &mut sample,
            cache,
            data: "test".into(),
            seed: 5,
            device: device(),
        };
        let line = t.prepare(&mut prep).unwrap();
        (t, line)
    }

    #[test]
    fn loss_is_cross_entropy_on_hidden_patches() {
        let (t, _) = prepared(Tokenizer::RandomProjection, 8, None);
        let d = device();
        let images = Tensor::<B, 4>::random([2, 1, 8, 8], Distribution::Normal(0.0, 1.0), &d);
        let mask = MaskPlan::from_flags(&vec![vec![true, false, true, false]; 2])
            .unwrap()
            .to_device(&d);
        // Uniform logits: ln(vocab).
        let l: f32 = t
            .loss(&images, Tensor::zeros([2, 4, 8], &d), &mask)
            .into_scalar()
            .elem();
        assert!((l - 8f32.ln()).abs() < 1e-5, "{l}");
        // Logits 10 on the right token: -log softmax = ln(1 + 7 e^-10) for hidden patches, and
        // wrong logits on visible patches do not count.
        let onehot = t.target(&images);
        let visible = Tensor::<B, 3>::from_data(
            TensorData::new([0.0f32, 1.0, 0.0, 1.0].repeat(2), [2, 4, 1]),
            &d,
        );
        let pred = onehot * 10.0 - visible * 100.0;
        let l: f32 = t.loss(&images, pred, &mask).into_scalar().elem();
        let want = (1.0 + 7.0 * (-10f32).exp()).ln();
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }

    #[test]
    fn kmeans_tokens_separate_flat_levels_and_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (t, line) = prepared(Tokenizer::KMeans, 4, Some(dir.path()));
        assert!(line.unwrap().contains("k-means with 4 codes"));
        let v: Vec<f32> = (0..64).map(level).collect();
        let img = Tensor::<B, 4>::from_data(TensorData::new(v, [1, 1, 8, 8]), &device());
        let ids: Vec<i64> = t
            .tokenize(&img)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        // The four patches hold levels 0, 1, 2, 3 (flat): four different tokens.
        let mut s = ids.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 4, "{ids:?}");
        // A second preparation reuses the cached codebook and tokenizes identically.
        let (t2, line) = prepared(Tokenizer::KMeans, 4, Some(dir.path()));
        assert!(line.unwrap().contains("reusing"));
        let ids2: Vec<i64> = t2
            .tokenize(&img)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap();
        assert_eq!(ids, ids2);
        // Other settings do not reuse it.
        let (_, line) = prepared(Tokenizer::KMeans, 3, Some(dir.path()));
        assert!(line.unwrap().contains("k-means with 3 codes"));
    }
}
