//! AdamW with decoupled weight decay (PyTorch semantics) over [`Trainable`] components, with
//! gradient accumulation, optional global-norm clipping and MAE's learning-rate schedule.

use std::collections::HashMap;

use umae_api::burn::tensor::Tensor;
use umae_api::fast::{self, AdamWStep};
use umae_api::recipe::{OptimizerSpec, ScheduleSpec};
use umae_api::{Grads, Inner, Trainable};

/// MAE's schedule: linear warmup to `peak` over `warmup` epochs, then half-cosine to `min_lr`
/// at `epochs`. `epoch` is fractional (iteration / iterations per epoch).
pub fn learning_rate(epoch: f64, peak: f64, s: &ScheduleSpec, epochs: f64) -> f64 {
    if epoch < s.warmup_epochs {
        peak * epoch / s.warmup_epochs
    } else if epochs <= s.warmup_epochs {
        peak
    } else {
        let progress = ((epoch - s.warmup_epochs) / (epochs - s.warmup_epochs)).min(1.0);
        s.min_lr + (peak - s.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

pub struct AdamW {
    pub spec: OptimizerSpec,
    /// Optimizer steps taken.
    pub step: u64,
    pub m: HashMap<String, Tensor<Inner, 1>>,
    pub v: HashMap<String, Tensor<Inner, 1>>,
    acc: HashMap<String, Tensor<Inner, 1>>,
    /// Per-parameter learning-rate factor by key `component.path` (layer-wise decay).
    pub lr_scale: HashMap<String, f64>,
}

fn key(prefix: &str, path: &str) -> String {
    format!("{prefix}.{path}")
}

impl AdamW {
    pub fn new(spec: OptimizerSpec) -> Self {
        AdamW {
            spec,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
            acc: HashMap::new(),
            lr_scale: HashMap::new(),
        }
    }

    /// Add this backward pass's gradients of one component to the accumulator.
    pub fn accumulate(&mut self, prefix: &str, module: &dyn Trainable, grads: &Grads) {
        module.visit_grads(grads, &mut |info, g| {
            let k = key(prefix, info.path);
            let sum = match self.acc.remove(&k) {
                Some(a) => a + g,
                None => g,
            };
            self.acc.insert(k, sum);
        });
    }

    /// Replace the accumulated gradients by `reduce` of all of them, flattened into one vector
    /// in key order (data parallelism: one all-reduce per step instead of one per tensor).
    pub fn reduce_accumulated(
        &mut self,
        reduce: impl FnOnce(Tensor<Inner, 1>) -> Result<Tensor<Inner, 1>, String>,
    ) -> Result<(), String> {
        let mut keys: Vec<String> = self.acc.keys().cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort();
        let parts: Vec<Tensor<Inner, 1>> = keys.iter().map(|k| self.acc[k].clone()).collect();
        let sizes: Vec<usize> = parts.iter().map(|t| t.dims()[0]).collect();
        let flat = reduce(Tensor::cat(parts, 0))?;
        let mut at = 0;
        for (k, n) in keys.into_iter().zip(sizes) {
            self.acc.insert(k, flat.clone().narrow(0, at, n));
            at += n;
        }
        Ok(())
    }

    /// Drop the accumulated gradients (a skipped step).
    pub fn discard(&mut self) {
        self.acc.clear();
    }

    /// The global L2 norm of the accumulated gradients (one host read).
    pub fn grad_norm(&self) -> f64 {
        let parts: Vec<Tensor<Inner, 1>> = self
            .acc
            .values()
            .map(|g| g.clone().powf_scalar(2.0).sum())
            .collect();
        if parts.is_empty() {
            return 0.0;
        }
        let total: f32 = Tensor::cat(parts, 0).sum().into_scalar();
        (total as f64).sqrt()
    }

    /// One optimizer step for every component: the first group at learning rate `lr` with the
    /// recipe's weight decay, the second (the online probe) at `lr2` without weight decay.
    pub fn step(
        &mut self,
        modules: &mut [(&'static str, &mut dyn Trainable)],
        lr: f64,
        second: &mut [(&'static str, &mut dyn Trainable)],
        lr2: f64,
    ) {
        self.step += 1;
        let wd = self.spec.weight_decay;
        self.update(modules, lr, wd);
        self.update(second, lr2, 0.0);
        self.acc.clear();
    }

    fn update(&mut self, modules: &mut [(&'static str, &mut dyn Trainable)], lr: f64, wd: f64) {
        let t = self.step as i32;
        let (b1, b2) = self.spec.betas;
        let eps = self.spec.eps;
        let scale = match self.spec.clip_grad {
            Some(max) => {
                let norm = self.grad_norm();
                if norm > max {
                    max / (norm + 1e-6)
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (prefix, module) in modules.iter_mut() {
            module.map_params(&mut |info, p| {
                let k = key(prefix, info.path);
                let Some(g) = self.acc.remove(&k) else {
                    return p;
                };
                let step = AdamWStep {
                    lr: lr * self.lr_scale.get(&k).copied().unwrap_or(1.0),
                    beta1: b1,
                    beta2: b2,
                    eps,
                    weight_decay: if info.decays() { wd } else { 0.0 },
                    bias_correction1: bc1,
                    bias_correction2: bc2,
                    grad_scale: scale,
                };
                let (p, m, v) = fast::adamw(p, g, self.m.remove(&k), self.v.remove(&k), &step);
                self.m.insert(k.clone(), m);
                self.v.insert(k, v);
                p
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_half_cosine() {
        let s = ScheduleSpec {
            warmup_epochs: 10.0,
            min_lr: 0.0,
        };
        assert_eq!(learning_rate(0.0, 1.0, &s, 100.0), 0.0);
        assert!((learning_rate(5.0, 1.0, &s, 100.0) - 0.5).abs() < 1e-12);
        assert!((learning_rate(10.0, 1.0, &s, 100.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55.0, 1.0, &s, 100.0) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100.0, 1.0, &s, 100.0).abs() < 1e-12);
        let s = ScheduleSpec {
            warmup_epochs: 0.0,
            min_lr: 0.1,
        };
        assert!((learning_rate(0.0, 1.0, &s, 10.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10.0, 1.0, &s, 10.0) - 0.1).abs() < 1e-12);
    }
}

#[cfg(test)]
mod adamw_tests {
    use super::*;
    use umae_api::burn::nn::LinearConfig;
    use umae_api::burn::tensor::TensorData;
    use umae_api::{Device, B};

    fn values(m: &dyn Trainable) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        m.visit_params(&mut |info, t| {
            out.push((
                info.path.to_string(),
                t.into_data().to_vec::<f32>().unwrap(),
            ))
        });
        out
    }

    #[test]
    fn decays_matrices_not_biases_and_takes_sign_sized_first_steps() {
        let device = Device::Flex(Default::default());
        let mut lin = LinearConfig::new(2, 1).init::<B>(&device);
        let before = values(&lin);
        // d(sum(w . x + b))/dw = x = (1, -2); d/db = 1.
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2]), &device);
        let grads = lin.forward(x).sum().backward();
        let spec = OptimizerSpec {
            weight_decay: 0.5,
            eps: 1e-8,
            ..OptimizerSpec::default()
        };
        let mut opt = AdamW::new(spec);
        opt.accumulate("lin", &lin, &grads);
        let (lr, wd) = (0.1, 0.5);
        opt.step(
            &mut [("lin", &mut lin as &mut dyn Trainable)],
            lr,
            &mut [],
            0.0,
        );
        let after = values(&lin);
        for ((path, b), (_, a)) in before.iter().zip(&after) {
            let g: &[f32] = if path == "weight" {
                &[1.0, -2.0]
            } else {
                &[1.0]
            };
            let decay = if path == "weight" { 1.0 - lr * wd } else { 1.0 };
            for ((b, a), g) in b.iter().zip(a).zip(g) {
                // First AdamW step: p * (1 - lr * wd) - lr * sign(g).
                let want = *b as f64 * decay - lr * g.signum() as f64;
                assert!((*a as f64 - want).abs() < 1e-5, "{path}: {a} vs {want}");
            }
        }
        assert_eq!(opt.step, 1);
    }
}

#[cfg(test)]
mod lr_scale_tests {
    use super::*;
    use umae_api::burn::nn::LinearConfig;
    use umae_api::burn::tensor::TensorData;
    use umae_api::{Device, B};

    #[test]
    fn per_parameter_scale_multiplies_the_step() {
        let device = Device::Flex(Default::default());
        let step_of = |scale: Option<f64>| {
            let mut lin = LinearConfig::new(2, 1).init::<B>(&device);
            let mut before = Vec::new();
            lin.visit_params(&mut |_, t| before.push(t.into_data().to_vec::<f32>().unwrap()));
            let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0], [1, 2]), &device);
            let grads = lin.forward(x).sum().backward();
            let mut opt = AdamW::new(OptimizerSpec {
                weight_decay: 0.0,
                ..OptimizerSpec::default()
            });
            if let Some(s) = scale {
                opt.lr_scale.insert("lin.weight".into(), s);
            }
            opt.accumulate("lin", &lin, &grads);
            opt.step(
                &mut [("lin", &mut lin as &mut dyn Trainable)],
                0.1,
                &mut [],
                0.0,
            );
            let mut deltas = Vec::new();
            let mut i = 0;
            lin.visit_params(&mut |_, t| {
                let after = t.into_data().to_vec::<f32>().unwrap();
                deltas.push(
                    after
                        .iter()
                        .zip(&before[i])
                        .map(|(a, b)| a - b)
                        .collect::<Vec<f32>>(),
                );
                i += 1;
            });
            deltas
        };
        let (plain, scaled) = (step_of(None), step_of(Some(0.25)));
        // Weight steps shrink by the factor; the bias (not in the map) is unchanged.
        for (p, s) in plain[0].iter().zip(&scaled[0]) {
            assert!((s - 0.25 * p).abs() < 1e-6, "{p} {s}");
        }
        assert!(
            (plain[1][0] - scaled[1][0]).abs() < 1e-6,
            "{plain:?} {scaled:?}"
        );
    }
}
