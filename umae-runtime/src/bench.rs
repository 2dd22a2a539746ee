//! `umae bench`: time training steps on synthetic input of a recipe's shape.

use std::time::Instant;

use umae_api::burn::tensor::{Distribution, Tensor};
use umae_api::recipe::Recipe;
use umae_api::{Device, Rng, B};

use crate::model::Model;
use crate::step::{apply_step, prepare_target, train_micro_batch, training_parts};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub steps: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    pub ms_per_step: f64,
    /// Peak resident memory of the process (CPU), in MiB, when the OS reports it.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident set size from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Full training steps (mask, forward, backward, AdamW) after `warmup` untimed ones.
pub fn bench(
    recipe: &Recipe,
    device: &Device,
    batch: usize,
    steps: usize,
    warmup: usize,
) -> Result<BenchResult, String> {
    let (mut model, mut opt, mut norm) = training_parts(recipe, device)?;
    prepare_target(&mut model, recipe, None, None, device)?;
    let g = model.geometry;
    let images = Tensor::<B, 4>::random(
        [batch, g.channels, g.height, g.width],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let labels: Vec<i64> = (0..batch)
        .map(|i| (i % recipe.data.num_classes) as i64)
        .collect();
    let mut rng = Rng::new(recipe.seed);
    let mut run = |model: &mut Model, n: usize| -> Result<(), String> {
        for _ in 0..n {
            let scalars = train_micro_batch(
                model,
                norm.as_mut(),
                &mut opt,
                images.clone(),
                &labels,
                &mut rng,
                1,
            );
            apply_step(model, &mut opt, 1e-4, recipe.eval.probe_lr);
            // Read the loss, as the trainer does each step (this also waits for the device).
            let loss: f32 = scalars.narrow(0, 0, 1).into_scalar();
            if !loss.is_finite() {
                return Err(format!("the loss became {loss} during the benchmark"));
            }
        }
        Ok(())
    };
    run(&mut model, warmup)?;
    let t0 = Instant::now();
    run(&mut model, steps)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(BenchResult {
        batch,
        steps,
        seconds,
        images_per_s: (batch * steps) as f64 / seconds,
        ms_per_step: seconds * 1000.0 / steps as f64,
        peak_rss_mib: peak_rss_mib(),
    })
}
