//! Compute precision for mixed-precision training.
//!
//! burn has no autocast, so components cast where it pays: the runtime sets the recipe's
//! [`Precision`] for the duration of a training forward pass ([`with`]), and the matrix
//! products of a component go through [`matmul`], which multiplies in bf16 and returns f32.
//! Parameters, optimizer state, normalisations, softmax, reductions and losses stay in f32
//! (the master weights are f32; the bf16 copies exist only inside a product, and the cast is
//! differentiable, so gradients arrive in f32).

use std::cell::Cell;

use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::B;

/// Precision of the matrix products in a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Matrix products in bf16 with f32 results; everything else f32.
    Bf16,
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision in effect on this thread (F32 outside [`with`]).
pub fn current() -> Precision {
    CURRENT.with(Cell::get)
}

/// Run `f` with `precision` in effect on this thread, restoring the previous one after (also
/// when `f` panics).
pub fn with<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(precision)));
    f()
}

/// `a @ b` (batched over leading dimensions) in the current precision; the result is f32.
pub fn matmul<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    match current() {
        Precision::F32 => a.matmul(b),
        Precision::Bf16 => a
            .cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16))
            .cast(FloatDType::F32),
    }
}

/// `x W + b` for `x: [rows, in]` and `W: [in, out]`, the product in the current precision. In
/// f32 it is burn's linear operation (with its own backward); with bf16 the product is cast and
/// the bias added in f32.
pub fn linear(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    match current() {
        Precision::F32 => burn::tensor::module::linear(x, weight, bias),
        Precision::Bf16 => {
            let y = matmul(x, weight);
            match bias {
                Some(b) => y + b.unsqueeze_dim(0),
                None => y,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn device() -> crate::Device {
        burn::DispatchDevice::Flex(Default::default())
    }

    #[test]
    fn with_sets_and_restores() {
        assert_eq!(current(), Precision::F32);
        let inner = with(Precision::Bf16, || {
            let nested = with(Precision::F32, current);
            (current(), nested)
        });
        assert_eq!(inner, (Precision::Bf16, Precision::F32));
        assert_eq!(current(), Precision::F32);
        let _ = std::panic::catch_unwind(|| with(Precision::Bf16, || panic!("inside")));
        assert_eq!(current(), Precision::F32);
    }

    #[test]
    fn bf16_products_round_the_inputs_and_return_f32_gradients() {
        let d = device();
        // 1 + 2^-10 is not a bf16 number (8 bits of mantissa): it rounds to 1.
        let a = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32 + 1.0 / 1024.0], [1, 1]), &d)
            .require_grad();
        let b = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32], [1, 1]), &d);
        let exact: f32 = matmul(a.clone(), b.clone()).into_scalar();
        assert_eq!(exact, 1.0 + 1.0 / 1024.0);
        let y = with(Precision::Bf16, || matmul(a.clone(), b.clone()));
        assert_eq!(y.dtype(), burn::tensor::DType::F32);
        assert_eq!(y.clone().into_scalar(), 1.0f32);
        let grads = y.sum().backward();
        let g = a.grad(&grads).unwrap();
        assert_eq!(g.dtype(), burn::tensor::DType::F32);
        assert_eq!(g.into_scalar(), 1.0f32);
    }

    #[test]
    fn bf16_products_are_close_to_f32() {
        let d = device();
        let a = Tensor::<B, 3>::random([2, 16, 64], Distribution::Normal(0.0, 1.0), &d);
        let b = Tensor::<B, 3>::random([2, 64, 32], Distribution::Normal(0.0, 1.0), &d);
        let exact = matmul(a.clone(), b.clone());
        let half = with(Precision::Bf16, || matmul(a, b));
        let err: f32 = (exact.clone() - half).abs().max().into_scalar();
        let scale: f32 = exact.abs().max().into_scalar();
        assert!(err > 0.0 && err < 0.02 * scale, "{err} of {scale}");
    }
}
