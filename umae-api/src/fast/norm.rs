//! LayerNorm, forward and all three gradients, each in one parallel pass.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{fused_cpu_f32, host_tensor, primitive_vec, CHUNK};
use crate::{Device, B};

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
    let (input, g, b) = (
        primitive_vec(x.primitive),
        primitive_vec(gamma.primitive),
        primitive_vec(beta.primitive),
    );
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
        let dy = primitive_vec(grad);
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

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
}
