//! The five plugin kinds.
//!
//! Trainable kinds (encoder, decoder) are implemented on a burn `Module` through a typed trait
//! (`EncoderModule`, `DecoderModule`); blanket impls erase them into `dyn Encoder` /
//! `dyn Decoder`, which the runtime drives and trains through [`Trainable`].

use burn::module::AutodiffModule;
use burn::tensor::Tensor;

use crate::geometry::PatchGeometry;
use crate::mask::{Mask, MaskPlan};
use crate::rng::Rng;
use crate::trainable::Trainable;
use crate::B;

/// Chooses which patches are visible.
pub trait Masker: Send + Sync {
    /// A plan for `batch` images of this geometry. Must be a function of `rng` only.
    fn sample(&self, geometry: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan;
}

/// What an encoder returns.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// `[B, T, D]`: `prefix` class tokens followed by the encoded patch tokens (only the visible
    /// ones when the encoder drops masked patches, in `ids_keep` order).
    pub tokens: Tensor<B, 3>,
    /// `[B, D]`: the pooled feature (class token or mean of patch tokens), after the final norm.
    pub pooled: Tensor<B, 2>,
    /// Number of class tokens at the start of `tokens`.
    pub prefix: usize,
}

impl EncoderOutput {
    /// The `num_patches` patch tokens `[B, N, D]` in patch order, for heads that predict from
    /// each patch's own token. Only a MaskToken-mode encoder keeps every patch; a decoder that
    /// calls this must accept only [`MaskMode::MaskToken`] so that `umae check` refuses the rest.
    pub fn patch_tokens(&self, num_patches: usize) -> Tensor<B, 3> {
        let [b, t, _] = self.tokens.dims();
        assert_eq!(
            t - self.prefix,
            num_patches,
            "a per-patch head needs every patch's token (an encoder in MaskToken mode)"
        );
        self.tokens.clone().slice([0..b, self.prefix..t])
    }
}

/// How an encoder treats hidden patches (also an encoder parameter, e.g. `vit`'s `mask_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MaskMode {
    /// Hidden patches are removed from the sequence (MAE).
    Drop,
    /// Hidden patches are replaced by a learned mask token (SimMIM, BEiT).
    MaskToken,
}

/// Typed encoder contract, implemented on a burn module.
pub trait EncoderModule: AutodiffModule<B> + 'static {
    /// `images`: `[B, C, H, W]`. `mask: None` encodes every patch (evaluation).
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> EncoderOutput;
    /// Feature width `D`.
    fn dim(&self) -> usize;
    fn mask_mode(&self) -> MaskMode;
    /// How the encoder cuts images into patches.
    fn geometry(&self) -> PatchGeometry;
    /// Parameters that exist but are not trained (fixed position embeddings).
    fn fixed_params(&self) -> usize {
        0
    }
    /// The fixed tensors behind `fixed_params`, as `(name, shape, values)` (for export).
    fn constants(&self) -> Vec<Constant> {
        Vec::new()
    }
    /// Stochastic depth for fine-tuning: drop residual branches with this rate at the deepest
    /// block (0 turns it off, as for evaluation). Returns whether the encoder supports it.
    fn set_drop_path(&mut self, _rate: f64) -> bool {
        false
    }
    /// Layer-wise learning-rate decay in fine-tuning: how many layers (blocks) the encoder
    /// stacks. 0 (the default): none, every parameter is in layer 0.
    fn layers(&self) -> usize {
        0
    }
    /// The layer of a parameter (`path` as [`Trainable::visit_params`] names it): 0 before the
    /// first block (embeddings), `1..=layers()` for the blocks, `layers() + 1` after them.
    fn layer_id(&self, _path: &str) -> usize {
        0
    }
    /// An optional capability: where a parameter (`path`, as [`Trainable::visit_params`] names
    /// it) sits in timm's `VisionTransformer` state dict, for `umae export` / `umae import`.
    /// `None` (the default) for every path: the encoder has no timm layout.
    fn timm_param(&self, _path: &str) -> Option<TimmParam> {
        None
    }
}

/// One parameter of an encoder in timm's layout (see [`EncoderModule::timm_param`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimmParam {
    /// Its key in timm's state dict.
    pub name: String,
    pub layout: TimmLayout,
    /// Whether an export writes it (a SimMIM mask token has no place in a timm model, but an
    /// import that has one reads it).
    pub export: bool,
}

/// How a parameter's values map to timm's tensor of the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimmLayout {
    /// The same shape and order.
    AsIs,
    /// A learned token `[D]` is timm's `[1, 1, D]`.
    Token,
    /// A Linear weight `[in, out]` is timm's `[out, in]`.
    Transposed,
    /// The patch embedding `[C*p*p, D]` (a Linear on channel-row-column patches) is timm's
    /// strided convolution `[D, C, p, p]`.
    PatchConv { channels: usize, patch: usize },
}

/// A fixed (untrained) tensor of a component: name, shape, row-major values.
pub type Constant = (String, Vec<usize>, Vec<f32>);

/// Object-safe encoder, implemented for every [`EncoderModule`].
pub trait Encoder: Trainable {
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> EncoderOutput;
    fn dim(&self) -> usize;
    fn mask_mode(&self) -> MaskMode;
    fn geometry(&self) -> PatchGeometry;
    fn fixed_params(&self) -> usize;
    fn constants(&self) -> Vec<Constant>;
    fn set_drop_path(&mut self, rate: f64) -> bool;
    fn layers(&self) -> usize;
    fn layer_id(&self, path: &str) -> usize;
    fn timm_param(&self, path: &str) -> Option<TimmParam>;
}

impl<M: EncoderModule> Encoder for M {
    fn geometry(&self) -> PatchGeometry {
        EncoderModule::geometry(self)
    }
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> EncoderOutput {
        EncoderModule::forward(self, images, mask)
    }
    fn dim(&self) -> usize {
        EncoderModule::dim(self)
    }
    fn mask_mode(&self) -> MaskMode {
        EncoderModule::mask_mode(self)
    }
    fn fixed_params(&self) -> usize {
        EncoderModule::fixed_params(self)
    }
    fn constants(&self) -> Vec<Constant> {
        EncoderModule::constants(self)
    }
    fn set_drop_path(&mut self, rate: f64) -> bool {
        EncoderModule::set_drop_path(self, rate)
    }
    fn layers(&self) -> usize {
        EncoderModule::layers(self)
    }
    fn layer_id(&self, path: &str) -> usize {
        EncoderModule::layer_id(self, path)
    }
    fn timm_param(&self, path: &str) -> Option<TimmParam> {
        EncoderModule::timm_param(self, path)
    }
}

/// Typed decoder contract: encoder output + mask -> one prediction per patch.
pub trait DecoderModule: AutodiffModule<B> + 'static {
    /// Returns `[B, N, out_dim]` for all `N` patches, in patch order.
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3>;
    fn out_dim(&self) -> usize;
    /// The encoder input mode this decoder expects.
    fn accepts(&self, mode: MaskMode) -> bool;
    fn fixed_params(&self) -> usize {
        0
    }
}

/// Object-safe decoder, implemented for every [`DecoderModule`].
pub trait Decoder: Trainable {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3>;
    fn out_dim(&self) -> usize;
    fn accepts(&self, mode: MaskMode) -> bool;
    fn fixed_params(&self) -> usize;
}

impl<M: DecoderModule> Decoder for M {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3> {
        DecoderModule::forward(self, encoded, mask)
    }
    fn out_dim(&self) -> usize {
        DecoderModule::out_dim(self)
    }
    fn accepts(&self, mode: MaskMode) -> bool {
        DecoderModule::accepts(self, mode)
    }
    fn fixed_params(&self) -> usize {
        DecoderModule::fixed_params(self)
    }
}

/// What a target may use to fit itself before training (a tokenizer's codebook, for example).
pub struct Preparation<'a> {
    /// Draws `n` training images `[n, C, H, W]`, normalised as the model sees them but not
    /// augmented; the same images for the same `n` and seed.
    pub sample: &'a mut dyn FnMut(usize) -> Result<Tensor<B, 4>, crate::PluginError>,
    /// A folder where fitted state may be cached (the run directory), so that a resumed run
    /// reuses it instead of fitting again; `None` when nothing should be written.
    pub cache: Option<&'a std::path::Path>,
    /// Describes the training data; fitted state cached for other data must not be reused.
    pub data: String,
    pub seed: u64,
    pub device: crate::Device,
}

/// How a pixel target presents a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelTarget {
    /// The patch's pixels as the model sees them (normalised per channel).
    Raw,
    /// Standardised by the patch's own mean and variance (MAE's norm_pix_loss).
    PerPatchNormalized,
}

/// What to predict and how to score it.
pub trait Target: Send + Sync {
    /// Fit whatever the target needs from the training data, once, before the first step.
    /// Returns a line for the log when it did something. Most targets need nothing. Errors say
    /// whose fault they are: [`PluginError::Invalid`](crate::PluginError::Invalid) for a setting
    /// the recipe must change, [`PluginError::Failed`](crate::PluginError::Failed) otherwise.
    fn prepare(
        &mut self,
        _prep: &mut Preparation<'_>,
    ) -> Result<Option<String>, crate::PluginError> {
        Ok(None)
    }
    /// Width of one patch's prediction.
    fn pred_dim(&self) -> usize;
    /// `images`: `[B, C, H, W]`; `pred`: `[B, N, pred_dim]`. Returns a scalar `[1]`.
    fn loss(&self, images: &Tensor<B, 4>, pred: Tensor<B, 3>, mask: &Mask) -> Tensor<B, 1>;
    /// The per-patch target for `images` (`[B, N, pred_dim]`), for visualisation and tests.
    fn target(&self, images: &Tensor<B, 4>) -> Tensor<B, 3>;
    /// Whether each patch's prediction is that patch's pixels (in (row, column, channel)
    /// order), so that it can be shown as an image; `None` (the default) for anything else.
    fn predicts_pixels(&self) -> Option<PixelTarget> {
        None
    }
}

/// An extra loss term on the encoder's features (Eq. 10: weighted and added to the target loss).
pub trait Regularizer: Send + Sync {
    /// Returns a scalar `[1]`, unweighted.
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1>;
}
