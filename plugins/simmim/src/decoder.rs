use umae_api::burn;
use umae_api::burn::module::Module;
use umae_api::burn::nn::Linear;
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, DecoderModule, EncoderOutput, Mask, MaskMode, PluginError, B};
use umae_layers::{linear, linear3};

umae_api::params! {
    /// Parameters of the `linear` decoder (none: its width is the target's).
    pub struct LinearParams {}
}

/// SimMIM's one-layer prediction head: a linear map from each patch token to that patch's
/// target values (SimMIM's 1x1 convolution + pixel shuffle is the same map). It needs a token
/// for every patch, so the encoder must run in MaskToken mode.
#[derive(Module, Debug)]
pub struct LinearDecoder<B: Backend> {
    pub pred: Linear<B>,
    #[module(skip)]
    pub out_dim: usize,
}

fn build(_p: &LinearParams, ctx: &BuildContext) -> Result<LinearDecoder<B>, PluginError> {
    ctx.decoder_dims()?;
    Ok(LinearDecoder {
        pred: linear(ctx.encoder_dim, ctx.target_dim, &ctx.device),
        out_dim: ctx.target_dim,
    })
}

impl DecoderModule for LinearDecoder<B> {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3> {
        linear3(&self.pred, encoded.patch_tokens(mask.plan.num_patches))
    }

    fn out_dim(&self) -> usize {
        self.out_dim
    }

    fn accepts(&self, mode: MaskMode) -> bool {
        mode == MaskMode::MaskToken
    }
}

umae_api::register!(
    Decoder,
    "linear",
    LinearParams,
    build,
    "SimMIM linear head: each patch token to its patch's target values; needs a MaskToken encoder (Xie et al. 2022)"
);
