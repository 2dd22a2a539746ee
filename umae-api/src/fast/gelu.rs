//! The exact GELU with its derivative computed in the same pass.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::tensor::{activation, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{fused_cpu_f32, host_tensor, math, primitive_vec, simd, CHUNK};
use crate::{Device, B};

const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU, `x Φ(x)`, differentiable. On the CPU in f32 it runs on all cores and its
/// backward reuses the derivative computed with it; elsewhere it is `burn::tensor::activation::gelu`.
pub fn gelu<const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if !fused_cpu_f32("gelu", &x) {
        return activation::gelu(x);
    }
    let (device, shape) = (x.device(), x.shape());
    let x = x.into_primitive().tensor();
    // The primitive moves out (the graph needs only the node): no copy when nothing else holds
    // the input, as for the output of the Linear before the GELU.
    let input = primitive_vec(x.primitive);
    let mut out = vec![0.0f32; input.len()];
    let mut slope = vec![0.0f32; input.len()];
    // x Φ(x), and its derivative Φ(x) + x φ(x).
    input
        .par_chunks(CHUNK)
        .zip(out.par_chunks_mut(CHUNK))
        .zip(slope.par_chunks_mut(CHUNK))
        .for_each(|((x, y), d)| {
            simd::run(|| {
                for i in 0..x.len() {
                    let cdf = 0.5 * (1.0 + math::erf(x[i] * std::f32::consts::FRAC_1_SQRT_2));
                    let pdf = INV_SQRT_2PI * math::exp(-0.5 * x[i] * x[i]);
                    y[i] = x[i] * cdf;
                    d[i] = cdf + x[i] * pdf;
                }
            })
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
            let grad = primitive_vec(grad);
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution};

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
        // The vectorised erf is within 5e-7 of libm's, so x Φ(x) is within about 1.5e-6 at
        // |x| = 5; the bound is the one asked of every fused kernel (1e-5 on values).
        y.assert_approx_eq::<f32>(&y_ref, burn::tensor::Tolerance::absolute(1e-5));
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
}
