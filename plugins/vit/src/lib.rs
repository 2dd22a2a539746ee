//! The `vit` encoder: a Vision Transformer that reads images through a patch grid, in MAE's
//! drop mode (only visible patches are encoded) or with a learned mask token (SimMIM, BEiT).

use umae_api::burn;
use umae_api::burn::module::{Module, Param};
use umae_api::burn::nn::{LayerNorm, Linear};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::{Distribution, Tensor, TensorData};
use umae_api::serde::{Deserialize, Serialize};
use umae_api::{
    BuildContext, EncoderModule, EncoderOutput, Mask, MaskMode, PatchGeometry, PluginError,
    TimmLayout, TimmParam, B,
};

use nn::{gather_tokens, layer_norm, linear, linear3, patchify_chw, sincos_2d, Block};
use umae_layers as nn;

/// Standard ViT sizes (dim, depth, heads), as in timm and MAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "umae_api::serde")]
pub enum Preset {
    /// 192-d, 12 blocks, 3 heads.
    Tiny,
    /// 384-d, 12 blocks, 6 heads.
    Small,
    /// 768-d, 12 blocks, 12 heads.
    Base,
    /// 1024-d, 24 blocks, 16 heads.
    Large,
    /// 1280-d, 32 blocks, 16 heads.
    Huge,
}

impl Preset {
    pub fn sizes(self) -> (usize, usize, usize) {
        match self {
            Preset::Tiny => (192, 12, 3),
            Preset::Small => (384, 12, 6),
            Preset::Base => (768, 12, 12),
            Preset::Large => (1024, 24, 16),
            Preset::Huge => (1280, 32, 16),
        }
    }
}

/// The pooled feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "umae_api::serde")]
pub enum Pool {
    /// The class token.
    Cls,
    /// The mean of the patch tokens.
    Mean,
}

umae_api::params! {
    /// Parameters of the `vit` encoder.
    pub struct VitParams {
        /// Size preset (Tiny, Small, Base, Large, Huge); `dim`, `depth`, `heads` override it.
        pub preset: Preset = Preset::Base,
        /// Token width (overrides the preset).
        pub dim: Option<usize> = None,
        /// Number of blocks (overrides the preset).
        pub depth: Option<usize> = None,
        /// Attention heads (overrides the preset).
        pub heads: Option<usize> = None,
        /// Patch side in pixels; the image size must be a multiple.
        pub patch: usize = 16,
        /// MLP hidden width as a multiple of `dim`.
        pub mlp_ratio: f64 = 4.0,
        /// Pooled feature: Cls or Mean.
        pub pool: Pool = Pool::Cls,
        /// Drop (MAE) or MaskToken (SimMIM/BEiT).
        pub mask_mode: MaskMode = MaskMode::Drop,
    }
}

/// Vision Transformer encoder.
#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    /// The patch embedding: a Linear on (channel, row, column)-flattened patches, equal to a
    /// strided convolution with kernel = stride = patch.
    pub patch_embed: Linear<B>,
    /// Class token, `[dim]`.
    pub cls_token: Param<Tensor<B, 1>>,
    /// Learned mask token, `[dim]` (only in MaskToken mode).
    pub mask_token: Option<Param<Tensor<B, 1>>>,
    /// Fixed sin-cos position embedding `[1 + N, dim]` (a constant: not trained, not saved).
    pub pos_embed: Tensor<B, 2>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    #[module(skip)]
    pub geometry: PatchGeometry,
    #[module(skip)]
    pub dim: usize,
    #[module(skip)]
    pub pool: Pool,
    #[module(skip)]
    pub mode: MaskMode,
    /// Stochastic-depth rate at the last block (rising linearly from 0 at the first), set by
    /// fine-tuning; 0 during pretraining and evaluation.
    #[module(skip)]
    pub drop_path: f64,
}

impl Vit<B> {
    pub fn new(p: &VitParams, ctx: &BuildContext) -> Result<Self, PluginError> {
        let (mut dim, mut depth, mut heads) = p.preset.sizes();
        dim = p.dim.unwrap_or(dim);
        depth = p.depth.unwrap_or(depth);
        heads = p.heads.unwrap_or(heads);
        if dim == 0 || depth == 0 || heads == 0 || dim % heads != 0 {
            return Err(PluginError::Invalid(format!(
                "dim {dim} must be positive and divisible by heads {heads}, depth {depth} positive"
            )));
        }
        if dim % 4 != 0 {
            return Err(PluginError::Invalid(format!(
                "dim {dim} must be divisible by 4 for the 2-D sin-cos position embedding"
            )));
        }
        if !(p.mlp_ratio > 0.0 && p.mlp_ratio.is_finite()) {
            return Err(PluginError::Invalid(format!(
                "mlp_ratio must be > 0, found {}",
                p.mlp_ratio
            )));
        }
        let geometry = PatchGeometry::new(ctx.channels, ctx.height, ctx.width, p.patch)
            .map_err(PluginError::Invalid)?;
        let device = &ctx.device;
        let (gh, gw) = geometry.grid();
        let n = geometry.num_patches();
        let pos = sincos_2d(dim, gh, gw, 1);
        let token = |device| {
            Param::from_tensor(Tensor::random(
                [dim],
                Distribution::Normal(0.0, 0.02),
                device,
            ))
        };
        Ok(Vit {
            patch_embed: linear(geometry.patch_dim(), dim, device),
            cls_token: token(device),
            mask_token: (p.mask_mode == MaskMode::MaskToken).then(|| token(device)),
            pos_embed: Tensor::from_data(TensorData::new(pos, [1 + n, dim]), device),
            blocks: (0..depth)
                .map(|_| Block::new(dim, heads, p.mlp_ratio, device))
                .collect(),
            norm: layer_norm(dim, device),
            geometry,
            dim,
            pool: p.pool,
            mode: p.mask_mode,
            drop_path: 0.0,
        })
    }

    /// Patch tokens with position embedding, `[B, N, D]`; hidden patches replaced by the mask
    /// token in MaskToken mode.
    fn embed(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> Tensor<B, 3> {
        let x = linear3(&self.patch_embed, patchify_chw(images, self.geometry.patch));
        let [b, n, d] = x.dims();
        let x = match (mask, &self.mask_token) {
            (Some(m), Some(token)) if self.mode == MaskMode::MaskToken => {
                let w = m.hidden.clone().reshape([b, n, 1]);
                let t = token.val().reshape([1, 1, d]);
                x * (w.clone().neg() + 1.0) + t * w
            }
            _ => x,
        };
        x + self.pos_embed.clone().narrow(0, 1, n).reshape([1, n, d])
    }
}

/// timm name of a `vit` parameter path.
pub fn timm_name(path: &str) -> String {
    let p = path.replacen("patch_embed.", "patch_embed.proj.", 1);
    if let Some(stem) = p.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = p.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        p
    }
}

/// Layer of a parameter path in a ViT of `depth` blocks (see [`EncoderModule::layer_id`]).
pub fn layer_id(path: &str, depth: usize) -> usize {
    if let Some(rest) = path.strip_prefix("blocks.") {
        if let Some(k) = rest.split('.').next().and_then(|k| k.parse::<usize>().ok()) {
            return k + 1;
        }
    }
    if path.starts_with("norm.") || path.starts_with("fc_norm.") {
        depth + 1
    } else {
        0
    }
}

impl EncoderModule for Vit<B> {
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> EncoderOutput {
        let b = images.dims()[0];
        let mut x = self.embed(images, mask);
        if let (Some(m), MaskMode::Drop) = (mask, self.mode) {
            x = gather_tokens(x, m.ids_keep.clone());
        }
        let d = self.dim;
        let cls = (self.cls_token.val().reshape([1, d]) + self.pos_embed.clone().narrow(0, 0, 1))
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let mut x = Tensor::cat(vec![cls, x], 1);
        let depth = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            let rate = self.drop_path * i as f64 / (depth.max(2) - 1) as f64;
            x = if rate > 0.0 {
                block.forward_drop_path(x, rate)
            } else {
                block.forward(x)
            };
        }
        let x = nn::norm(&self.norm, x);
        let t = x.dims()[1];
        let pooled = match self.pool {
            Pool::Cls => x.clone().slice([0..b, 0..1]).reshape([b, d]),
            Pool::Mean => x.clone().slice([0..b, 1..t]).mean_dim(1).reshape([b, d]),
        };
        EncoderOutput {
            tokens: x,
            pooled,
            prefix: 1,
        }
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn mask_mode(&self) -> MaskMode {
        self.mode
    }

    fn geometry(&self) -> PatchGeometry {
        self.geometry
    }

    fn fixed_params(&self) -> usize {
        self.pos_embed.shape().num_elements()
    }

    fn set_drop_path(&mut self, rate: f64) -> bool {
        self.drop_path = rate;
        true
    }

    fn layers(&self) -> usize {
        self.blocks.len()
    }

    /// MAE's layer ids: `blocks.K.` -> K + 1; the tokens and patch embedding -> 0; the final
    /// norm -> depth + 1.
    fn layer_id(&self, path: &str) -> usize {
        layer_id(path, self.blocks.len())
    }

    /// timm's `VisionTransformer` names: `patch_embed.proj.*` for the patch embedding (a
    /// strided convolution there), LayerNorm `weight` / `bias` for `gamma` / `beta`, Linear
    /// weights transposed (the fused qkv keeps q, k, v order), tokens as `[1, 1, D]`.
    fn timm_param(&self, path: &str) -> Option<TimmParam> {
        let g = self.geometry;
        let layout = match path {
            "cls_token" | "mask_token" => TimmLayout::Token,
            "patch_embed.weight" => TimmLayout::PatchConv {
                channels: g.channels,
                patch: g.patch,
            },
            "patch_embed.bias" => TimmLayout::AsIs,
            _ if path.ends_with(".weight") && !path.contains("norm") => TimmLayout::Transposed,
            _ => TimmLayout::AsIs,
        };
        Some(TimmParam {
            name: timm_name(path),
            layout,
            export: path != "mask_token",
        })
    }

    fn constants(&self) -> Vec<umae_api::Constant> {
        let [t, d] = self.pos_embed.dims();
        let values = self
            .pos_embed
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 position embedding");
        vec![("pos_embed".into(), vec![1, t, d], values)]
    }
}

fn build(p: &VitParams, ctx: &BuildContext) -> Result<Vit<B>, PluginError> {
    Vit::new(p, ctx)
}

umae_api::register!(
    Encoder,
    "vit",
    VitParams,
    build,
    "Vision Transformer (Dosovitskiy et al. 2021) with fixed 2-D sin-cos positions, as in MAE"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::MaskPlan;

    #[test]
    fn names_follow_timm() {
        assert_eq!(timm_name("patch_embed.weight"), "patch_embed.proj.weight");
        assert_eq!(timm_name("blocks.3.norm1.gamma"), "blocks.3.norm1.weight");
        assert_eq!(timm_name("norm.beta"), "norm.bias");
        assert_eq!(
            timm_name("blocks.0.attn.qkv.weight"),
            "blocks.0.attn.qkv.weight"
        );
        let v = vit(MaskMode::Drop);
        let p = |path| umae_api::Encoder::timm_param(&v, path).unwrap();
        assert_eq!(p("blocks.0.attn.qkv.weight").layout, TimmLayout::Transposed);
        assert_eq!(p("blocks.0.norm1.gamma").layout, TimmLayout::AsIs);
        assert_eq!(p("blocks.0.mlp.fc1.bias").layout, TimmLayout::AsIs);
        assert_eq!(p("cls_token").layout, TimmLayout::Token);
        assert!(!p("mask_token").export);
    }

    #[test]
    fn layer_ids_follow_mae() {
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("patch_embed.weight", 12), 0);
        assert_eq!(layer_id("blocks.0.attn.qkv.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.mlp.fc2.bias", 12), 12);
        assert_eq!(layer_id("norm.gamma", 12), 13);
        let v = vit(MaskMode::Drop);
        assert_eq!(umae_api::Encoder::layers(&v), v.blocks.len());
        assert_eq!(
            umae_api::Encoder::layer_id(&v, "norm.gamma"),
            v.blocks.len() + 1
        );
    }

    fn vit(mode: MaskMode) -> Vit<B> {
        let ctx = BuildContext {
            channels: 1,
            height: 8,
            width: 8,
            geometry: None,
            device: umae_api::burn::DispatchDevice::Flex(Default::default()),
            encoder_dim: 0,
            target_dim: 0,
            seed: 0,
        };
        let p = VitParams {
            dim: Some(16),
            depth: Some(2),
            heads: Some(2),
            patch: 4,
            mask_mode: mode,
            ..Default::default()
        };
        Vit::new(&p, &ctx).unwrap()
    }

    fn diff(a: &Tensor<B, 3>, b: &Tensor<B, 3>) -> f32 {
        (a.clone() - b.clone()).abs().max().into_scalar()
    }

    #[test]
    fn mask_token_mode_encodes_every_position_and_ignores_hidden_pixels() {
        let v = vit(MaskMode::MaskToken);
        let d = v.pos_embed.device();
        // Patch 1 (top right) hidden.
        let mask = MaskPlan::from_flags(&[vec![false, true, false, false]])
            .unwrap()
            .to_device(&d);
        let x = Tensor::<B, 4>::random([1, 1, 8, 8], Distribution::Normal(0.0, 1.0), &d);
        let out = EncoderModule::forward(&v, x.clone(), Some(&mask));
        assert_eq!(out.tokens.dims(), [1, 5, 16]);
        // New pixels in the hidden patch change nothing; in a visible patch they do.
        let noise = Tensor::<B, 4>::random([1, 1, 4, 4], Distribution::Normal(0.0, 1.0), &d);
        let hidden_changed = x
            .clone()
            .slice_assign([0..1, 0..1, 0..4, 4..8], noise.clone());
        let same = EncoderModule::forward(&v, hidden_changed, Some(&mask));
        assert!(diff(&out.tokens, &same.tokens) < 1e-6);
        let visible_changed = x.clone().slice_assign([0..1, 0..1, 0..4, 0..4], noise);
        let other = EncoderModule::forward(&v, visible_changed, Some(&mask));
        assert!(diff(&out.tokens, &other.tokens) > 1e-3);
        // Drop mode keeps only the class token and the visible patches.
        let v = vit(MaskMode::Drop);
        assert!(v.mask_token.is_none());
        let out = EncoderModule::forward(&v, x, Some(&mask));
        assert_eq!(out.tokens.dims(), [1, 4, 16]);
    }
}
