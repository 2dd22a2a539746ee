use umae_api::burn;
use umae_api::burn::module::{Module, Param};
use umae_api::burn::nn::{LayerNorm, Linear};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::{Distribution, Tensor, TensorData};
use umae_api::{BuildContext, DecoderModule, EncoderOutput, Mask, MaskMode, PluginError, B};
use umae_layers::{gather_tokens, layer_norm, linear, linear3, norm, sincos_2d, Block};

umae_api::params! {
    /// Parameters of the `mae` decoder.
    pub struct MaeDecoderParams {
        /// Decoder token width (MAE: 512).
        pub dim: usize = 512,
        /// Decoder blocks (MAE: 8).
        pub depth: usize = 8,
        /// Attention heads (MAE: 16).
        pub heads: usize = 16,
        /// MLP hidden width as a multiple of `dim`.
        pub mlp_ratio: f64 = 4.0,
    }
}

/// MAE's lightweight transformer decoder: embeds the visible tokens, inserts a shared mask
/// token for every hidden patch, restores patch order, adds its own fixed positions, and
/// predicts each patch's target.
#[derive(Module, Debug)]
pub struct MaeDecoder<B: Backend> {
    pub embed: Linear<B>,
    pub mask_token: Param<Tensor<B, 1>>,
    /// Fixed sin-cos position embedding `[prefix + N, dim]`.
    pub pos_embed: Tensor<B, 2>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    pub pred: Linear<B>,
    #[module(skip)]
    pub dim: usize,
    #[module(skip)]
    pub out_dim: usize,
}

fn build(p: &MaeDecoderParams, ctx: &BuildContext) -> Result<MaeDecoder<B>, PluginError> {
    let g = ctx.geometry()?;
    let (dim, heads) = (p.dim, p.heads);
    if dim == 0 || heads == 0 || dim % heads != 0 || dim % 4 != 0 {
        return Err(PluginError::Invalid(format!(
            "dim {dim} must be divisible by heads {heads} and by 4"
        )));
    }
    ctx.decoder_dims()?;
    let device = &ctx.device;
    let (gh, gw) = g.grid();
    let pos = sincos_2d(dim, gh, gw, 1);
    Ok(MaeDecoder {
        embed: linear(ctx.encoder_dim, dim, device),
        mask_token: Param::from_tensor(Tensor::random(
            [dim],
            Distribution::Normal(0.0, 0.02),
            device,
        )),
        pos_embed: Tensor::from_data(TensorData::new(pos, [1 + g.num_patches(), dim]), device),
        blocks: (0..p.depth)
            .map(|_| Block::new(dim, heads, p.mlp_ratio, device))
            .collect(),
        norm: layer_norm(dim, device),
        pred: linear(dim, ctx.target_dim, device),
        dim,
        out_dim: ctx.target_dim,
    })
}

impl DecoderModule for MaeDecoder<B> {
    fn forward(&self, encoded: &EncoderOutput, mask: &Mask) -> Tensor<B, 3> {
        let x = linear3(&self.embed, encoded.tokens.clone());
        let [b, t, d] = x.dims();
        let n = mask.plan.num_patches;
        let prefix = encoded.prefix;
        let patches = x.clone().slice([0..b, prefix..t]);
        let patches = if t - prefix == n {
            // The encoder kept every position (mask-token mode): already in patch order.
            patches
        } else {
            let missing = n - (t - prefix);
            let tokens = self
                .mask_token
                .val()
                .reshape([1, 1, d])
                .expand([b, missing, d]);
            gather_tokens(
                Tensor::cat(vec![patches, tokens], 1),
                mask.ids_restore.clone(),
            )
        };
        // Class tokens keep the first position embedding slot (zeros).
        let cls = x.slice([0..b, 0..prefix]);
        let pos_cls = self.pos_embed.clone().narrow(0, 0, 1).reshape([1, 1, d]);
        let pos = self.pos_embed.clone().narrow(0, 1, n).reshape([1, n, d]);
        let mut y = Tensor::cat(vec![cls + pos_cls, patches + pos], 1);
        for block in &self.blocks {
            y = block.forward(y);
        }
        let y = linear3(&self.pred, norm(&self.norm, y));
        let total = y.dims()[1];
        y.slice([0..b, prefix..total])
    }

    fn out_dim(&self) -> usize {
        self.out_dim
    }

    fn accepts(&self, _mode: MaskMode) -> bool {
        true
    }

    fn fixed_params(&self) -> usize {
        self.pos_embed.shape().num_elements()
    }
}

umae_api::register!(
    Decoder,
    "mae",
    MaeDecoderParams,
    build,
    "MAE transformer decoder: mask tokens, unshuffle, fixed positions, per-patch prediction (He et al. 2022)"
);
