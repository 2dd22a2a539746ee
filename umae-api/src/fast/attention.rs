//! The core of multi-head self-attention as one operation, one image per task.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::tensor::{activation, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{fused_cpu_f32, host_tensor, math, primitive_vec, simd};
use crate::precision::Precision;
use crate::{Device, B};

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
    // Moved out, not cloned (the graph needs only the node): the qkv projection's output is
    // held by nothing else, so it reaches the host without a copy.
    let input = Arc::new(primitive_vec(qkv.primitive));
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

/// `dst = beta · lhs · rhs` on one thread (the caller runs one image per task); see
/// [`super::gemm_strided`] for the operands.
///
/// # Safety
/// As [`super::gemm_strided`].
#[inline(always)]
unsafe fn product(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    super::gemm_strided(
        dims,
        (dst, dst_rs),
        false,
        lhs,
        rhs,
        beta,
        gemm::Parallelism::None,
    )
}

/// One image: `x` its `[T, 3D]` qkv rows, `o` its `[T, D]` output rows, `p` its `[H, T, T]`
/// attention weights. Per head: `S = Q Kᵀ / √hd`, `P = softmax(S)` row by row, `O = P V`, the
/// two products through the gemm crate's kernels on strided views of the qkv rows.
fn attention_forward(g: &AttnGeometry, x: &[f32], o: &mut [f32], p: &mut [f32]) {
    let (t, d, hd) = (g.t, g.d, g.hd);
    let w = 3 * d;
    assert!(x.len() >= t * w && o.len() >= t * d && p.len() >= g.heads * t * t);
    for h in 0..g.heads {
        let (q, k, v) = (&x[h * hd..], &x[d + h * hd..], &x[2 * d + h * hd..]);
        let p = &mut p[h * t * t..(h + 1) * t * t];
        // SAFETY: the views stay inside x, p and o (checked above); the outputs are distinct
        // buffers from the inputs.
        unsafe {
            product(
                (t, t, hd),
                p.as_mut_ptr(),
                t,
                (q.as_ptr(), w, 1),
                (k.as_ptr(), 1, w),
                g.scale,
            );
        }
        for row in p.chunks_exact_mut(t) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = math::exp(*s - max);
                sum += *s;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|s| *s *= inv);
        }
        // SAFETY: as above.
        unsafe {
            product(
                (t, hd, t),
                o[h * hd..].as_mut_ptr(),
                d,
                (p.as_ptr(), t, 1),
                (v.as_ptr(), w, 1),
                1.0,
            );
        }
    }
}

/// One image's gradients: `dout` its `[T, D]` output gradient, `dx` its `[T, 3D]` qkv gradient
/// (every element written). Per head: `dP = dO Vᵀ`, `dV = Pᵀ dO`,
/// `dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hd`, `dQ = dS K`, `dK = dSᵀ Q`.
fn attention_backward(g: &AttnGeometry, x: &[f32], p: &[f32], dout: &[f32], dx: &mut [f32]) {
    let (t, d, hd) = (g.t, g.d, g.hd);
    let w = 3 * d;
    assert!(x.len() >= t * w && dx.len() >= t * w && dout.len() >= t * d);
    assert!(p.len() >= g.heads * t * t);
    let mut ds = vec![0.0f32; t * t];
    for h in 0..g.heads {
        let (qo, ko, vo) = (h * hd, d + h * hd, 2 * d + h * hd);
        let p = &p[h * t * t..(h + 1) * t * t];
        let go = &dout[h * hd..];
        // SAFETY: every view stays inside its buffer (checked above); ds and dx are distinct
        // from the inputs.
        unsafe {
            product(
                (t, t, hd),
                ds.as_mut_ptr(),
                t,
                (go.as_ptr(), d, 1),
                (x[vo..].as_ptr(), 1, w),
                1.0,
            );
            product(
                (t, hd, t),
                dx[vo..].as_mut_ptr(),
                w,
                (p.as_ptr(), 1, t),
                (go.as_ptr(), d, 1),
                1.0,
            );
        }
        for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
            let weighted: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
            for (s, &pv) in dsr.iter_mut().zip(pr) {
                *s = pv * (*s - weighted) * g.scale;
            }
        }
        // SAFETY: as above.
        unsafe {
            product(
                (t, hd, t),
                dx[qo..].as_mut_ptr(),
                w,
                (ds.as_ptr(), t, 1),
                (x[ko..].as_ptr(), w, 1),
                1.0,
            );
            product(
                (t, hd, t),
                dx[ko..].as_mut_ptr(),
                w,
                (ds.as_ptr(), 1, t),
                (x[qo..].as_ptr(), w, 1),
                1.0,
            );
        }
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
            let dout = primitive_vec(grad);
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
