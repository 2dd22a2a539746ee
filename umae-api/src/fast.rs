//! Fused CPU kernels for hot element-wise parts of the training step.
//!
//! burn 0.21's CPU backend evaluates the exact GELU one element at a time on one thread, and
//! its backward pass evaluates erf a second time. [`gelu`] computes GELU and its derivative in
//! one pass on every core and keeps the derivative (in place of the input that burn keeps) for
//! the backward pass, which is then one multiplication, so erf runs once per element per step. The
//! values are those of the exact GELU (`0.5 x (1 + erf(x / √2))`, the same libm erf); other
//! devices and dtypes use burn's own GELU. [`layer_norm`] does the same for LayerNorm, and
//! [`attention`] for the core of multi-head self-attention.
//!
//! `UMAE_FUSED=0` in the environment turns these kernels off (burn's own operations everywhere),
//! and `UMAE_FUSED=gelu` (a comma-separated list of `gelu`, `layer_norm`, `attention`) keeps only
//! those on:
//! to measure each in one build, or to rule them out when a result looks wrong.

use std::sync::{Arc, OnceLock};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::tensor::{activation, DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use crate::precision::Precision;
use crate::{Device, Inner, B};

/// Elements per parallel task: large enough to amortise scheduling, small enough to spread
/// a ViT-T MLP activation over several cores.
const CHUNK: usize = 16 * 1024;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Whether the fused CPU kernel `name` is on: always, unless `UMAE_FUSED` (read once) is `0` or
/// a list of kernel names without it.
pub fn enabled(name: &str) -> bool {
    static ON: OnceLock<Option<Vec<String>>> = OnceLock::new();
    let on = ON.get_or_init(|| {
        let v = std::env::var("UMAE_FUSED").ok()?;
        let v = v.trim();
        (v != "1" && !v.is_empty()).then(|| v.split(',').map(|s| s.trim().to_string()).collect())
    });
    on.as_ref()
        .is_none_or(|names| names.iter().any(|n| n == name))
}

/// Whether `x` takes the fused CPU kernel `name`: on the CPU, in f32, with the kernel enabled.
fn fused_cpu_f32<const D: usize>(name: &str, x: &Tensor<B, D>) -> bool {
    enabled(name) && matches!(x.device(), Device::Flex(_)) && x.dtype() == DType::F32
}

/// Exact GELU, `x Φ(x)`, differentiable. On the CPU in f32 it runs on all cores and its
/// backward reuses the derivative computed with it; elsewhere it is `burn::tensor::activation::gelu`.
pub fn gelu<const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if !fused_cpu_f32("gelu", &x) {
        return activation::gelu(x);
    }
    let device = x.device();
    let x = x.into_primitive().tensor();
    let inner = Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let shape = inner.shape();
    let input = inner
        .into_data()
        .into_vec::<f32>()
        .expect("an f32 tensor reads as f32");
    let mut out = vec![0.0f32; input.len()];
    let mut slope = vec![0.0f32; input.len()];
    // x Φ(x), and its derivative Φ(x) + x φ(x).
    input
        .par_chunks(CHUNK)
        .zip(out.par_chunks_mut(CHUNK))
        .zip(slope.par_chunks_mut(CHUNK))
        .for_each(|((x, y), d)| {
            for i in 0..x.len() {
                let cdf = 0.5 * (1.0 + libm::erff(x[i] * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * (-0.5 * x[i] * x[i]).exp();
                y[i] = x[i] * cdf;
                d[i] = cdf + x[i] * pdf;
            }
        });
    let out = host_tensor::<D>(out, &shape, &device);
    let state = GeluState {
        slope: Arc::new(slope),
        shape,
        device,
    };
    let prep = GeluBackward::<D>
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn host_tensor<const D: usize>(
    values: Vec<f32>,
    shape: &burn::tensor::Shape,
    device: &Device,
) -> burn::tensor::ops::FloatTensor<Inner> {
    Tensor::<Inner, D>::from_data(TensorData::new(values, shape.clone()), device)
        .into_primitive()
        .tensor()
}

#[derive(Debug)]
struct GeluBackward<const D: usize>;

/// What the backward pass of [`gelu`] needs: the derivative at the input, on the host.
#[derive(Clone)]
struct GeluState {
    slope: Arc<Vec<f32>>,
    shape: burn::tensor::Shape,
    device: Device,
}

impl std::fmt::Debug for GeluState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GeluState({:?})", self.shape)
    }
}

impl<const D: usize> Backward<burn::Dispatch, 1> for GeluBackward<D> {
    type State = GeluState;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        unary::<burn::Dispatch, _>(ops.parents, ops.node, grads, |grad| {
            let grad = Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(grad))
                .into_data()
                .into_vec::<f32>()
                .expect("an f32 gradient");
            let mut out = vec![0.0f32; grad.len()];
            out.par_chunks_mut(CHUNK)
                .zip(grad.par_chunks(CHUNK))
                .zip(s.slope.par_chunks(CHUNK))
                .for_each(|((o, g), d)| {
                    for i in 0..o.len() {
                        o[i] = g[i] * d[i];
                    }
                });
            host_tensor::<D>(out, &s.shape, &s.device)
        });
    }
}

/// LayerNorm over the last dimension, `(x - mean) / sqrt(var + epsilon) * gamma + beta` with
/// the biased variance (as PyTorch and burn), differentiable in `x`, `gamma` and `beta`.
///
/// burn 0.21's autodiff backend has no LayerNorm of its own: it records the mean, variance,
/// subtraction, division, scale and shift as separate single-threaded operations and walks
/// them all again backwards. On the CPU in f32 this computes the forward pass row by row on
/// every core, keeps the normalised rows and each row's 1/σ, and computes all three gradients
/// in one parallel pass: `dx = (g - mean(g) - x̂ mean(g x̂)) / σ` with `g = dy γ`,
/// `dγ = Σ dy x̂`, `dβ = Σ dy`. Elsewhere it is burn's LayerNorm with the same `epsilon`.
pub fn layer_norm<const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    if !(fused_cpu_f32("layer_norm", &x)
        && gamma.dtype() == DType::F32
        && beta.dtype() == DType::F32)
    {
        return Tensor::from_primitive(TensorPrimitive::Float(
            <B as burn::tensor::ops::ModuleOps<B>>::layer_norm(
                x.into_primitive().tensor(),
                gamma.into_primitive().tensor(),
                Some(beta.into_primitive().tensor()),
                epsilon,
            ),
        ));
    }
    let device = x.device();
    let shape = x.shape();
    let width = shape[D - 1];
    let [x, gamma, beta] = [
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    ];
    let read = |t: &burn::tensor::ops::FloatTensor<B>| {
        Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(t.primitive.clone()))
            .into_data()
            .into_vec::<f32>()
            .expect("an f32 tensor reads as f32")
    };
    let (input, g, b) = (read(&x), read(&gamma), read(&beta));
    let rows = input.len() / width.max(1);
    let mut out = vec![0.0f32; input.len()];
    let mut normed = vec![0.0f32; input.len()];
    let mut inv_std = vec![0.0f32; rows];
    let rows_per_task = (CHUNK / width.max(1)).max(1);
    input
        .par_chunks(rows_per_task * width)
        .zip(out.par_chunks_mut(rows_per_task * width))
        .zip(normed.par_chunks_mut(rows_per_task * width))
        .zip(inv_std.par_chunks_mut(rows_per_task))
        .for_each(|(((x, y), n), r)| {
            for (i, r) in r.iter_mut().enumerate() {
                let span = i * width..(i + 1) * width;
                let (x, y, n) = (&x[span.clone()], &mut y[span.clone()], &mut n[span]);
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
                let rstd = 1.0 / (var + epsilon).sqrt();
                for j in 0..width {
                    n[j] = ((x[j] as f64 - mean) * rstd) as f32;
                    y[j] = n[j] * g[j] + b[j];
                }
                *r = rstd as f32;
            }
        });
    let out = host_tensor::<D>(out, &shape, &device);
    let state = NormState {
        normed: Arc::new(normed),
        inv_std: Arc::new(inv_std),
        gamma: Arc::new(g),
        shape,
        device,
    };
    let prep = LayerNormBackward::<D>
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct LayerNormBackward<const D: usize>;

/// What the backward pass of [`layer_norm`] needs, on the host: the normalised input, each
/// row's 1/σ and the scale γ.
#[derive(Clone)]
struct NormState {
    normed: Arc<Vec<f32>>,
    inv_std: Arc<Vec<f32>>,
    gamma: Arc<Vec<f32>>,
    shape: burn::tensor::Shape,
    device: Device,
}

impl std::fmt::Debug for NormState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NormState({:?})", self.shape)
    }
}

impl<const D: usize> Backward<burn::Dispatch, 3> for LayerNormBackward<D> {
    type State = NormState;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let [x_node, gamma_node, beta_node] = ops.parents;
        let grad = grads.consume::<burn::Dispatch>(&ops.node);
        let dy = Tensor::<Inner, D>::from_primitive(TensorPrimitive::Float(grad))
            .into_data()
            .into_vec::<f32>()
            .expect("an f32 gradient");
        let width = s.gamma.len();
        let rows_per_task = (CHUNK / width.max(1)).max(1);
        let mut dx = vec![0.0f32; dy.len()];
        // Each task returns its rows' partial sums of dy x̂ and dy, added up afterwards.
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dy
            .par_chunks(rows_per_task * width)
            .zip(dx.par_chunks_mut(rows_per_task * width))
            .zip(s.normed.par_chunks(rows_per_task * width))
            .zip(s.inv_std.par_chunks(rows_per_task))
            .map(|(((dy, dx), n), r)| {
                let mut dgamma = vec![0.0f64; width];
                let mut dbeta = vec![0.0f64; width];
                for (i, &rstd) in r.iter().enumerate() {
                    let span = i * width..(i + 1) * width;
                    let (dy, dx, n) = (&dy[span.clone()], &mut dx[span.clone()], &n[span]);
                    let (mut mean_g, mut mean_gn) = (0.0f64, 0.0f64);
                    for j in 0..width {
                        let g = (dy[j] * s.gamma[j]) as f64;
                        mean_g += g;
                        mean_gn += g * n[j] as f64;
                        dgamma[j] += (dy[j] * n[j]) as f64;
                        dbeta[j] += dy[j] as f64;
                    }
                    mean_g /= width as f64;
                    mean_gn /= width as f64;
                    for j in 0..width {
                        let g = (dy[j] * s.gamma[j]) as f64;
                        dx[j] = ((g - mean_g - n[j] as f64 * mean_gn) * rstd as f64) as f32;
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let mut dgamma = vec![0.0f64; width];
        let mut dbeta = vec![0.0f64; width];
        for (pg, pb) in partial {
            for j in 0..width {
                dgamma[j] += pg[j];
                dbeta[j] += pb[j];
            }
        }
        let vector = |v: Vec<f64>| {
            host_tensor::<1>(
                v.into_iter().map(|x| x as f32).collect(),
                &burn::tensor::Shape::new([width]),
                &s.device,
            )
        };
        if let Some(node) = x_node {
            grads.register::<burn::Dispatch>(node.id, host_tensor::<D>(dx, &s.shape, &s.device));
        }
        if let Some(node) = gamma_node {
            grads.register::<burn::Dispatch>(node.id, vector(dgamma));
        }
        if let Some(node) = beta_node {
            grads.register::<burn::Dispatch>(node.id, vector(dbeta));
        }
    }
}

/// The core of multi-head self-attention, `softmax(q kᵀ / √hd) v` for every head, from the
/// fused qkv projection to the input of the output projection: `qkv` is `[B T, 3 D]` with rows
/// `[q | k | v]`, each `D = heads × hd` wide and split into heads in order (the layout of timm
/// and MAE); the result is `[B T, D]` with the heads side by side. Products in the current
/// [`precision`](crate::precision), the softmax in f32.
///
/// burn 0.21 runs this as batched matrix products of `T × hd` blocks (for a ViT-T at T = 17 or
/// 65, far too small for a general matrix kernel to be efficient or to split over cores), a
/// softmax and their backward passes as separate operations, with layout copies between them.
/// On the CPU in f32 this is one operation: each task takes one image's rows, computes the
/// scores, the softmax and the weighted sum of every head, and keeps the attention weights;
/// the backward pass computes the gradients of q, k and v for one image in one go
/// (`dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ - rowsum(P ⊙ dO Vᵀ))`, `dQ = dS K / √hd`, `dK = dSᵀ Q / √hd`).
/// Elsewhere, and with bf16 products, it is burn's operations.
pub fn attention(qkv: Tensor<B, 2>, batch: usize, heads: usize) -> Tensor<B, 2> {
    let [rows, width] = qkv.dims();
    assert!(
        batch > 0 && rows % batch == 0 && width % (3 * heads) == 0,
        "attention: qkv [{rows}, {width}] does not split into {batch} images and 3 x {heads} heads"
    );
    let (t, d) = (rows / batch, width / 3);
    let hd = d / heads;
    let scale = (hd as f64).powf(-0.5);
    if !(fused_cpu_f32("attention", &qkv) && crate::precision::current() == Precision::F32) {
        // q, k and v as strided views of qkv ([B, T, 3, H, hd] read as [B, H, T, hd]): burn's
        // batched matmul takes strides, so no copy is made here. The scale goes on the [T, T]
        // scores, smaller than q when T < hd.
        let qkv = qkv.reshape([batch, t, 3, heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .narrow(2, i, 1)
                .squeeze_dim::<4>(2)
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = crate::precision::matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
        return crate::precision::matmul(activation::softmax(scores, 3), v)
            .swap_dims(1, 2)
            .reshape([rows, d]);
    }
    let device = qkv.device();
    let qkv = qkv.into_primitive().tensor();
    let input = Arc::new(
        Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(qkv.primitive.clone()))
            .into_data()
            .into_vec::<f32>()
            .expect("an f32 tensor reads as f32"),
    );
    let geo = AttnGeometry {
        t,
        d,
        heads,
        hd,
        scale: scale as f32,
    };
    let mut out = vec![0.0f32; rows * d];
    let mut probs = vec![0.0f32; batch * heads * t * t];
    out.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(heads * t * t))
        .zip(input.par_chunks(t * width))
        .for_each(|((o, p), x)| simd::run(|| attention_forward(&geo, x, o, p)));
    let out = host_tensor::<2>(out, &burn::tensor::Shape::new([rows, d]), &device);
    let state = AttnState {
        qkv: input,
        probs: Arc::new(probs),
        geo,
        rows,
        device,
    };
    let prep = AttentionBackward
        .prepare::<NoCheckpointing>([qkv.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prep {
        OpsKind::Tracked(prep) => prep.finish(state, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Sizes of one image's attention: tokens, model width, heads, head width, 1/√hd.
#[derive(Debug, Clone, Copy)]
struct AttnGeometry {
    t: usize,
    d: usize,
    heads: usize,
    hd: usize,
    scale: f32,
}

/// One image: `x` its `[T, 3D]` qkv rows, `o` its `[T, D]` output rows, `p` its `[H, T, T]`
/// attention weights.
#[inline(always)]
fn attention_forward(g: &AttnGeometry, x: &[f32], o: &mut [f32], p: &mut [f32]) {
    let (t, d, hd) = (g.t, g.d, g.hd);
    let w = 3 * d;
    for h in 0..g.heads {
        let (qo, ko, vo) = (h * hd, d + h * hd, 2 * d + h * hd);
        let p = &mut p[h * t * t..(h + 1) * t * t];
        for i in 0..t {
            let q = &x[i * w + qo..i * w + qo + hd];
            let row = &mut p[i * t..(i + 1) * t];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in row.iter_mut().enumerate() {
                *s = dot(q, &x[j * w + ko..j * w + ko + hd]) * g.scale;
                max = max.max(*s);
            }
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let out = &mut o[i * d + h * hd..i * d + (h + 1) * hd];
            for (j, s) in row.iter_mut().enumerate() {
                *s *= inv;
                axpy(*s, &x[j * w + vo..j * w + vo + hd], out);
            }
        }
    }
}

/// One image's gradients: `dout` its `[T, D]` output gradient, `dx` its `[T, 3D]` qkv gradient.
#[inline(always)]
fn attention_backward(g: &AttnGeometry, x: &[f32], p: &[f32], dout: &[f32], dx: &mut [f32]) {
    let (t, d, hd) = (g.t, g.d, g.hd);
    let w = 3 * d;
    let mut ds = vec![0.0f32; t];
    for h in 0..g.heads {
        let (qo, ko, vo) = (h * hd, d + h * hd, 2 * d + h * hd);
        let p = &p[h * t * t..(h + 1) * t * t];
        for i in 0..t {
            let prow = &p[i * t..(i + 1) * t];
            let go = &dout[i * d + h * hd..i * d + (h + 1) * hd];
            // dP[i, j] = dO_i · v_j; dV_j += P[i, j] dO_i.
            let mut weighted = 0.0f32;
            for j in 0..t {
                let dp = dot(go, &x[j * w + vo..j * w + vo + hd]);
                ds[j] = dp;
                weighted += prow[j] * dp;
                axpy(prow[j], go, &mut dx[j * w + vo..j * w + vo + hd]);
            }
            // dS = P ⊙ (dP - Σ P dP), scaled; dQ_i += dS[i, j] k_j; dK_j += dS[i, j] q_i.
            for j in 0..t {
                let s = prow[j] * (ds[j] - weighted) * g.scale;
                let (k_j, q_i) = (j * w + ko, i * w + qo);
                axpy(s, &x[k_j..k_j + hd], &mut dx[q_i..q_i + hd]);
                axpy(s, &x[q_i..q_i + hd], &mut dx[k_j..k_j + hd]);
            }
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so that the loop vectorises without reordering a single sum.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

mod simd {
    /// Run `f` compiled for AVX2 where the CPU has it (the build targets baseline x86-64), so
    /// that the small vector loops of the attention kernels use 256-bit registers.
    #[inline(always)]
    pub fn run<R>(f: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { avx2(f) };
            }
        }
        f()
    }
}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass of [`attention`] needs, on the host: the qkv input and the
/// attention weights.
#[derive(Clone)]
struct AttnState {
    qkv: Arc<Vec<f32>>,
    probs: Arc<Vec<f32>>,
    geo: AttnGeometry,
    rows: usize,
    device: Device,
}

impl std::fmt::Debug for AttnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AttnState({:?}, {} rows)", self.geo, self.rows)
    }
}

impl Backward<burn::Dispatch, 1> for AttentionBackward {
    type State = AttnState;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        unary::<burn::Dispatch, _>(ops.parents, ops.node, grads, |grad| {
            let dout = Tensor::<Inner, 2>::from_primitive(TensorPrimitive::Float(grad))
                .into_data()
                .into_vec::<f32>()
                .expect("an f32 gradient");
            let g = s.geo;
            let mut dqkv = vec![0.0f32; s.qkv.len()];
            dqkv.par_chunks_mut(g.t * 3 * g.d)
                .zip(s.qkv.par_chunks(g.t * 3 * g.d))
                .zip(s.probs.par_chunks(g.heads * g.t * g.t))
                .zip(dout.par_chunks(g.t * g.d))
                .for_each(|(((dx, x), p), go)| simd::run(|| attention_backward(&g, x, p, go, dx)));
            host_tensor::<2>(
                dqkv,
                &burn::tensor::Shape::new([s.rows, 3 * g.d]),
                &s.device,
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn matches_burns_exact_gelu_forward_and_backward() {
        let device = Device::Flex(Default::default());
        // More elements than one chunk, so that several tasks run; a wide range of inputs.
        let x = Tensor::<B, 2>::random([50, 1000], Distribution::Normal(0.0, 3.0), &device);
        let upstream = Tensor::<B, 2>::random([50, 1000], Distribution::Normal(0.0, 1.0), &device);
        let grad_of = |f: &dyn Fn(Tensor<B, 2>) -> Tensor<B, 2>| {
            let x = x.clone().detach().require_grad();
            let y = f(x.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (y.into_data(), x.grad(&grads).unwrap().into_data())
        };
        let (y_ref, g_ref) = grad_of(&|x| activation::gelu(x));
        let (y, g) = grad_of(&|x| gelu(x));
        y.assert_approx_eq::<f32>(&y_ref, burn::tensor::Tolerance::absolute(1e-6));
        g.assert_approx_eq::<f32>(&g_ref, burn::tensor::Tolerance::absolute(1e-5));
    }

    #[test]
    fn works_without_gradient_tracking_and_on_other_dtypes() {
        let device = Device::Flex(Default::default());
        let x = Tensor::<B, 1>::from_floats([-3.0, -1.0, 0.0, 0.5, 2.0], &device);
        let y: Vec<f32> = gelu(x.clone()).into_data().into_vec().unwrap();
        let want = [-0.004_049_7, -0.158_655_25, 0.0, 0.345_731_14, 1.954_499_8];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        // f64 takes burn's path and agrees.
        let y64: Vec<f64> = gelu(x.cast(DType::F64)).into_data().into_vec().unwrap();
        for (a, b) in y64.iter().zip(want) {
            assert!((*a as f32 - b).abs() < 1e-6, "{y64:?}");
        }
    }

    #[test]
    fn layer_norm_matches_burns_forward_and_all_three_gradients() {
        let device = Device::Flex(Default::default());
        // Rows of two widths (one ViT-T wide, one odd), shifted and scaled so that the mean
        // and variance matter; several tasks for the wide one.
        for (rows, width) in [(300usize, 192usize), (7, 37)] {
            let x =
                Tensor::<B, 3>::random([3, rows, width], Distribution::Normal(1.5, 2.0), &device);
            let gamma = Tensor::<B, 1>::random([width], Distribution::Normal(1.0, 0.5), &device);
            let beta = Tensor::<B, 1>::random([width], Distribution::Normal(0.0, 0.5), &device);
            let upstream =
                Tensor::<B, 3>::random([3, rows, width], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = x.clone().detach().require_grad();
                let g = gamma.clone().detach().require_grad();
                let b = beta.clone().detach().require_grad();
                let y = if fused {
                    layer_norm(x.clone(), g.clone(), b.clone(), 1e-6)
                } else {
                    let mut norm = burn::nn::LayerNormConfig::new(width)
                        .with_epsilon(1e-6)
                        .init::<B>(&device);
                    norm.gamma = burn::module::Param::from_tensor(g.clone());
                    norm.beta = Some(burn::module::Param::from_tensor(b.clone()));
                    let y = norm.forward(x.clone());
                    let grads = (y.clone() * upstream.clone()).sum().backward();
                    let (pg, pb) = (norm.gamma.val(), norm.beta.as_ref().unwrap().val());
                    return (
                        y.into_data(),
                        x.grad(&grads).unwrap().into_data(),
                        pg.grad(&grads).unwrap().into_data(),
                        pb.grad(&grads).unwrap().into_data(),
                    );
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (
                    y.into_data(),
                    x.grad(&grads).unwrap().into_data(),
                    g.grad(&grads).unwrap().into_data(),
                    b.grad(&grads).unwrap().into_data(),
                )
            };
            let want = run(false);
            let got = run(true);
            let close = |a: &TensorData, b: &TensorData, tol: f32| {
                a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(tol))
            };
            close(&got.0, &want.0, 1e-5);
            close(&got.1, &want.1, 1e-4);
            // dγ and dβ sum over 3 x rows values.
            close(&got.2, &want.2, 1e-4 * (rows as f32).sqrt());
            close(&got.3, &want.3, 1e-4 * (rows as f32).sqrt());
        }
    }

    #[test]
    fn layer_norm_without_tracking_and_in_f64_agrees() {
        let device = Device::Flex(Default::default());
        let x = Tensor::<B, 2>::from_floats([[1.0, 2.0, 4.0], [-1.0, 0.0, 1.0]], &device);
        let gamma = Tensor::<B, 1>::from_floats([1.0, 2.0, 0.5], &device);
        let beta = Tensor::<B, 1>::from_floats([0.0, 1.0, -1.0], &device);
        // Row 1: mean 7/3, variance 14/9; row 2: mean 0, variance 2/3.
        let want = {
            let (m, sd) = (7.0f64 / 3.0, (14.0f64 / 9.0 + 1e-6).sqrt());
            let sd2 = (2.0f64 / 3.0 + 1e-6).sqrt();
            [
                (1.0 - m) / sd,
                2.0 * (2.0 - m) / sd + 1.0,
                0.5 * (4.0 - m) / sd - 1.0,
                -1.0 / sd2,
                1.0,
                0.5 / sd2 - 1.0,
            ]
        };
        let y: Vec<f32> = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-6)
            .into_data()
            .into_vec()
            .unwrap();
        let y64: Vec<f64> = layer_norm(
            x.cast(DType::F64),
            gamma.cast(DType::F64),
            beta.cast(DType::F64),
            1e-6,
        )
        .into_data()
        .into_vec()
        .unwrap();
        for i in 0..6 {
            assert!((y[i] as f64 - want[i]).abs() < 1e-5, "{y:?} vs {want:?}");
            assert!((y64[i] - want[i]).abs() < 1e-5, "{y64:?} vs {want:?}");
        }
    }

    #[test]
    fn attention_matches_burns_composite_forward_and_backward() {
        let device = Device::Flex(Default::default());
        // ViT-T's encoder (17 tokens, 3 heads of 64) and decoder (65 tokens, 4 heads of 32),
        // and an odd size whose head width is not a multiple of the vector length.
        for (batch, t, heads, hd) in [
            (4usize, 17usize, 3usize, 64usize),
            (3, 65, 4, 32),
            (2, 5, 3, 7),
        ] {
            let width = 3 * heads * hd;
            let qkv =
                Tensor::<B, 2>::random([batch * t, width], Distribution::Normal(0.0, 1.5), &device);
            let upstream = Tensor::<B, 2>::random(
                [batch * t, heads * hd],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |fused: bool| {
                let x = qkv.clone().detach().require_grad();
                let y = if fused {
                    attention(x.clone(), batch, heads)
                } else {
                    composite_attention(x.clone(), batch, heads)
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (y.into_data(), x.grad(&grads).unwrap().into_data())
            };
            let (y_ref, g_ref) = run(false);
            let (y, g) = run(true);
            y.assert_approx_eq::<f32>(&y_ref, burn::tensor::Tolerance::absolute(1e-5));
            g.assert_approx_eq::<f32>(&g_ref, burn::tensor::Tolerance::absolute(1e-4));
        }
    }

    /// burn's operations for attention, written out as [`attention`] runs them off the fused
    /// path (the reference for the fused kernel).
    fn composite_attention(qkv: Tensor<B, 2>, batch: usize, heads: usize) -> Tensor<B, 2> {
        let [rows, width] = qkv.dims();
        let (t, d) = (rows / batch, width / 3);
        let hd = d / heads;
        let qkv = qkv.reshape([batch, t, 3, heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .narrow(2, i, 1)
                .squeeze_dim::<4>(2)
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((hd as f64).powf(-0.5));
        activation::softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([rows, d])
    }

    #[test]
    fn attention_falls_back_with_bf16_products_and_without_tracking() {
        let device = Device::Flex(Default::default());
        let qkv = Tensor::<B, 2>::random([2 * 9, 3 * 16], Distribution::Normal(0.0, 1.0), &device);
        let want: Vec<f32> = composite_attention(qkv.clone(), 2, 2)
            .into_data()
            .into_vec()
            .unwrap();
        // Untracked input: the fused path without a graph.
        let got: Vec<f32> = attention(qkv.clone(), 2, 2).into_data().into_vec().unwrap();
        // bf16 products: burn's path, close to f32.
        let bf16: Vec<f32> = crate::precision::with(Precision::Bf16, || attention(qkv, 2, 2))
            .into_data()
            .into_vec()
            .unwrap();
        for i in 0..want.len() {
            assert!(
                (got[i] - want[i]).abs() < 1e-5,
                "{i}: {} vs {}",
                got[i],
                want[i]
            );
            assert!(
                (bf16[i] - want[i]).abs() < 5e-2,
                "{i}: {} vs {}",
                bf16[i],
                want[i]
            );
        }
    }
}
