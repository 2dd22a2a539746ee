//! Offline evaluation on frozen features: the linear probe of MAE's protocol and weighted kNN.
//!
//! Linear probe: BatchNorm without affine parameters, then a linear layer, trained with
//! cross-entropy and no weight decay by LARS (MAE's choice) or SGD with momentum, lr =
//! blr * batch / 256 with linear warmup and a half-cosine decay, per iteration.
//! With `optimizer: Lbfgs`: multinomial logistic regression on features standardised with the
//! training split's mean and std, full batch, minimised by L-BFGS to convergence.
//! kNN: cosine similarity on L2-normalised features, the k nearest training samples vote with
//! weight exp(sim / T) (as in InstDisc/DINO).

use serde::{Deserialize, Serialize};
use umae_api::burn::nn::loss::CrossEntropyLossConfig;
use umae_api::burn::tensor::{Int, Tensor, TensorData};
use umae_api::{Device, Inner, Rng, B};

use crate::eval::features::Features;
use crate::progress;

pub use umae_api::recipe::{KnnSpec, LinearSpec, ProbeOptimizer};

/// Top-1 / top-5 accuracy (fractions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

impl Accuracy {
    /// From counts of top-1 and top-5 hits among `n` images.
    fn of_hits((top1, top5): (usize, usize), n: usize) -> Accuracy {
        Accuracy {
            top1: top1 as f64 / n as f64,
            top5: top5 as f64 / n as f64,
        }
    }
}

/// Result of a linear probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearResult {
    pub test: Accuracy,
    pub train_top1: f64,
    pub final_loss: f64,
    pub epochs: usize,
    pub lr: f64,
    /// L-BFGS iterations (`optimizer: Lbfgs`).
    #[serde(default)]
    pub iterations: Option<usize>,
}

fn to_device(f: &Features, device: &Device) -> Tensor<Inner, 2> {
    Tensor::from_data(TensorData::new(f.data.clone(), [f.n, f.dim]), device)
}

fn check(train: &Features, test: &Features, classes: usize) -> Result<(), String> {
    if train.n == 0 || test.n == 0 {
        return Err("no features to evaluate (the train or test split is empty)".into());
    }
    if train.dim != test.dim {
        return Err(format!(
            "train features have width {}, test features {}",
            train.dim, test.dim
        ));
    }
    if let Some(l) = train
        .labels
        .iter()
        .chain(&test.labels)
        .find(|l| **l < 0 || **l as usize >= classes)
    {
        return Err(format!(
            "label {l} is outside 0..{classes}: set data.num_classes in the recipe"
        ));
    }
    Ok(())
}

/// Correct top-1 and top-5 counts of `[n, c]` scores.
pub fn accuracy(scores: &[f32], labels: &[i64], c: usize) -> (usize, usize) {
    let mut top1 = 0;
    let mut top5 = 0;
    for (row, &y) in scores.chunks_exact(c).zip(labels) {
        let sy = row[y as usize];
        let better = row.iter().filter(|&&v| v > sy).count();
        top1 += (better == 0) as usize;
        top5 += (better < 5) as usize;
    }
    (top1, top5)
}

/// Learning rate at fractional epoch `t`: linear warmup, then half-cosine to 0.
pub fn probe_lr(t: f64, peak: f64, warmup: f64, epochs: f64) -> f64 {
    if t < warmup {
        peak * t / warmup
    } else {
        let p = (t - warmup) / (epochs - warmup).max(1e-12);
        peak * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
    }
}

/// Train a linear probe on `train`, report accuracy on `test`.
pub fn linear_probe(
    train: &Features,
    test: &Features,
    classes: usize,
    spec: &LinearSpec,
    device: &Device,
) -> Result<LinearResult, String> {
    check(train, test, classes)?;
    if spec.optimizer == ProbeOptimizer::Lbfgs {
        return lbfgs_probe(train, test, classes, spec, device);
    }
    if spec.batch_size == 0 || spec.epochs == 0 {
        return Err("linear probe: epochs and batch_size must be at least 1".into());
    }
    let d = train.dim;
    let batch = spec.batch_size.min(train.n);
    let steps = train.n / batch;
    let lr_peak = spec.blr * batch as f64 / 256.0;
    let x_all = to_device(train, device);
    let y_all: Tensor<Inner, 1, Int> =
        Tensor::from_data(TensorData::new(train.labels.clone(), [train.n]), device);
    // MAE initialises the head with trunc_normal(std=0.01) and a zero bias.
    let mut init = Rng::derive(spec.seed, &[0x11AE]);
    let w0: Vec<f32> = (0..d * classes)
        .map(|_| (init.normal().clamp(-2.0, 2.0) * 0.01) as f32)
        .collect();
    let mut w: Tensor<Inner, 2> = Tensor::from_data(TensorData::new(w0, [d, classes]), device);
    let mut b: Tensor<Inner, 1> = Tensor::zeros([classes], device);
    let mut mw: Tensor<Inner, 2> = Tensor::zeros([d, classes], device);
    let mut mb: Tensor<Inner, 1> = Tensor::zeros([classes], device);
    let mut run_mean: Tensor<Inner, 1> = Tensor::zeros([d], device);
    let mut run_var: Tensor<Inner, 1> = Tensor::ones([d], device);
    let ce = CrossEntropyLossConfig::new().init(device);
    let mut rng = Rng::derive(spec.seed, &[0x9B0B]);
    let mut last_loss = Tensor::<B, 1>::zeros([1], device);
    let mut correct = Tensor::<B, 1>::zeros([1], device);
    let bar = progress::bar((spec.epochs * steps) as u64, "linear probe");
    for epoch in 0..spec.epochs {
        let order: Vec<i64> = rng
            .permutation(train.n)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        correct = Tensor::zeros([1], device);
        for s in 0..steps {
            let lr = probe_lr(
                epoch as f64 + s as f64 / steps as f64,
                lr_peak,
                spec.warmup_epochs as f64,
                spec.epochs as f64,
            );
            let idx: Tensor<Inner, 1, Int> = Tensor::from_data(
                TensorData::new(order[s * batch..(s + 1) * batch].to_vec(), [batch]),
                device,
            );
            let x = Tensor::<B, 2>::from_inner(x_all.clone().select(0, idx.clone()));
            let y = Tensor::<B, 1, Int>::from_inner(y_all.clone().select(0, idx));
            let mean = x.clone().mean_dim(0);
            let var = (x.clone() - mean.clone()).powf_scalar(2.0).mean_dim(0);
            run_mean = run_mean * 0.9 + mean.clone().inner().reshape([d]) * 0.1;
            let unbiased = batch as f64 / (batch as f64 - 1.0).max(1.0);
            run_var = run_var * 0.9 + var.clone().inner().reshape([d]) * (0.1 * unbiased);
            let xn = (x - mean) / (var + 1e-6).sqrt();
            let wt = Tensor::<B, 2>::from_inner(w.clone()).require_grad();
            let bt = Tensor::<B, 1>::from_inner(b.clone()).require_grad();
            let logits = xn.matmul(wt.clone()) + bt.clone().reshape([1, classes]);
            let loss = ce.forward(logits.clone(), y.clone());
            correct = correct
                + logits
                    .detach()
                    .argmax(1)
                    .reshape([batch])
                    .equal(y)
                    .float()
                    .sum();
            let grads = loss.backward();
            let gw = wt.grad(&grads).expect("weight gradient");
            let gb = bt.grad(&grads).expect("bias gradient");
            last_loss = loss.detach();
            let gw = gw + w.clone() * spec.weight_decay;
            let gw = match spec.optimizer {
                // (Lbfgs returned above.)
                ProbeOptimizer::Sgd | ProbeOptimizer::Lbfgs => gw,
                ProbeOptimizer::Lars => {
                    // trust = eta * |w| / |g| where both are non-zero, else 1.
                    let pn = w.clone().powf_scalar(2.0).sum().sqrt();
                    let gn = gw.clone().powf_scalar(2.0).sum().sqrt();
                    let ratio = (pn.clone() * 0.001) / (gn.clone() + 1e-30);
                    let ok = pn.greater_elem(0.0).float() * gn.greater_elem(0.0).float();
                    let trust = ratio * ok.clone() + (ok.neg() + 1.0);
                    gw * trust.reshape([1, 1])
                }
            };
            mw = mw * spec.momentum + gw;
            mb = mb * spec.momentum + gb;
            w = w - mw.clone() * lr;
            b = b - mb.clone() * lr;
            progress::tick(&bar, 1);
        }
    }
    progress::finish(bar);
    let train_top1 = correct.into_scalar() as f64 / (steps * batch) as f64;
    // Test with the running statistics.
    let xt = to_device(test, device);
    let xn = (xt - run_mean.reshape([1, d])) / (run_var.reshape([1, d]) + 1e-6).sqrt();
    let logits = xn.matmul(w) + b.reshape([1, classes]);
    let hits = accuracy(&host(logits)?, &test.labels, classes);
    let final_loss = last_loss.into_scalar() as f64;
    if !final_loss.is_finite() {
        return Err(format!(
            "the linear probe diverged (loss {final_loss}): lower --blr"
        ));
    }
    Ok(LinearResult {
        test: Accuracy::of_hits(hits, test.n),
        train_top1,
        final_loss,
        epochs: spec.epochs,
        lr: lr_peak,
        iterations: None,
    })
}

/// Per-feature mean and std of `f` (a std of 0 counts as 1).
fn moments(f: &Features) -> (Vec<f64>, Vec<f64>) {
    let (n, d) = (f.n as f64, f.dim);
    let mut mean = vec![0.0; d];
    for row in f.data.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64 / n;
        }
    }
    let mut var = vec![0.0; d];
    for row in f.data.chunks_exact(d) {
        for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (*v as f64 - m).powi(2) / n;
        }
    }
    let std = var
        .into_iter()
        .map(|v| if v > 0.0 { v.sqrt() } else { 1.0 })
        .collect();
    (mean, std)
}

fn standardized(f: &Features, mean: &[f64], std: &[f64], device: &Device) -> Tensor<Inner, 2> {
    let data: Vec<f32> = f
        .data
        .chunks_exact(f.dim)
        .flat_map(|row| {
            row.iter()
                .zip(mean)
                .zip(std)
                .map(|((v, m), s)| ((*v as f64 - m) / s) as f32)
        })
        .collect();
    Tensor::from_data(TensorData::new(data, [f.n, f.dim]), device)
}

fn host(t: Tensor<Inner, 2>) -> Result<Vec<f32>, String> {
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("{e:?}"))
}

/// `optimizer: Lbfgs`: minimise the mean cross-entropy of `softmax(Z W + b)` plus
/// `l2 / 2 * |W|^2` over the whole training split. The products run on `device` in f32; the
/// softmax, the loss and the optimiser's state are f64 on the host.
fn lbfgs_probe(
    train: &Features,
    test: &Features,
    classes: usize,
    spec: &LinearSpec,
    device: &Device,
) -> Result<LinearResult, String> {
    let (n, d, c) = (train.n, train.dim, classes);
    let l2 = spec.l2.unwrap_or(1.0 / n as f64);
    if !(l2.is_finite() && l2 >= 0.0) || spec.max_iter == 0 {
        return Err(format!(
            "linear probe: l2 must be a finite number >= 0 and max_iter at least 1 (got {l2}, {})",
            spec.max_iter
        ));
    }
    let (mean, std) = moments(train);
    let z = standardized(train, &mean, &std, device);
    let zt = z.clone().transpose();
    let weights = |x: &[f64]| -> Tensor<Inner, 2> {
        let w: Vec<f32> = x[..d * c].iter().map(|v| *v as f32).collect();
        Tensor::from_data(TensorData::new(w, [d, c]), device)
    };
    // Row-wise softmax of `logits + b` with the loss against `labels`; `grad` (when given)
    // receives (p - onehot) / n.
    let softmax_loss =
        |logits: &[f32], b: &[f64], labels: &[i64], mut grad: Option<&mut Vec<f32>>| {
            let mut loss = 0.0;
            let mut row = vec![0.0f64; c];
            for (i, (l, &y)) in logits.chunks_exact(c).zip(labels).enumerate() {
                for ((r, v), bj) in row.iter_mut().zip(l).zip(b) {
                    *r = *v as f64 + bj;
                }
                let m = row.iter().fold(f64::NEG_INFINITY, |a, v| a.max(*v));
                let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                loss += lse - row[y as usize];
                if let Some(g) = grad.as_deref_mut() {
                    for j in 0..c {
                        let p = (row[j] - lse).exp() - f64::from(j == y as usize);
                        g[i * c + j] = (p / labels.len() as f64) as f32;
                    }
                }
            }
            loss / labels.len() as f64
        };
    let objective = |x: &[f64]| -> Result<(f64, Vec<f64>), String> {
        let logits = host(z.clone().matmul(weights(x)))?;
        let mut g = vec![0.0f32; n * c];
        let mut loss = softmax_loss(&logits, &x[d * c..], &train.labels, Some(&mut g));
        let mut grad = vec![0.0; d * c + c];
        for row in g.chunks_exact(c) {
            for (gb, v) in grad[d * c..].iter_mut().zip(row) {
                *gb += *v as f64;
            }
        }
        let gt: Tensor<Inner, 2> = Tensor::from_data(TensorData::new(g, [n, c]), device);
        let gw = host(zt.clone().matmul(gt))?;
        for ((gi, v), w) in grad.iter_mut().zip(&gw).zip(&x[..d * c]) {
            *gi = *v as f64 + l2 * w;
            loss += 0.5 * l2 * w * w;
        }
        Ok((loss, grad))
    };
    let bar = progress::spinner("linear probe (L-BFGS)");
    let opts = crate::eval::lbfgs::Options {
        max_iter: spec.max_iter,
        // The products are f32: progress below about 1e-9 of the loss is rounding.
        ftol: 1e-9,
        ..Default::default()
    };
    let mut evals = 0usize;
    let m = crate::eval::lbfgs::minimize(
        |x| {
            evals += 1;
            if let Some(b) = &bar {
                b.set_message(format!("{evals} evaluations"));
            }
            objective(x)
        },
        vec![0.0; d * c + c],
        &opts,
    )?;
    progress::finish(bar);
    if !m.value.is_finite() {
        return Err(format!(
            "the L-BFGS linear probe diverged (loss {})",
            m.value
        ));
    }
    let b = &m.x[d * c..];
    let top1 = |f: &Features, zf: Tensor<Inner, 2>| -> Result<(usize, usize), String> {
        let mut logits = host(zf.matmul(weights(&m.x)))?;
        for row in logits.chunks_exact_mut(c) {
            for (v, bj) in row.iter_mut().zip(b) {
                *v += *bj as f32;
            }
        }
        Ok(accuracy(&logits, &f.labels, c))
    };
    let (train_hits, _) = top1(train, z)?;
    let hits = top1(test, standardized(test, &mean, &std, device))?;
    tracing::debug!(
        "L-BFGS probe: {} iterations, {} evaluations, stopped on {:?}",
        m.iterations,
        m.evaluations,
        m.stop
    );
    Ok(LinearResult {
        test: Accuracy::of_hits(hits, test.n),
        train_top1: train_hits as f64 / n as f64,
        final_loss: m.value,
        epochs: 0,
        lr: 0.0,
        iterations: Some(m.iterations),
    })
}

fn normalized(f: &Features, device: &Device) -> Tensor<Inner, 2> {
    let mut data = f.data.clone();
    crate::eval::features::normalize_rows(&mut data, f.dim);
    Tensor::from_data(TensorData::new(data, [f.n, f.dim]), device)
}

/// Weighted kNN accuracy of `test` against `train`.
pub fn knn(
    train: &Features,
    test: &Features,
    classes: usize,
    spec: &KnnSpec,
    device: &Device,
) -> Result<Accuracy, String> {
    check(train, test, classes)?;
    if spec.k == 0 || spec.temperature.is_nan() || spec.temperature <= 0.0 {
        return Err(format!(
            "kNN needs k >= 1 and temperature > 0 (got k {}, temperature {})",
            spec.k, spec.temperature
        ));
    }
    let k = spec.k.min(train.n);
    let bank = normalized(train, device).transpose();
    let queries = normalized(test, device);
    let chunk = 256;
    let (mut t1, mut t5) = (0usize, 0usize);
    let bar = progress::bar(test.n as u64, "kNN");
    for start in (0..test.n).step_by(chunk) {
        let m = chunk.min(test.n - start);
        let sim = queries.clone().narrow(0, start, m).matmul(bank.clone());
        let (vals, idx) = sim.topk_with_indices(k, 1);
        let vals: Vec<f32> = vals
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        let idx: Vec<i64> = idx
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        let mut scores = vec![0f32; m * classes];
        for q in 0..m {
            for j in 0..k {
                let label = train.labels[idx[q * k + j] as usize] as usize;
                scores[q * classes + label] +=
                    ((vals[q * k + j] as f64) / spec.temperature).exp() as f32;
            }
        }
        let (a, b) = accuracy(&scores, &test.labels[start..start + m], classes);
        t1 += a;
        t5 += b;
        progress::tick(&bar, m as u64);
    }
    progress::finish(bar);
    Ok(Accuracy::of_hits((t1, t5), test.n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two well-separated Gaussian blobs per class in 8-d.
    fn blobs(n: usize, classes: usize, seed: u64) -> Features {
        let mut rng = Rng::new(seed);
        let dim = 8;
        let mut data = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let c = i % classes;
            for j in 0..dim {
                let centre = if j == c { 4.0 } else { 0.0 };
                data.push((centre + rng.normal()) as f32);
            }
            labels.push(c as i64);
        }
        Features {
            data,
            labels,
            n,
            dim,
        }
    }

    fn cpu() -> Device {
        crate::parse_device("cpu").unwrap()
    }

    #[test]
    fn linear_probe_separates_blobs_with_both_optimizers() {
        let (train, test) = (blobs(600, 4, 1), blobs(200, 4, 2));
        for opt in [ProbeOptimizer::Lars, ProbeOptimizer::Sgd] {
            let spec = LinearSpec {
                epochs: 30,
                batch_size: 64,
                warmup_epochs: 1,
                optimizer: opt,
                // LARS scales each step by 0.001 |w| / |g|, so it needs a large lr (MAE:
                // blr 0.1 at batch 16384, i.e. lr 6.4), as here.
                blr: if opt == ProbeOptimizer::Lars {
                    25.6
                } else {
                    0.1
                },
                ..LinearSpec::default()
            };
            let r = linear_probe(&train, &test, 4, &spec, &cpu()).unwrap();
            assert!(r.test.top1 > 0.95, "{opt:?}: {r:?}");
            assert_eq!(r.test.top5, 1.0);
        }
    }

    #[test]
    fn lbfgs_probe_reaches_the_hand_solved_optimum() {
        // Half the points at x = +1 (class 1), half at x = -1 (class 0): by symmetry the
        // weights are w1 = -w0 = a and the objective is log(1 + e^(-2a)) + l2 a^2, minimal
        // where l2 a = sigmoid(-2a).
        let l2 = 0.1;
        let feats = Features {
            data: (0..100)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect(),
            labels: (0..100).map(|i| if i % 2 == 0 { 1 } else { 0 }).collect(),
            n: 100,
            dim: 1,
        };
        let (mut lo, mut hi) = (0.0f64, 10.0f64);
        for _ in 0..200 {
            let a = 0.5 * (lo + hi);
            if l2 * a < 1.0 / (1.0 + (2.0 * a).exp()) {
                lo = a;
            } else {
                hi = a;
            }
        }
        let a = 0.5 * (lo + hi);
        let optimum = (1.0 + (-2.0 * a).exp()).ln() + l2 * a * a;
        let spec = LinearSpec {
            optimizer: ProbeOptimizer::Lbfgs,
            l2: Some(l2),
            ..LinearSpec::default()
        };
        let r = linear_probe(&feats, &feats, 2, &spec, &cpu()).unwrap();
        assert!(
            (r.final_loss - optimum).abs() < 1e-6,
            "loss {} against {optimum} (a = {a}): {r:?}",
            r.final_loss
        );
        assert_eq!((r.test.top1, r.train_top1), (1.0, 1.0));
        assert!(r.iterations.is_some_and(|i| i < 100), "{r:?}");
    }

    #[test]
    fn lbfgs_probe_matches_lars_on_separable_blobs() {
        let (train, test) = (blobs(600, 4, 1), blobs(200, 4, 2));
        let lars = LinearSpec {
            epochs: 30,
            batch_size: 64,
            warmup_epochs: 1,
            blr: 25.6,
            ..LinearSpec::default()
        };
        let lbfgs = LinearSpec {
            optimizer: ProbeOptimizer::Lbfgs,
            ..LinearSpec::default()
        };
        let a = linear_probe(&train, &test, 4, &lars, &cpu()).unwrap();
        let b = linear_probe(&train, &test, 4, &lbfgs, &cpu()).unwrap();
        assert!(
            b.test.top1 > 0.95 && b.test.top1 >= a.test.top1 - 0.01,
            "LARS {a:?}, L-BFGS {b:?}"
        );
        assert!(b.final_loss.is_finite() && b.final_loss < 0.2, "{b:?}");
    }

    #[test]
    fn linear_probe_on_shuffled_labels_is_at_chance() {
        let train = blobs(600, 4, 1);
        let mut test = blobs(400, 4, 2);
        let mut rng = Rng::new(9);
        for l in &mut test.labels {
            *l = (rng.below(4)) as i64;
        }
        let spec = LinearSpec {
            epochs: 5,
            batch_size: 64,
            warmup_epochs: 1,
            ..LinearSpec::default()
        };
        let r = linear_probe(&train, &test, 4, &spec, &cpu()).unwrap();
        assert!(r.test.top1 < 0.4, "{r:?}");
    }

    #[test]
    fn knn_votes_with_neighbours() {
        let (train, test) = (blobs(400, 4, 3), blobs(100, 4, 4));
        let a = knn(&train, &test, 4, &KnnSpec::default(), &cpu()).unwrap();
        assert!(a.top1 > 0.95, "{a:?}");
        // k = 1 on the training set itself finds every point.
        let one = knn(
            &train,
            &train,
            4,
            &KnnSpec {
                k: 1,
                temperature: 0.07,
            },
            &cpu(),
        )
        .unwrap();
        assert_eq!(one.top1, 1.0);
    }

    #[test]
    fn bad_labels_and_settings_are_reported() {
        let (train, mut test) = (blobs(40, 4, 3), blobs(10, 4, 4));
        test.labels[0] = 7;
        let e = knn(&train, &test, 4, &KnnSpec::default(), &cpu()).unwrap_err();
        assert!(e.contains("label 7"), "{e}");
        let e = knn(
            &train,
            &train,
            4,
            &KnnSpec {
                k: 0,
                temperature: 0.07,
            },
            &cpu(),
        )
        .unwrap_err();
        assert!(e.contains("k >= 1"), "{e}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(probe_lr(0.0, 1.0, 2.0, 10.0), 0.0);
        assert!((probe_lr(1.0, 1.0, 2.0, 10.0) - 0.5).abs() < 1e-12);
        assert!((probe_lr(2.0, 1.0, 2.0, 10.0) - 1.0).abs() < 1e-12);
        assert!((probe_lr(6.0, 1.0, 2.0, 10.0) - 0.5).abs() < 1e-12);
        assert!(probe_lr(10.0, 1.0, 2.0, 10.0).abs() < 1e-12);
    }
}
