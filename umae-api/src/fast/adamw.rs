//! The AdamW update of one parameter tensor in one parallel pass.

use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::{enabled, inner_vec, CHUNK};
use crate::{Device, Inner};

/// One AdamW update of one parameter tensor, with PyTorch's decoupled weight decay:
/// `m ← β₁ m + (1-β₁) g`, `v ← β₂ v + (1-β₂) g²`,
/// `p ← p (1 - lr wd) - lr (m / c₁) / (√(v / c₂) + ε)`, where `g` is the gradient times
/// `grad_scale` (global-norm clipping) and `c₁`, `c₂` the bias corrections `1 - βᵗ`.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 for parameters that do not decay.
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
    pub grad_scale: f64,
}

/// [`AdamWStep`] on `p` with gradient `g` and moments `m`, `v` (`None` before the first
/// step: zeros); returns the new `(p, m, v)`.
///
/// With burn's tensor operations an update is a dozen element-wise passes over the parameter,
/// each on one core. On the CPU in f32 this is one pass split over every core, reading
/// `p`, `g`, `m`, `v` once and writing `p`, `m`, `v` once; elsewhere (and in other dtypes) it
/// is the same formula in burn's operations.
pub fn adamw(
    p: Tensor<Inner, 1>,
    g: Tensor<Inner, 1>,
    m: Option<Tensor<Inner, 1>>,
    v: Option<Tensor<Inner, 1>>,
    s: &AdamWStep,
) -> (Tensor<Inner, 1>, Tensor<Inner, 1>, Tensor<Inner, 1>) {
    let fused = enabled("adamw")
        && matches!(p.device(), Device::Flex(_))
        && [Some(&p), Some(&g), m.as_ref(), v.as_ref()]
            .into_iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32);
    if !fused {
        return adamw_composite(p, g, m, v, s);
    }
    let device = p.device();
    let shape = p.shape();
    let n = shape.num_elements();
    let mut p = inner_vec(p);
    let g = inner_vec(g);
    let mut m = m.map(inner_vec).unwrap_or_else(|| vec![0.0; n]);
    let mut v = v.map(inner_vec).unwrap_or_else(|| vec![0.0; n]);
    let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
    let (gs, eps) = (s.grad_scale as f32, s.eps as f32);
    let decay = (1.0 - s.lr * s.weight_decay) as f32;
    let (step, inv_c1, inv_c2) = (
        s.lr as f32,
        (1.0 / s.bias_correction1) as f32,
        (1.0 / s.bias_correction2) as f32,
    );
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let g = g[i] * gs;
                m[i] = m[i] * b1 + g * (1.0 - b1);
                v[i] = v[i] * b2 + g * g * (1.0 - b2);
                let update = (m[i] * inv_c1) / ((v[i] * inv_c2).sqrt() + eps);
                p[i] = p[i] * decay - update * step;
            }
        });
    let back =
        |x: Vec<f32>| Tensor::<Inner, 1>::from_data(TensorData::new(x, shape.clone()), &device);
    (back(p), back(m), back(v))
}

/// [`adamw`] in burn's tensor operations (other devices and dtypes, and the reference the fused
/// kernel is tested against).
fn adamw_composite(
    p: Tensor<Inner, 1>,
    g: Tensor<Inner, 1>,
    m: Option<Tensor<Inner, 1>>,
    v: Option<Tensor<Inner, 1>>,
    s: &AdamWStep,
) -> (Tensor<Inner, 1>, Tensor<Inner, 1>, Tensor<Inner, 1>) {
    let g = if s.grad_scale != 1.0 {
        g * s.grad_scale
    } else {
        g
    };
    let m = match m {
        Some(m) => m * s.beta1 + g.clone() * (1.0 - s.beta1),
        None => g.clone() * (1.0 - s.beta1),
    };
    let v = match v {
        Some(v) => v * s.beta2 + g.powf_scalar(2.0) * (1.0 - s.beta2),
        None => g.powf_scalar(2.0) * (1.0 - s.beta2),
    };
    let decayed = if s.weight_decay > 0.0 {
        p.clone() - p * (s.lr * s.weight_decay)
    } else {
        p
    };
    let update =
        (m.clone() / s.bias_correction1) / ((v.clone() / s.bias_correction2).sqrt() + s.eps);
    (decayed - update * s.lr, m, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn adamw_matches_the_composite_formula_over_several_steps() {
        let device = Device::Flex(Default::default());
        // Several chunks, so that several tasks run; two steps, the first without moments.
        let n = 3 * CHUNK + 17;
        let rand =
            |sd: f64| Tensor::<Inner, 1>::random([n], Distribution::Normal(0.0, sd), &device);
        let p0 = rand(1.0);
        let grads = [rand(0.1), rand(2.0)];
        for (wd, clip) in [(0.05, 1.0), (0.0, 0.3)] {
            let run = |fused: bool| {
                let (mut p, mut m, mut v) = (p0.clone(), None, None);
                for (t, g) in grads.iter().enumerate() {
                    let s = AdamWStep {
                        lr: 1e-2,
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: wd,
                        bias_correction1: 1.0 - 0.9f64.powi(t as i32 + 1),
                        bias_correction2: 1.0 - 0.95f64.powi(t as i32 + 1),
                        grad_scale: clip,
                    };
                    let f = if fused { adamw } else { adamw_composite };
                    let (p2, m2, v2) = f(p, g.clone(), m, v, &s);
                    (p, m, v) = (p2, Some(m2), Some(v2));
                }
                [p, m.unwrap(), v.unwrap()].map(|t| t.into_data())
            };
            let (want, got) = (run(false), run(true));
            // The two evaluate the same formula in different orders, so they agree to a
            // few units in the last place of each value (parameters reach |p| of about 5,
            // where one ulp of f32 is 4.8e-7): relative 4e-6, absolute 1e-6 near zero.
            for (w, g) in want.iter().zip(&got) {
                g.assert_approx_eq::<f32>(w, burn::tensor::Tolerance::rel_abs(4e-6, 1e-6));
            }
            // The parameters moved (the check is not vacuous).
            let moved: f32 = (got[0].clone().into_vec::<f32>().unwrap())
                .iter()
                .zip(p0.clone().into_data().into_vec::<f32>().unwrap())
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / n as f32;
            assert!(
                moved > 1e-3,
                "parameters step by about lr: mean |dp| = {moved}"
            );
        }
    }
}
