//! Transformer building blocks shared by encoders and decoders.
//!
//! Every Linear runs on a 2-D `[B*T, C]` view: burn 0.21's Linear backward on 3-D input
//! materialises a `[B, C_in, C_out]` tensor, which costs more than twice the time.

use umae_api::burn;
use umae_api::burn::module::{Module, Param};
use umae_api::burn::nn::{LayerNorm, LayerNormConfig, Linear};
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::{Distribution, Tensor};
use umae_api::{fast, Device, B};

/// Linear layer with MAE's initialisation: Xavier-uniform weight, zero bias.
pub fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear<B> {
    let a = (6.0 / (d_in + d_out) as f64).sqrt();
    Linear {
        weight: Param::from_tensor(Tensor::random(
            [d_in, d_out],
            Distribution::Uniform(-a, a),
            device,
        )),
        bias: Some(Param::from_tensor(Tensor::zeros([d_out], device))),
    }
}

/// MAE's LayerNorm epsilon.
pub const NORM_EPSILON: f64 = 1e-6;

/// LayerNorm with MAE's epsilon ([`NORM_EPSILON`]); apply it with [`norm`].
pub fn layer_norm(d: usize, device: &Device) -> LayerNorm<B> {
    LayerNormConfig::new(d)
        .with_epsilon(NORM_EPSILON)
        .init(device)
}

/// Apply a LayerNorm made by [`layer_norm`] through [`umae_api::fast::layer_norm`] (one fused
/// pass each way on the CPU).
pub fn norm<const D: usize>(layer: &LayerNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    match &layer.beta {
        Some(beta) => fast::layer_norm(x, layer.gamma.val(), beta.val(), NORM_EPSILON),
        None => layer.forward(x),
    }
}

/// Apply a Linear to `[B, T, C]` through a 2-D view.
pub fn linear3(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, c] = x.dims();
    let y = dense(layer, x.reshape([b * t, c]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// `x W + b` for `x: [rows, in]`, the product in the current compute precision
/// ([`umae_api::precision`]); the bias is added in f32. One fused operation on the CPU
/// ([`umae_api::fast::linear`]).
pub fn dense(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    dense_add(layer, x, None)
}

/// [`dense`] plus `residual` (`[rows, out]`) when given, in the same operation.
pub fn dense_add(
    layer: &Linear<B>,
    x: Tensor<B, 2>,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    fast::linear(
        x,
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
        residual,
    )
}

/// Multi-head self-attention with one fused qkv projection (the layout of timm and MAE).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    #[module(skip)]
    pub heads: usize,
}

impl Attention<B> {
    pub fn new(dim: usize, heads: usize, device: &Device) -> Self {
        Attention {
            qkv: linear(dim, 3 * dim, device),
            proj: linear(dim, dim, device),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_add(x, None)
    }

    /// [`Attention::forward`] plus `residual` (`[B, T, D]`) when given, added by the output
    /// projection ([`dense_add`]).
    pub fn forward_add(&self, x: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        // Scores, softmax and the weighted sum of every head in one operation
        // ([`umae_api::fast::attention`]), from the qkv rows to the input of the projection.
        let qkv = dense(&self.qkv, x.reshape([b * t, d]));
        let residual = residual.map(|r| r.reshape([b * t, d]));
        dense_add(&self.proj, fast::attention(qkv, b, self.heads), residual).reshape([b, t, d])
    }
}

/// Two-layer MLP with exact GELU ([`umae_api::fast::gelu`]).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_add(x, None)
    }

    /// [`Mlp::forward`] plus `residual` (`[B, T, D]`) when given, added by the second Linear.
    pub fn forward_add(&self, x: Tensor<B, 3>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let y = fast::gelu(dense(&self.fc1, x.reshape([b * t, d])));
        let residual = residual.map(|r| r.reshape([b * t, d]));
        dense_add(&self.fc2, y, residual).reshape([b, t, d])
    }
}

/// Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl Block<B> {
    pub fn new(dim: usize, heads: usize, mlp_ratio: f64, device: &Device) -> Self {
        let hidden = (dim as f64 * mlp_ratio) as usize;
        Block {
            norm1: layer_norm(dim, device),
            attn: Attention::new(dim, heads, device),
            norm2: layer_norm(dim, device),
            mlp: Mlp {
                fc1: linear(dim, hidden, device),
                fc2: linear(hidden, dim, device),
            },
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // Each residual add happens inside the branch's last Linear.
        let x = self.attn.forward_add(norm(&self.norm1, x.clone()), Some(x));
        self.mlp.forward_add(norm(&self.norm2, x.clone()), Some(x))
    }

    /// [`Block::forward`] with stochastic depth: each sample's residual branch is dropped with
    /// probability `rate` and the kept ones are scaled by 1 / (1 - rate).
    pub fn forward_drop_path(&self, x: Tensor<B, 3>, rate: f64) -> Tensor<B, 3> {
        let b = x.dims()[0];
        let device = x.device();
        let keep = 1.0 - rate;
        let mask =
            || Tensor::<B, 3>::random([b, 1, 1], Distribution::Bernoulli(keep), &device) / keep;
        let x = x.clone() + self.attn.forward(norm(&self.norm1, x)) * mask();
        x.clone() + self.mlp.forward(norm(&self.norm2, x)) * mask()
    }
}

/// MAE's fixed 2-D sine-cosine position embedding for a `gh x gw` grid, with a zero row for
/// each of `prefix` class tokens in front: `[prefix + gh*gw, dim]`, row-major over the grid.
/// The first half of the channels encodes the column, the second half the row (as MAE).
pub fn sincos_2d(dim: usize, gh: usize, gw: usize, prefix: usize) -> Vec<f32> {
    assert!(
        dim.is_multiple_of(4),
        "sin-cos position embedding needs dim divisible by 4"
    );
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = vec![0.0f32; prefix * dim];
    for r in 0..gh {
        for c in 0..gw {
            for pos in [c as f64, r as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

/// Split `[B, C, H, W]` into `[B, N, C*p*p]` patches, each flattened in (channel, row, column)
/// order: the layout of a strided convolution's weight `[D, C, p, p]`.
pub fn patchify_chw(images: Tensor<B, 4>, p: usize) -> Tensor<B, 3> {
    let [b, c, h, w] = images.dims();
    let (gh, gw) = (h / p, w / p);
    images
        .reshape([b, c, gh, p, gw, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, gh * gw, c * p * p])
}

/// Gather rows of `[B, T, D]` at `ids: [B, K]` along T.
pub fn gather_tokens(
    x: Tensor<B, 3>,
    ids: Tensor<B, 2, umae_api::burn::tensor::Int>,
) -> Tensor<B, 3> {
    let d = x.dims()[2];
    let [b, k] = ids.dims();
    let idx = ids.reshape([b, k, 1]).expand([b, k, d]);
    x.gather(1, idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_matches_closed_form() {
        let e = sincos_2d(8, 2, 3, 1);
        assert_eq!(e.len(), (1 + 6) * 8);
        assert!(e[..8].iter().all(|v| *v == 0.0));
        // patch (row 1, col 2): channels [sin(2w), cos(2w), sin(1w), cos(1w)] with w = (1, 1e-2)
        let row = &e[(1 + 5) * 8..(1 + 6) * 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in row.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{row:?}");
        }
    }
}
