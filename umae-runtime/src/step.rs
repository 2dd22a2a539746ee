//! One training step, readable as the paper's Eq. (10):
//! loss = target loss + sum_i lambda_i * regularizer_i (+ the online probe's cross-entropy,
//! whose gradient never reaches the encoder).

use std::path::Path;
use std::sync::Arc;
use umae_api::burn::nn::loss::CrossEntropyLossConfig;
use umae_api::burn::tensor::{Int, Tensor, TensorData};

use umae_api::burn::tensor::Distribution;
use umae_api::recipe::Recipe;
use umae_api::{Device, EncoderOutput, Grads, Inner, Mask, Preparation, Rng, B};

use crate::data::{Dataset, Pipeline};
use crate::model::{images_tensor, Model};
use crate::optim::AdamW;
use crate::parallel::Peer;

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

/// Scalars of one pass, in the order of [`StepOutput::names`].
pub struct StepOutput {
    pub grads: Grads,
    /// `[total, target, reg_0..reg_k (unweighted), probe_loss, probe_correct]`, not yet read.
    pub scalars: Tensor<B, 1>,
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

/// Forward and backward of one micro-batch. `scale` divides the loss (gradient accumulation).
/// With data parallelism (`peer`), the regularizers see the features of every peer's images.
pub fn forward_backward(
    model: &Model,
    norm: Option<&mut ProbeNorm>,
    images: Tensor<B, 4>,
    labels: &[i64],
    mask: &Mask,
    scale: f64,
    peer: Option<&Peer>,
) -> Result<StepOutput, String> {
    let device = images.device();
    // The components' matrix products run in the recipe's precision; losses stay f32.
    let (encoded, target_loss) = umae_api::precision::with(model.precision, || {
        let encoded: EncoderOutput = model.encoder.forward(images.clone(), Some(mask));
        let pred = model.decoder.forward(&encoded, mask);
        (encoded, model.target.loss(&images, pred, mask))
    });

    let mut total = target_loss.clone();
    let mut scalars = vec![target_loss];
    // Data parallel: each peer computes the regularizers over the gathered features, with
    // gradients to its own rows only, weighted by the number of peers so that the mean of the
    // peers' gradients is the gradient of the regularizer over the global batch.
    let (gathered, reg_scale) = match peer {
        Some(p) if p.world > 1 && !model.regularizers.is_empty() => (
            EncoderOutput {
                tokens: p.gather(encoded.tokens.clone())?,
                pooled: p.gather(encoded.pooled.clone())?,
                prefix: encoded.prefix,
            },
            p.world as f64,
        ),
        _ => (encoded.clone(), 1.0),
    };
    let mut reg_extra: Option<Tensor<B, 1>> = None;
    for r in &model.regularizers {
        let term = r.term.loss(&gathered);
        total = total + term.clone() * r.weight;
        if reg_scale != 1.0 {
            let extra = term.clone() * (r.weight * (reg_scale - 1.0));
            reg_extra = Some(match reg_extra {
                Some(e) => e + extra,
                None => extra,
            });
        }
        scalars.push(term);
    }
    match (norm, &model.probe) {
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
            total = total + ce.clone();
            scalars.push(ce);
            scalars.push(correct);
        }
        _ => {
            scalars.push(Tensor::zeros([1], &device));
            scalars.push(Tensor::zeros([1], &device));
        }
    }
    scalars.insert(0, total.clone());
    let scalars = Tensor::cat(scalars, 0).detach();
    let objective = match reg_extra {
        Some(extra) => total + extra,
        None => total,
    };
    let grads = (objective / scale).backward();
    Ok(StepOutput { grads, scalars })
}

/// One micro-batch of training: draw the mask, forward, backward, and add every component's
/// gradients to the optimizer. Returns the step's scalars (see [`StepOutput`]), not yet read.
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
    let out = forward_backward(model, norm, images, labels, &mask, accum as f64, None)?;
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
) -> Result<(Model, AdamW, Option<ProbeNorm>), String> {
    let model = Model::build(recipe, device).map_err(|e| e.to_string())?;
    if model.encoder.num_params() == 0 {
        return Err(format!(
            "encoder `{}` has no parameters to pretrain; it is meant for `umae eval` baselines",
            model.names[1]
        ));
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
) -> Result<(), String> {
    let g = model.geometry;
    let pipe = dataset.map(|d| Pipeline::new(d, &recipe.data, false, recipe.seed));
    let mut sample = |n: usize| -> Result<Tensor<B, 4>, String> {
        match &pipe {
            Some(p) => {
                let mut idx = Rng::derive(recipe.seed, &[0x7072_6570]).permutation(p.dataset.len());
                idx.truncate(n.max(1));
                let b = p.batch(&idx, 0)?;
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
        .map_err(|e| format!("target `{name}`: {e}"))?
    {
        tracing::info!("{line}");
    }
    Ok(())
}
