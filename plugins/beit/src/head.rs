use umae_api::burn;
use umae_api::burn::module::Module;
use umae_api::burn::nn::{LayerNorm, Linear};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, DecoderModule, EncoderOutput, Mask, MaskMode, PluginError, B};
use umae_layers::{layer_norm, linear, linear3, norm};

umae_api::params! {
    /// Parameters of the `token-head` decoder (none: its width is the target's vocabulary).
    pub struct TokenHeadParams {}
}

/// BEiT's prediction head: LayerNorm and a linear map from each patch token to one logit per
/// visual token. It needs a token for every patch, so the encoder must run in MaskToken mode.
#[derive(Module, Debug)]
pub struct TokenHead<B: Backend> {
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    #[module(skip)]
    pub out_dim: usize,
}

fn build(_p: &TokenHeadParams, ctx: &BuildContext) -> Result<TokenHead<B>, PluginError> {
    ctx.decoder_dims()?;
    Ok(TokenHead {
        norm: layer_norm(ctx.encoder_dim, &ctx.device),
        head: linear(ctx.encoder_dim, ctx.target_dim, &ctx.device),
        out_dim: ctx.target_dim,
    })
}

impl DecoderModule for TokenHead<B> {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3> {
        let x = encoded.patch_tokens(mask.plan.num_patches);
        linear3(&self.head, norm(&self.norm, x))
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
    "token-head",
    TokenHeadParams,
    build,
    "BEiT head: LayerNorm + linear from each patch token to the vocabulary; needs a MaskToken encoder (Bao et al. 2022)"
);
