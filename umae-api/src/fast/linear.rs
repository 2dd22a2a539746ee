//! A Linear layer with its bias and an optional residual add in the same matrix product.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{fused_cpu_f32, gemm_strided, host_tensor, primitive_vec, CHUNK};
use crate::precision::{self, Precision};
use crate::{Device, B};

/// `x W + b`, plus `residual` when given, for `x: [rows, in]`, `W: [in, out]`, `b: [out]` and
/// `residual: [rows, out]`; differentiable in all four.
///
/// burn 0.21 runs a Linear as a matrix product and a broadcast add, each on its own pass (the
/// add on one thread), a residual connection as a third, and in the backward pass sums the bias
/// gradient over the rows on one thread. On the CPU in f32 this is one operation: the output
/// starts as the bias (plus the residual, in its own buffer when nothing else holds it) and
/// the product accumulates into it on all cores; the backward pass computes `dx = dy Wᵀ` and
/// `dW = xᵀ dy` on all cores from strided views (no transposed copies), the bias gradient in
/// parallel row blocks, and hands `dy` itself to the residual. Elsewhere, and with bf16
/// products, it is [`precision::linear`] and an add.
pub fn linear(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let [rows, d_in] = x.dims();
    let [w_in, d_out] = weight.dims();
    assert_eq!(
        d_in, w_in,
        "linear: input [{rows}, {d_in}] does not match weight [{w_in}, {d_out}]"
    );
    // fused_cpu_f32 also checks that the kernel is enabled.
    let cpu = |t: &Tensor<B, 2>| fused_cpu_f32("linear", t);
    let fused = cpu(&x)
        && cpu(&weight)
        && bias.as_ref().is_none_or(|b| fused_cpu_f32("linear", b))
        && residual.as_ref().is_none_or(cpu)
        && precision::current() == Precision::F32;
    if !fused {
        let y = precision::linear(x, weight, bias);
        return match residual {
            Some(r) => r + y,
            None => y,
        };
    }
    let device = x.device();
    let x = x.into_primitive().tensor();
    let w = weight.into_primitive().tensor();
    let b = bias.map(|b| b.into_primitive().tensor());
    let r = residual.map(|r| r.into_primitive().tensor());
    let geo = Geometry { rows, d_in, d_out };
    let mut nodes = vec![x.node.clone(), w.node.clone()];
    nodes.extend(b.as_ref().map(|b| b.node.clone()));
    nodes.extend(r.as_ref().map(|r| r.node.clone()));

    // The input moves out of the autodiff tensor (the graph keeps its node), as does the
    // residual, whose buffer becomes the output when nothing else holds it.
    let input = Arc::new(primitive_vec(x.primitive));
    let weights = Arc::new(primitive_vec(w.primitive));
    let bias = b.map(|b| primitive_vec(b.primitive));
    let mut out = match r {
        Some(r) => primitive_vec(r.primitive),
        None => vec![0.0f32; rows * d_out],
    };
    if let Some(bias) = &bias {
        let rows_per_task = (CHUNK / d_out.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * d_out).for_each(|block| {
            for row in block.chunks_mut(d_out) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        });
    }
    // SAFETY: `out` is rows × d_out, `input` rows × d_in and `weights` d_in × d_out, all
    // row-major and distinct allocations.
    unsafe {
        gemm_strided(
            (rows, d_out, d_in),
            (out.as_mut_ptr(), d_out),
            true,
            (input.as_ptr(), d_in, 1),
            (weights.as_ptr(), d_out, 1),
            1.0,
            gemm::Parallelism::Rayon(0),
        );
    }
    let out = host_tensor::<2>(out, &Shape::new([rows, d_out]), &device);
    let state = LinearState {
        input,
        weights,
        geo,
        has_bias: bias.is_some(),
        device,
    };
    macro_rules! finish {
        ($n:literal) => {{
            let nodes: [_; $n] = nodes.try_into().expect("one node per input");
            match LinearBackward::<$n>
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state, out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            }
        }};
    }
    let out = match nodes.len() {
        2 => finish!(2),
        3 => finish!(3),
        _ => finish!(4),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `lhs · rhs` on all cores as a new row-major `m × n` vector, for operands given as (values,
/// row stride, column stride) over `m × k` and `k × n`: a transpose is a swap of strides.
fn product_all_cores(
    (m, n, k): (usize, usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) -> Vec<f32> {
    let reach = |(v, rs, cs): (&[f32], usize, usize), r: usize, c: usize| {
        assert!(
            r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < v.len(),
            "product operand out of bounds"
        )
    };
    reach(lhs, m, k);
    reach(rhs, k, n);
    if k == 0 {
        return vec![0.0; m * n];
    }
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the operands stay inside their slices (checked above) and `out` has room for
    // m × n values, a fresh allocation; without accumulation gemm writes every output value
    // without reading it, so the length is set after it has run.
    unsafe {
        gemm_strided(
            (m, n, k),
            (out.as_mut_ptr(), n),
            false,
            (lhs.0.as_ptr(), lhs.1, lhs.2),
            (rhs.0.as_ptr(), rhs.1, rhs.2),
            1.0,
            gemm::Parallelism::Rayon(0),
        );
        out.set_len(m * n);
    }
    out
}

/// Rows, input width and output width of one [`linear`].
#[derive(Debug, Clone, Copy)]
struct Geometry {
    rows: usize,
    d_in: usize,
    d_out: usize,
}

/// The backward pass of [`linear`]; `N` is the number of inputs: x, W, then the bias and the
/// residual where given.
#[derive(Debug)]
struct LinearBackward<const N: usize>;

/// What the backward pass needs: the input and the weights on the host.
#[derive(Clone)]
struct LinearState {
    input: Arc<Vec<f32>>,
    weights: Arc<Vec<f32>>,
    geo: Geometry,
    has_bias: bool,
    device: Device,
}

impl std::fmt::Debug for LinearState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinearState({:?})", self.geo)
    }
}

impl<const N: usize> Backward<burn::Dispatch, N> for LinearBackward<N> {
    type State = LinearState;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let Geometry { rows, d_in, d_out } = s.geo;
        let mut parents = ops.parents.into_iter();
        let (x_node, w_node) = (parents.next().flatten(), parents.next().flatten());
        // Then the bias (when the layer has one) and the residual (when given), in this order.
        let bias_node = if s.has_bias {
            parents.next().flatten()
        } else {
            None
        };
        let residual_node = parents.next().flatten();
        let grad = grads.consume::<burn::Dispatch>(&ops.node);
        let dy = primitive_vec(grad);
        let shape = |r: usize, c: usize| Shape::new([r, c]);

        if let Some(node) = x_node {
            // dx = dy Wᵀ: Wᵀ read from the d_in × d_out weights with swapped strides.
            let dx =
                product_all_cores((rows, d_in, d_out), (&dy, d_out, 1), (&s.weights, 1, d_out));
            grads.register::<burn::Dispatch>(
                node.id,
                host_tensor::<2>(dx, &shape(rows, d_in), &s.device),
            );
        }
        if let Some(node) = w_node {
            // dW = xᵀ dy: xᵀ read from the rows × d_in input with swapped strides.
            let dw = product_all_cores((d_in, d_out, rows), (&s.input, 1, d_in), (&dy, d_out, 1));
            grads.register::<burn::Dispatch>(
                node.id,
                host_tensor::<2>(dw, &shape(d_in, d_out), &s.device),
            );
        }
        if let Some(node) = bias_node {
            let rows_per_task = (CHUNK / d_out.max(1)).max(1);
            let partial: Vec<Vec<f32>> = dy
                .par_chunks(rows_per_task * d_out)
                .map(|block| {
                    let mut sum = vec![0.0f32; d_out];
                    for row in block.chunks(d_out) {
                        for (s, g) in sum.iter_mut().zip(row) {
                            *s += g;
                        }
                    }
                    sum
                })
                .collect();
            let mut db = vec![0.0f32; d_out];
            for p in partial {
                for (s, g) in db.iter_mut().zip(&p) {
                    *s += g;
                }
            }
            grads.register::<burn::Dispatch>(
                node.id,
                host_tensor::<1>(db, &Shape::new([d_out]), &s.device),
            );
        }
        if let Some(node) = residual_node {
            grads.register::<burn::Dispatch>(
                node.id,
                host_tensor::<2>(dy, &shape(rows, d_out), &s.device),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    /// x, W, the bias and the residual of one test case.
    type Inputs<'a> = (
        &'a Tensor<B, 2>,
        &'a Tensor<B, 2>,
        Option<&'a Tensor<B, 1>>,
        Option<&'a Tensor<B, 2>>,
    );

    /// Output and the gradients of every tracked input of `x W (+ b) (+ r)`, fused or through
    /// burn's Linear and add, under a random upstream gradient.
    fn run(fused: bool, (x, w, b, r): Inputs, upstream: &Tensor<B, 2>) -> Vec<TensorData> {
        let track2 = |t: &Tensor<B, 2>| t.clone().detach().require_grad();
        let (x, w) = (track2(x), track2(w));
        let b = b.map(|b| b.clone().detach().require_grad());
        let r = r.map(track2);
        let y = if fused {
            linear(x.clone(), w.clone(), b.clone(), r.clone())
        } else {
            let y = burn::tensor::module::linear(x.clone(), w.clone(), b.clone());
            match r.clone() {
                Some(r) => r + y,
                None => y,
            }
        };
        let grads = (y.clone() * upstream.clone()).sum().backward();
        let mut out = vec![y.into_data(), x.grad(&grads).unwrap().into_data()];
        out.push(w.grad(&grads).unwrap().into_data());
        out.extend(b.map(|b| b.grad(&grads).unwrap().into_data()));
        out.extend(r.map(|r| r.grad(&grads).unwrap().into_data()));
        out
    }

    #[test]
    fn linear_matches_burns_linear_and_add_with_every_gradient() {
        let device = Device::Flex(Default::default());
        // A ViT-T qkv shape over several row blocks, and an odd small one.
        for (rows, d_in, d_out) in [(1088usize, 192usize, 576usize), (7, 13, 5)] {
            let normal = |shape: [usize; 2]| {
                Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
            };
            let x = normal([rows, d_in]);
            let w = normal([d_in, d_out]) / (d_in as f64).sqrt();
            let b = Tensor::<B, 1>::random([d_out], Distribution::Normal(0.0, 1.0), &device);
            let r = normal([rows, d_out]);
            let upstream = normal([rows, d_out]);
            for (with_bias, with_residual) in
                [(true, true), (true, false), (false, true), (false, false)]
            {
                let inputs = (&x, &w, with_bias.then_some(&b), with_residual.then_some(&r));
                let want = run(false, inputs, &upstream);
                let got = run(true, inputs, &upstream);
                assert_eq!(got.len(), want.len());
                let close = |i: usize, tol: f32| {
                    got[i].assert_approx_eq::<f32>(&want[i], Tolerance::absolute(tol))
                };
                close(0, 1e-5);
                close(1, 1e-4);
                // dW and db sum over the rows.
                close(2, 1e-4 * (rows as f32).sqrt());
                if with_bias {
                    close(3, 1e-4 * (rows as f32).sqrt());
                }
                if with_residual {
                    close(got.len() - 1, 1e-6);
                }
            }
        }
    }

    #[test]
    fn linear_without_tracking_is_the_affine_map() {
        let device = Device::Flex(Default::default());
        let x = Tensor::<B, 2>::from_floats([[1.0, 2.0], [-1.0, 0.5]], &device);
        let w = Tensor::<B, 2>::from_floats([[1.0, 0.0, 2.0], [3.0, -1.0, 0.5]], &device);
        let b = Tensor::<B, 1>::from_floats([0.5, 0.0, -1.0], &device);
        let r = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0], [0.0, 0.0, 10.0]], &device);
        let y: Vec<f32> = linear(x, w, Some(b), Some(r))
            .into_data()
            .into_vec()
            .unwrap();
        // Row 1: [1 + 6, -2, 2 + 1] + b + r; row 2: [-1 + 1.5, -0.5, -2 + 0.25] + b + r.
        let want = [8.5, -1.0, 3.0, 1.0, -0.5, 7.25];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }
}
