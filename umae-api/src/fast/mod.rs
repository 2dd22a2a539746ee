//! Fused CPU kernels for hot element-wise parts of the training step.
//!
//! burn 0.21's CPU backend evaluates the exact GELU one element at a time on one thread, and
//! its backward pass evaluates erf a second time. [`gelu`] computes GELU and its derivative in
//! one pass on every core and keeps the derivative (in place of the input that burn keeps) for
//! the backward pass, which is then one multiplication, so erf runs once per element per step. The
//! values are those of the exact GELU (`0.5 x (1 + erf(x / √2))`, the same libm erf); other
//! devices and dtypes use burn's own GELU. [`layer_norm`] does the same for LayerNorm,
//! [`attention`] for the core of multi-head self-attention, [`linear`] for a Linear layer with
//! its bias and a residual add, and [`adamw`] for the optimizer's update of one parameter
//! tensor.
//!
//! `UMAE_FUSED=0` in the environment turns these kernels off (burn's own operations everywhere),
//! and `UMAE_FUSED=gelu` (a comma-separated list of `gelu`, `layer_norm`, `attention`,
//! `linear`, `adamw`) keeps only those on: to measure each in one build, or to rule them out
//! when a result looks wrong.

mod adamw;
mod attention;
mod gelu;
mod linear;
mod math;
mod norm;

pub use adamw::{adamw, AdamWStep};
pub use attention::attention;
pub use gelu::gelu;
pub use linear::linear;
pub use norm::layer_norm;

use std::sync::OnceLock;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};

use crate::{Device, Inner, B};

/// Elements per parallel task: large enough to amortise scheduling, small enough to spread
/// a ViT-T MLP activation over several cores.
const CHUNK: usize = 16 * 1024;

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

/// A host vector as a tensor of the inner backend, ready to become an operation's output.
fn host_tensor<const D: usize>(
    values: Vec<f32>,
    shape: &Shape,
    device: &Device,
) -> FloatTensor<Inner> {
    Tensor::<Inner, D>::from_data(TensorData::new(values, shape.clone()), device)
        .into_primitive()
        .tensor()
}

/// A tensor of the inner backend as a host vector of f32 (no copy when the tensor is contiguous
/// and not shared).
fn inner_vec<const D: usize>(t: Tensor<Inner, D>) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .expect("an f32 tensor reads as f32")
}

/// The values of a tracked input of a custom operation (the graph keeps its own handle), or of
/// the gradient a backward pass receives, on the host.
fn primitive_vec(t: FloatTensor<Inner>) -> Vec<f32> {
    inner_vec(Tensor::<Inner, 1>::from_primitive(TensorPrimitive::Float(
        t,
    )))
}

/// `dst = [dst +] beta · lhs · rhs` for row-major strided operands: `dst` is `m × n` given as
/// (pointer, row stride), `lhs` is `m × k` and `rhs` is `k × n`, each given as (pointer, row
/// stride, column stride), so that a transpose is only a swap of strides. With `accumulate`
/// the product is added to what `dst` holds.
///
/// # Safety
/// Every element the strides reach must lie inside the allocation its pointer belongs to, and
/// `dst` must not overlap `lhs` or `rhs`.
#[inline(always)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        if accumulate { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

pub(crate) mod simd {
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
