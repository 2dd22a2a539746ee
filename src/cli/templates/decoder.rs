use umae_api::burn;
use umae_api::burn::module::{Module, Param};
use umae_api::burn::nn::{Linear, LinearConfig};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::{Distribution, Tensor};
use umae_api::{BuildContext, DecoderModule, EncoderOutput, Mask, MaskMode, PluginError, B};

umae_api::params! {
    /// Parameters of the `my-plugin` decoder.
    pub struct MyPluginParams {
        /// Standard deviation of the initial mask token and positions.
        pub init_std: f64 = 0.02,
    }
}

/// A decoder: the encoder's tokens to one prediction of the target per patch, `[B, N,
/// target width]` in patch order. This one puts a learned mask token where the encoder dropped
/// a patch, restores patch order, adds a learned position and maps every token linearly to
/// the target. Replace the layers with yours; keep the output contract.
#[derive(Module, Debug)]
pub struct MyPlugin<B: Backend> {
    pub mask_token: Param<Tensor<B, 1>>,
    /// Learned position embedding `[1, N, encoder width]`.
    pub pos: Param<Tensor<B, 3>>,
    pub pred: Linear<B>,
    #[module(skip)]
    pub out_dim: usize,
}

fn build(p: &MyPluginParams, ctx: &BuildContext) -> Result<MyPlugin<B>, PluginError> {
    // Decoders are built after the encoder and the target: their widths are known here.
    let (dim, out_dim) = ctx.decoder_dims()?;
    let n = ctx.geometry()?.num_patches();
    let init = Distribution::Normal(0.0, p.init_std);
    Ok(MyPlugin {
        mask_token: Param::from_tensor(Tensor::random([dim], init, &ctx.device)),
        pos: Param::from_tensor(Tensor::random([1, n, dim], init, &ctx.device)),
        pred: LinearConfig::new(dim, out_dim).init(&ctx.device),
        out_dim,
    })
}

impl DecoderModule for MyPlugin<B> {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3> {
        let [b, t, d] = encoded.tokens.dims();
        let n = mask.plan.num_patches;
        let patches = encoded.tokens.clone().slice([0..b, encoded.prefix..t]);
        let kept = t - encoded.prefix;
        let patches = if kept == n {
            // A MaskToken-mode encoder kept every patch, in patch order.
            patches
        } else {
            // Drop mode: visible tokens first, then one mask token per hidden patch; the
            // mask's `ids_restore` puts them back in patch order.
            let fill = self.mask_token.val().reshape([1, 1, d]).expand([b, n - kept, d]);
            let ids = mask.ids_restore.clone().reshape([b, n, 1]).expand([b, n, d]);
            Tensor::cat(vec![patches, fill], 1).gather(1, ids)
        };
        self.pred.forward(patches + self.pos.val())
    }

    fn out_dim(&self) -> usize {
        self.out_dim
    }

    fn accepts(&self, _mode: MaskMode) -> bool {
        true
    }
}

umae_api::register!(
    Decoder,
    "my-plugin",
    MyPluginParams,
    build,
    "What the decoder is (and where it comes from)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::{MaskPlan, PatchGeometry};

    #[test]
    fn hidden_patches_are_predicted_from_the_mask_token_only() {
        let device = umae_api::burn::DispatchDevice::Flex(Default::default());
        let ctx = BuildContext {
            channels: 1,
            height: 8,
            width: 8,
            geometry: Some(PatchGeometry::new(1, 8, 8, 4).unwrap()),
            device: device.clone(),
            encoder_dim: 16,
            target_dim: 3,
            seed: 0,
        };
        let dec = build(&MyPluginParams::default(), &ctx).unwrap();
        // Patches 0 and 2 hidden: the encoder returned the tokens of patches 1 and 3.
        let mask = MaskPlan::from_flags(&[vec![true, false, true, false]])
            .unwrap()
            .to_device(&device);
        let encoded = |seed: f64| EncoderOutput {
            tokens: Tensor::random([1, 2, 16], Distribution::Normal(seed, 1.0), &device),
            pooled: Tensor::zeros([1, 16], &device),
            prefix: 0,
        };
        let (a, b) = (dec.forward(&encoded(0.0), &mask), dec.forward(&encoded(5.0), &mask));
        assert_eq!(a.dims(), [1, 4, 3]);
        let change = |p: usize| -> f32 {
            let (x, y) = (a.clone().narrow(1, p, 1), b.clone().narrow(1, p, 1));
            (x - y).abs().max().into_scalar()
        };
        assert_eq!(change(0) + change(2), 0.0, "hidden patches");
        assert!(change(1) > 0.0 && change(3) > 0.0, "visible patches");
    }
}
