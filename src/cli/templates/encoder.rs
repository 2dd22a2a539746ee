use umae_api::burn;
use umae_api::burn::module::{Module, Param};
use umae_api::burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::activation::gelu;
use umae_api::burn::tensor::{Distribution, Tensor};
use umae_api::{
    BuildContext, EncoderModule, EncoderOutput, Mask, MaskMode, PatchGeometry, PluginError, B,
};

umae_api::params! {
    /// Parameters of the `my-plugin` encoder.
    pub struct MyPluginParams {
        /// Patch side in pixels (must divide the image height and width).
        pub patch: usize = 4,
        /// Feature width.
        pub dim: usize = 64,
    }
}

/// An encoder: images (and the mask, while pretraining) to tokens and one pooled feature per
/// image. This one embeds each patch linearly, adds a learned position, drops the hidden
/// patches (MAE's Drop mode), applies one residual MLP per token and pools by the mean.
/// Replace the layers with your network; keep the contract of `forward`.
#[derive(Module, Debug)]
pub struct MyPlugin<B: Backend> {
    pub embed: Linear<B>,
    /// Learned position embedding `[1, N, dim]`.
    pub pos: Param<Tensor<B, 3>>,
    pub hidden: Linear<B>,
    pub out: Linear<B>,
    pub norm: LayerNorm<B>,
    #[module(skip)]
    pub geometry: PatchGeometry,
    #[module(skip)]
    pub dim: usize,
}

fn build(p: &MyPluginParams, ctx: &BuildContext) -> Result<MyPlugin<B>, PluginError> {
    let geometry = PatchGeometry::new(ctx.channels, ctx.height, ctx.width, p.patch)
        .map_err(PluginError::Invalid)?;
    if p.dim == 0 {
        return Err(PluginError::Invalid("dim must be at least 1".into()));
    }
    let d = &ctx.device;
    Ok(MyPlugin {
        embed: LinearConfig::new(geometry.patch_dim(), p.dim).init(d),
        pos: Param::from_tensor(Tensor::random(
            [1, geometry.num_patches(), p.dim],
            Distribution::Normal(0.0, 0.02),
            d,
        )),
        hidden: LinearConfig::new(p.dim, 4 * p.dim).init(d),
        out: LinearConfig::new(4 * p.dim, p.dim).init(d),
        norm: LayerNormConfig::new(p.dim).init(d),
        geometry,
        dim: p.dim,
    })
}

impl EncoderModule for MyPlugin<B> {
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> EncoderOutput {
        let [b, c, _, _] = images.dims();
        let p = self.geometry.patch;
        let (gh, gw) = self.geometry.grid();
        let n = gh * gw;
        // [B, C, H, W] -> [B, N, C*p*p], patches in row-major order.
        let patches = images
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, n, c * p * p]);
        let mut x = self.embed.forward(patches) + self.pos.val();
        if let Some(m) = mask {
            // Keep the visible tokens only, in `ids_keep` order.
            let k = m.plan.num_visible;
            let ids = m.ids_keep.clone().reshape([b, k, 1]).expand([b, k, self.dim]);
            x = x.gather(1, ids);
        }
        let x = x.clone() + self.out.forward(gelu(self.hidden.forward(x)));
        let x = self.norm.forward(x);
        let pooled = x.clone().mean_dim(1).reshape([b, self.dim]);
        EncoderOutput {
            tokens: x,
            pooled,
            prefix: 0,
        }
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn mask_mode(&self) -> MaskMode {
        MaskMode::Drop
    }

    fn geometry(&self) -> PatchGeometry {
        self.geometry
    }
}

umae_api::register!(
    Encoder,
    "my-plugin",
    MyPluginParams,
    build,
    "What the encoder is (and where it comes from)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::MaskPlan;

    #[test]
    fn keeps_visible_tokens_and_ignores_hidden_pixels() {
        let device = umae_api::burn::DispatchDevice::Flex(Default::default());
        let ctx = BuildContext {
            channels: 1,
            height: 8,
            width: 8,
            geometry: None,
            device: device.clone(),
            encoder_dim: 0,
            target_dim: 0,
            seed: 0,
        };
        let enc = build(&MyPluginParams::default(), &ctx).unwrap();
        // Four 4x4 patches; patches 1 and 2 hidden.
        let mask = MaskPlan::from_flags(&[vec![false, true, true, false]])
            .unwrap()
            .to_device(&device);
        let a = Tensor::<B, 4>::random([1, 1, 8, 8], Distribution::Default, &device);
        // Changing only the pixels of patch 1 (rows 0..4, columns 4..8).
        let b = a.clone().slice_assign(
            [0..1, 0..1, 0..4, 4..8],
            Tensor::ones([1, 1, 4, 4], &device),
        );
        let (ea, eb) = (enc.forward(a, Some(&mask)), enc.forward(b, Some(&mask)));
        assert_eq!(ea.tokens.dims(), [1, 2, 64]);
        assert_eq!(ea.pooled.dims(), [1, 64]);
        let diff: f32 = (ea.tokens - eb.tokens).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }
}
