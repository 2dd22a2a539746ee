//! One training step, readable as the paper's Eq. (10):
//! loss = target loss + sum_i lambda_i * regularizer_i (+ the online probe's cross-entropy,
//! whose gradient never reaches the encoder).

use std::path::Path;
use std::sync::Arc;
use umae_api::burn::nn::loss::CrossEntropyLossConfig;
use umae_api::burn::tensor::{Int, Tensor, TensorData};

use umae_api::burn::tensor::Distribution;
use umae_api::recipe::Recipe;
use umae_api::{Device, EncoderOutput, Grads, Inner, Mask, PluginError, Preparation, Rng, B};

use crate::data::{Dataset, Pipeline};
use crate::model::{images_tensor, Model};
use crate::optim::AdamW;

/// Running statistics of the probe's BatchNorm (no affine parameters).
#[derive(Debug, Clone)]
pub struct ProbeNorm {
    pub mean: Tensor<Inner, 1>,
    pub var: Tensor<Inner, 1>,
}

impl ProbeNorm {
    pub fn new(dim: usize, device: &Device) -> Self {
        ProbeNorm {
            mean: Tensor::zeros([dim], device),
            var: Tensor::ones([dim], device),
        }
    }
}

/// What one pass computed, besides gradients: the terms of Eq. (10), each a mean over the
/// pass's images (the probe's hits a count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepScalars {
    /// The objective: target loss + sum of weighted regularizers + the probe's cross-entropy.
    pub loss: f64,
    /// The target's loss over masked patches.
    pub target: f64,
    /// Each regularizer's unweighted value, in the recipe's order (names: [`Terms`]).
    pub regularizers: Vec<f64>,
    /// The online probe's cross-entropy (0 without a probe).
    pub probe_loss: f64,
    /// Images the online probe classified correctly.
    pub probe_correct: f64,
}

impl StepScalars {
    /// Packed as `[loss, target, reg_0..reg_k, probe_loss, probe_correct]`: one tensor, so
    /// that a step reads the device once (and replicas all-reduce once).
    pub fn to_vec(&self) -> Vec<f64> {
        let mut v = vec![self.loss, self.target];
        v.extend(&self.regularizers);
        v.extend([self.probe_loss, self.probe_correct]);
        v
    }

    /// The inverse of [`StepScalars::to_vec`] for `regularizers` terms; missing values are 0
    /// (a running sum before its first step).
    pub fn from_slice(v: &[f64], regularizers: usize) -> Self {
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        StepScalars {
            loss: at(0),
            target: at(1),
            regularizers: (0..regularizers).map(|i| at(2 + i)).collect(),
            probe_loss: at(2 + regularizers),
            probe_correct: at(3 + regularizers),
        }
    }

    /// Read a packed scalar tensor (see [`StepScalars::to_vec`]) from its device.
    pub fn read(t: Tensor<B, 1>, regularizers: usize) -> Result<Self, String> {
        let v = t
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| format!("cannot read the step's losses: {e:?}"))?;
        Ok(Self::from_slice(&v, regularizers))
    }

    /// Add `other` term by term (running sums over micro-batches and epochs).
    pub fn add(&mut self, other: &StepScalars) {
        self.regularizers.resize(other.regularizers.len(), 0.0);
        self.loss += other.loss;
        self.target += other.target;
        for (a, b) in self.regularizers.iter_mut().zip(&other.regularizers) {
            *a += b;
        }
        self.probe_loss += other.probe_loss;
        self.probe_correct += other.probe_correct;
    }

    /// The losses divided by `n` (means over micro-batches); the probe's hit count is kept.
    pub fn mean_over(&self, n: f64) -> StepScalars {
        StepScalars {
            loss: self.loss / n,
            target: self.target / n,
            regularizers: self.regularizers.iter().map(|r| r / n).collect(),
            probe_loss: self.probe_loss / n,
            probe_correct: self.probe_correct,
        }
    }
}

/// The names of a model's loss terms, as metrics rows write them: `target.<name>` and
/// `reg.<name>` per regularizer.
#[derive(Debug, Clone)]
pub struct Terms {
    pub target: String,
    pub regularizers: Vec<String>,
}

impl Terms {
    pub fn of(model: &Model) -> Terms {
        Terms {
            target: format!("target.{}", model.names[3]),
            regularizers: model
                .regularizers
                .iter()
                .map(|r| format!("reg.{}", r.name))
                .collect(),
        }
    }

    /// Each named loss with its value: the total, the target, each regularizer, the probe's.
    pub fn named(&self, s: &StepScalars) -> Vec<(String, f64)> {
        let mut v = vec![
            ("loss".to_string(), s.loss),
            (self.target.clone(), s.target),
        ];
        v.extend(
            self.regularizers
                .iter()
                .cloned()
                .zip(s.regularizers.iter().copied()),
        );
        v.push(("probe.loss".to_string(), s.probe_loss));
        v
    }

    /// The first term that is NaN or infinite, e.g. `the loss term target.pixels became NaN`
    /// (the total only when no single term is named).
    pub fn nonfinite(&self, s: &StepScalars) -> Option<String> {
        let named = self.named(s);
        let bad: Vec<String> = named[1..]
            .iter()
            .filter(|(_, v)| !v.is_finite())
            .map(|(n, v)| format!("{n} became {}", *v as f32))
            .collect();
        if !bad.is_empty() {
            Some(format!("the loss term {}", bad.join(", ")))
        } else if !s.loss.is_finite() {
            Some(format!("the loss became {}", s.loss as f32))
        } else {
            None
        }
    }
}

/// A pass's gradients and its scalars (see [`StepScalars::to_vec`]), not yet read.
pub struct StepOutput {
    pub grads: Grads,
    pub scalars: Tensor<B, 1>,
}

/// How the regularizers see a batch. On one device they see the encoder's output as it is;
/// with data parallelism the executor ([`crate::exec`]) gathers every peer's features and
/// weights the regularizers' gradients so that the peers' mean is the global batch's gradient.
pub trait FeatureExchange {
    /// The features the regularizers are computed on.
    fn features(&self, local: &EncoderOutput) -> Result<EncoderOutput, String>;
    /// The regularizers' weighted sum as it enters the backward pass.
    fn regularizer_gradient(&self, regularizers: Tensor<B, 1>) -> Tensor<B, 1>;
}

/// One device: the regularizers see this batch's features, their gradient unweighted.
pub struct OwnBatch;

impl FeatureExchange for OwnBatch {
    fn features(&self, local: &EncoderOutput) -> Result<EncoderOutput, String> {
        Ok(local.clone())
    }
    fn regularizer_gradient(&self, regularizers: Tensor<B, 1>) -> Tensor<B, 1> {
        regularizers
    }
}

/// Probe logits with BatchNorm (batch statistics in training, running ones otherwise).
pub fn probe_logits(
    model: &Model,
    norm: &mut ProbeNorm,
    features: Tensor<B, 2>,
    train: bool,
) -> Tensor<B, 2> {
    let probe = model.probe.as_ref().expect("probe enabled");
    let f = features.detach();
    let [_, d] = f.dims();
    let (mean, var) = if train {
        let mean = f.clone().mean_dim(0);
        let var = (f.clone() - mean.clone()).powf_scalar(2.0).mean_dim(0);
        let m_in = mean.clone().inner().reshape([d]);
        let v_in = var.clone().inner().reshape([d]);
        norm.mean = norm.mean.clone() * 0.9 + m_in * 0.1;
        norm.var = norm.var.clone() * 0.9 + v_in * 0.1;
        (mean, var)
    } else {
        (
            Tensor::<B, 1>::from_inner(norm.mean.clone()).reshape([1, d]),
            Tensor::<B, 1>::from_inner(norm.var.clone()).reshape([1, d]),
        )
    };
    probe.head.forward((f - mean) / (var + 1e-6).sqrt())
}

pub fn labels_tensor(labels: &[i64], device: &Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(labels.to_vec(), [labels.len()]), device)
}

/// Forward and backward of one micro-batch, Eq. (10):
/// `loss = target loss + sum_i lambda_i * regularizer_i`, plus the online probe's
/// cross-entropy on detached features. `scale` divides the loss (gradient accumulation);
/// `exchange` says which features the regularizers see.
pub fn forward_backward(
    model: &Model,
    norm: Option<&mut ProbeNorm>,
    images: Tensor<B, 4>,
    labels: &[i64],
    mask: &Mask,
    scale: f64,
    exchange: &dyn FeatureExchange,
) -> Result<StepOutput, String> {
    let device = images.device();
    // The components' matrix products run in the recipe's precision; losses stay f32.
    let (encoded, target_loss) = umae_api::precision::with(model.precision, || {
        let encoded: EncoderOutput = model.encoder.forward(images.clone(), Some(mask));
        let pred = model.decoder.forward(&encoded, mask);
        (encoded, model.target.loss(&images, pred, mask))
    });

    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let mut terms = Vec::with_capacity(model.regularizers.len());
    let mut weighted = zero();
    if !model.regularizers.is_empty() {
        let features = exchange.features(&encoded)?;
        for r in &model.regularizers {
            let term = r.term.loss(&features);
            weighted = weighted + term.clone() * r.weight;
            terms.push(term);
        }
    }
    let (probe_loss, probe_correct) = match (norm, &model.probe) {
        (Some(norm), Some(_)) => {
            let logits = probe_logits(model, norm, encoded.pooled.clone(), true);
            let y = labels_tensor(labels, &device);
            let ce = CrossEntropyLossConfig::new()
                .init(&device)
                .forward(logits.clone(), y.clone());
            let correct = logits
                .argmax(1)
                .reshape([labels.len()])
                .equal(y)
                .float()
                .sum();
            (ce, correct)
        }
        _ => (zero(), zero()),
    };
    let loss = target_loss.clone() + weighted.clone() + probe_loss.clone();
    let mut packed = vec![loss, target_loss.clone()];
    packed.extend(terms);
    packed.extend([probe_loss.clone(), probe_correct]);
    let scalars = Tensor::cat(packed, 0).detach();
    let objective = target_loss + exchange.regularizer_gradient(weighted) + probe_loss;
    let grads = (objective / scale).backward();
    Ok(StepOutput { grads, scalars })
}

/// One micro-batch of training on one device: draw the mask, forward, backward, and add every
/// component's gradients to the optimizer. Returns the step's scalars (see [`StepOutput`]),
/// not yet read.
pub fn train_micro_batch(
    model: &Model,
    norm: Option<&mut ProbeNorm>,
    opt: &mut AdamW,
    images: Tensor<B, 4>,
    labels: &[i64],
    rng: &mut Rng,
    accum: usize,
) -> Result<Tensor<B, 1>, String> {
    let device = images.device();
    let mask = model
        .masker
        .sample(&model.geometry, labels.len(), rng)
        .to_device(&device);
    let out = forward_backward(model, norm, images, labels, &mask, accum as f64, &OwnBatch)?;
    for (prefix, m) in model.trainables() {
        opt.accumulate(prefix, m, &out.grads);
    }
    Ok(out.scalars)
}

/// Apply the accumulated gradients: the model at `lr`, the online probe at `probe_lr`.
pub fn apply_step(model: &mut Model, opt: &mut AdamW, lr: f64, probe_lr: f64) {
    let (mut main, mut probe) = model.groups_mut();
    opt.step(&mut main, lr, &mut probe, probe_lr);
}

/// What training needs besides data: the model, its optimizer and the probe's normalisation.
pub fn training_parts(
    recipe: &umae_api::recipe::Recipe,
    device: &Device,
) -> crate::Result<(Model, AdamW, Option<ProbeNorm>)> {
    let model = Model::build(recipe, device)?;
    if model.encoder.num_params() == 0 {
        return Err(crate::Error::recipe(format!(
            "encoder `{}` has no parameters to pretrain; it is meant for `umae eval` baselines",
            model.names[1]
        )));
    }
    let opt = AdamW::new(recipe.optimizer.clone());
    let norm = model
        .probe
        .as_ref()
        .map(|_| ProbeNorm::new(model.encoder.dim(), device));
    Ok((model, opt, norm))
}

/// Let the target fit what it needs (a tokenizer's codebook) before the first step, on images of
/// `dataset` (normalised, not augmented) or, without one (benchmarks), on random images; fitted
/// state is cached in `cache`.
pub fn prepare_target(
    model: &mut Model,
    recipe: &Recipe,
    dataset: Option<Arc<dyn Dataset>>,
    cache: Option<&Path>,
    device: &Device,
) -> crate::Result<()> {
    let g = model.geometry;
    let pipe = dataset.map(|d| Pipeline::new(d, &recipe.data, false, recipe.seed));
    let mut sample = |n: usize| -> Result<Tensor<B, 4>, PluginError> {
        match &pipe {
            Some(p) => {
                let mut idx = Rng::derive(recipe.seed, &[0x7072_6570]).permutation(p.dataset.len());
                idx.truncate(n.max(1));
                let b = p.batch(&idx, 0).map_err(PluginError::Failed)?;
                Ok(images_tensor(b.images, b.n, &g, device))
            }
            None => Ok(Tensor::random(
                [n.max(1), g.channels, g.height, g.width],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
        }
    };
    let mut prep = Preparation {
        sample: &mut sample,
        cache,
        data: format!("{:?}", recipe.data),
        seed: recipe.seed,
        device: device.clone(),
    };
    let name = model.names[3].clone();
    if let Some(line) = model
        .target
        .prepare(&mut prep)
        .map_err(|e| crate::Error::from(e).context(format!("target `{name}`")))?
    {
        tracing::info!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms() -> Terms {
        Terms {
            target: "target.pixels".into(),
            regularizers: vec!["reg.uniformity".into()],
        }
    }

    #[test]
    fn scalars_pack_in_one_order_and_back() {
        let s = StepScalars {
            loss: 1.5,
            target: 1.0,
            regularizers: vec![0.25],
            probe_loss: 0.5,
            probe_correct: 7.0,
        };
        assert_eq!(s.to_vec(), [1.5, 1.0, 0.25, 0.5, 7.0]);
        assert_eq!(StepScalars::from_slice(&s.to_vec(), 1), s);
        // An empty running sum (a fresh epoch) reads as zeros.
        assert_eq!(StepScalars::from_slice(&[], 1).regularizers, [0.0]);
        let mut sum = StepScalars::default();
        sum.add(&s);
        sum.add(&s);
        let mean = sum.mean_over(2.0);
        assert_eq!(mean.target, 1.0);
        assert_eq!(mean.probe_correct, 14.0, "hits are counted, not averaged");
        let named = terms().named(&s);
        assert_eq!(named[2], ("reg.uniformity".to_string(), 0.25));
        assert_eq!(named.len(), 4);
    }

    #[test]
    fn a_nonfinite_term_is_named_before_the_total() {
        let t = terms();
        let mut s = StepScalars {
            regularizers: vec![0.0],
            ..Default::default()
        };
        assert_eq!(t.nonfinite(&s), None);
        s.loss = f64::NAN;
        assert_eq!(t.nonfinite(&s).as_deref(), Some("the loss became NaN"));
        s.regularizers[0] = f64::INFINITY;
        assert_eq!(
            t.nonfinite(&s).as_deref(),
            Some("the loss term reg.uniformity became inf")
        );
        // The probe's hit count is not a loss.
        let s = StepScalars {
            regularizers: vec![0.0],
            probe_correct: f64::NAN,
            ..Default::default()
        };
        assert_eq!(t.nonfinite(&s), None);
    }
}
