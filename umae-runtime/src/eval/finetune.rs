//! Full fine-tuning of a pretrained encoder with a linear head (MAE's protocol): AdamW
//! (0.9, 0.999) with layer-wise learning-rate decay, label smoothing, stochastic depth, linear
//! warmup and half-cosine decay per iteration; top-1/top-5 on the test split after each epoch.

use serde::{Deserialize, Serialize};
use umae_api::burn::nn::loss::CrossEntropyLossConfig;
use umae_api::burn::nn::{Initializer, LinearConfig};
use umae_api::burn::prelude::Backend;
use umae_api::recipe::{OptimizerSpec, ScheduleSpec};
use umae_api::{Device, Rng, Trainable, B};

pub use umae_api::recipe::FinetuneSpec;

use crate::checkpoint::source::Loaded;
use crate::data::{self, Loader, Pipeline, Split};
use crate::eval::linear::Accuracy;
use crate::model::{images_tensor, Probe};
use crate::optim::{learning_rate, AdamW};
use crate::progress;
use crate::step::labels_tensor;

/// One epoch of fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneEpoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub test: Accuracy,
}

/// Fine-tune the loaded encoder in place; `each` sees every finished epoch.
pub fn finetune(
    loaded: &mut Loaded,
    spec: &FinetuneSpec,
    device: &Device,
    mut each: impl FnMut(&FinetuneEpoch),
) -> crate::Result<Vec<FinetuneEpoch>> {
    if spec.epochs == 0 || spec.batch_size == 0 {
        return Err(crate::Error::recipe(
            "fine-tuning needs epochs >= 1 and batch_size >= 1",
        ));
    }
    if !(0.0..1.0).contains(&spec.drop_path) || !(0.0..1.0).contains(&spec.label_smoothing) {
        return Err(crate::Error::recipe(
            "drop_path and label_smoothing must be in [0, 1)",
        ));
    }
    let recipe = loaded.recipe.clone();
    let model = &mut loaded.model;
    let encoder = &mut model.encoder;
    if encoder.num_params() == 0 {
        return Err(crate::Error::recipe(format!(
            "encoder `{}` has no parameters to fine-tune",
            model.names[1]
        )));
    }
    let classes = recipe.data.num_classes;
    B::seed(device, spec.seed);
    let mut head = Probe {
        head: LinearConfig::new(encoder.dim(), classes)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 2e-5,
            })
            .init(device),
    };
    // The encoder says how its parameters stack into layers (MAE's layer-wise decay).
    let depth = encoder.layers();
    let mut opt = AdamW::new(OptimizerSpec {
        betas: (0.9, 0.999),
        weight_decay: spec.weight_decay,
        ..OptimizerSpec::default()
    });
    let layer_of = |path: &str| encoder.layer_id(path).min(depth + 1);
    let mut scales = Vec::new();
    encoder.visit_params(&mut |info, _| {
        let scale = spec
            .layer_decay
            .powi((depth + 1 - layer_of(info.path)) as i32);
        scales.push((info.path.to_string(), scale));
    });
    for (path, scale) in scales {
        opt.lr_scale.insert(format!("encoder.{path}"), scale);
    }
    let schedule = ScheduleSpec {
        warmup_epochs: spec.warmup_epochs as f64,
        min_lr: 1e-6,
    };
    let peak = spec.blr * spec.batch_size as f64 / 256.0;
    let train_set = data::open(&recipe.data, Split::Train, recipe.seed)?;
    if !train_set.labeled() {
        return Err(crate::Error::data(format!(
            "{}: the data has no labels, and fine-tuning trains a classifier: fine-tune on labeled data (format: ImageFolder, or shards with KEY.cls members)",
            recipe.data.root
        )));
    }
    let test_set = data::open(&recipe.data, Split::Eval, recipe.seed)?;
    let batch = spec.batch_size.min(train_set.len());
    let steps = train_set.len() / batch;
    let train_pipe = Pipeline::new(train_set.clone(), &recipe.data, true, spec.seed);
    let test_pipe = Pipeline::new(test_set.clone(), &recipe.data, false, spec.seed);
    let ce = CrossEntropyLossConfig::new()
        .with_smoothing((spec.label_smoothing > 0.0).then_some(spec.label_smoothing as f32))
        .init(device);
    let g = model.geometry;
    let mut out = Vec::new();
    for epoch in 0..spec.epochs {
        encoder.set_trainable(true);
        head.set_trainable(true);
        if !encoder.set_drop_path(spec.drop_path) && spec.drop_path > 0.0 && epoch == 0 {
            tracing::warn!(
                "encoder `{}` has no stochastic depth; drop_path is ignored",
                model.names[1]
            );
        }
        let order = Rng::derive(spec.seed, &[epoch as u64, 0xF1E]).permutation(train_set.len());
        let loader = Loader::start(
            &train_pipe,
            order[..steps * batch].to_vec(),
            batch,
            true,
            epoch as u64,
            recipe.data.workers,
        );
        let bar = progress::bar(
            steps as u64,
            &format!("fine-tune {}/{}", epoch + 1, spec.epochs),
        );
        let mut loss_sum = 0.0;
        for (s, b) in loader.enumerate() {
            let b = b?;
            let lr = learning_rate(
                epoch as f64 + s as f64 / steps as f64,
                peak,
                &schedule,
                spec.epochs as f64,
            );
            let x = images_tensor(b.images, b.n, &g, device);
            let logits = head.head.forward(encoder.forward(x, None).pooled);
            let loss = ce.forward(logits, labels_tensor(&b.labels, device));
            let grads = loss.clone().backward();
            opt.accumulate("encoder", encoder.as_ref(), &grads);
            opt.accumulate("head", &head, &grads);
            opt.step(
                &mut [("encoder", encoder.as_mut()), ("head", &mut head)],
                lr,
                &mut [],
                0.0,
            );
            let l = loss.into_scalar() as f64;
            if !l.is_finite() {
                return Err(crate::Error::Failed(format!(
                    "fine-tuning diverged (loss {l}) at epoch {}: lower --blr",
                    epoch + 1
                )));
            }
            loss_sum += l;
            progress::tick(&bar, 1);
        }
        progress::finish(bar);
        // Test without stochastic depth and without building an autodiff graph.
        encoder.set_drop_path(0.0);
        encoder.set_trainable(false);
        head.set_trainable(false);
        let (mut t1, mut t5) = (0usize, 0usize);
        for b in Loader::start(
            &test_pipe,
            (0..test_set.len()).collect(),
            256,
            false,
            0,
            recipe.data.workers,
        ) {
            let b = b?;
            let x = images_tensor(b.images, b.n, &g, device);
            let scores: Vec<f32> = head
                .head
                .forward(encoder.forward(x, None).pooled)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| format!("{e:?}"))?;
            let (a, c) = crate::eval::linear::accuracy(&scores, &b.labels, classes);
            t1 += a;
            t5 += c;
        }
        let n = test_set.len().max(1) as f64;
        let row = FinetuneEpoch {
            epoch: epoch + 1,
            train_loss: loss_sum / steps.max(1) as f64,
            test: Accuracy {
                top1: t1 as f64 / n,
                top5: t5 as f64 / n,
            },
        };
        each(&row);
        out.push(row);
    }
    Ok(out)
}
