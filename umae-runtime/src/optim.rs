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
    m: HashMap<String, Tensor<Inner, 1>>,
    v: HashMap<String, Tensor<Inner, 1>>,
    acc: HashMap<String, Tensor<Inner, 1>>,
    /// The global norm of `acc`, once read (cleared whenever `acc` changes).
    norm: std::cell::Cell<Option<f64>>,
    /// Per-parameter learning-rate factor by key `component.path` (layer-wise decay).
    pub lr_scale: HashMap<String, f64>,
}

/// [`AdamW`]'s state, on its device.
#[derive(Clone)]
pub struct AdamWState {
    pub step: u64,
    /// First and second moments by parameter key, in key order.
    pub m: Vec<(String, Tensor<Inner, 1>)>,
    pub v: Vec<(String, Tensor<Inner, 1>)>,
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
            norm: std::cell::Cell::new(None),
            lr_scale: HashMap::new(),
        }
    }

    /// The optimizer's state: its step count and both moments of every parameter, by key
    /// `component.path` in key order (what checkpoints and replicas carry).
    pub fn state(&self) -> AdamWState {
        let sorted = |m: &HashMap<String, Tensor<Inner, 1>>| {
            let mut v: Vec<(String, Tensor<Inner, 1>)> =
                m.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        AdamWState {
            step: self.step,
            m: sorted(&self.m),
            v: sorted(&self.v),
        }
    }

    /// Continue from `state` (see [`AdamW::state`]); accumulated gradients are dropped.
    pub fn load_state(&mut self, state: AdamWState) {
        self.step = state.step;
        self.m = state.m.into_iter().collect();
        self.v = state.v.into_iter().collect();
        self.discard();
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
        self.norm.set(None);
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
        self.norm.set(None);
        Ok(())
    }

    /// Drop the accumulated gradients (a skipped step).
    pub fn discard(&mut self) {
        self.acc.clear();
        self.norm.set(None);
    }

    /// The global L2 norm of the accumulated gradients: one host read per step, however often
    /// it is asked for (the trainer's finiteness check and `clip_grad` share it).
    pub fn grad_norm(&self) -> f64 {
        if let Some(n) = self.norm.get() {
            return n;
        }
        let n = self.compute_grad_norm();
        self.norm.set(Some(n));
        n
    }

    fn compute_grad_norm(&self) -> f64 {
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
        // `clip_grad` scales by the global norm of every accumulated gradient, both groups.
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
        self.update(modules, lr, wd, scale);
        self.update(second, lr2, 0.0, scale);
        self.discard();
    }

    fn update(
        &mut self,
        modules: &mut [(&'static str, &mut dyn Trainable)],
        lr: f64,
        wd: f64,
        scale: f64,
    ) {
        let t = self.step as i32;
        let (b1, b2) = self.spec.betas;
        let eps = self.spec.eps;
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

#[cfg(test)]
mod state_tests {
    use super::*;
    use umae_api::burn::nn::LinearConfig;
    use umae_api::burn::tensor::TensorData;
    use umae_api::{Device, B};

    fn stepped(clip: Option<f64>) -> (AdamW, umae_api::burn::nn::Linear<B>, Grads) {
        let device = Device::Flex(Default::default());
        let lin = LinearConfig::new(2, 1).init::<B>(&device);
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![3.0f32, -4.0], [1, 2]), &device);
        let grads = lin.forward(x).sum().backward();
        let opt = AdamW::new(OptimizerSpec {
            clip_grad: clip,
            ..OptimizerSpec::default()
        });
        (opt, lin, grads)
    }

    #[test]
    fn grad_norm_is_read_once_and_follows_new_gradients() {
        let (mut opt, lin, grads) = stepped(None);
        opt.accumulate("lin", &lin, &grads);
        // d/dw = x = (3, -4), d/db = 1: norm sqrt(26).
        assert!((opt.grad_norm() - 26f64.sqrt()).abs() < 1e-5);
        assert_eq!(
            opt.norm.get(),
            Some(opt.grad_norm()),
            "cached after the first read"
        );
        opt.accumulate("lin", &lin, &grads);
        assert_eq!(opt.norm.get(), None, "a new backward pass clears it");
        assert!((opt.grad_norm() - 2.0 * 26f64.sqrt()).abs() < 1e-5);
        opt.discard();
        assert_eq!(opt.grad_norm(), 0.0);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let (mut a, mut lin_a, grads) = stepped(Some(1.0));
        a.accumulate("lin", &lin_a, &grads);
        a.step(
            &mut [("lin", &mut lin_a as &mut dyn Trainable)],
            0.1,
            &mut [],
            0.0,
        );
        let state = a.state();
        assert_eq!(state.step, 1);
        assert_eq!(
            state.m.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["lin.bias", "lin.weight"],
            "key order"
        );
        let mut b = AdamW::new(a.spec.clone());
        b.load_state(state);
        let mut lin_b = lin_a.clone();
        for (opt, lin) in [(&mut a, &mut lin_a), (&mut b, &mut lin_b)] {
            opt.accumulate("lin", lin, &grads);
            opt.step(&mut [("lin", lin as &mut dyn Trainable)], 0.1, &mut [], 0.0);
        }
        let values =
            |l: &umae_api::burn::nn::Linear<B>| l.weight.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(values(&lin_a), values(&lin_b));
        assert_eq!(b.step, 2);
    }
}
