//! `umae bench`: time training steps on synthetic input of a recipe's shape, or the input
//! pipeline alone on the recipe's data.

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
    /// CPU time of the process over wall time during the timed steps: how many cores were busy.
    pub cores_busy: Option<f64>,
}

/// CPU time (user + system) of the whole process so far, in seconds.
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut u = std::mem::zeroed::<libc::rusage>();
        (libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0).then_some(u)
    }?;
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// Peak resident set size from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resident set size now, from /proc (Linux).
pub fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
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
) -> crate::Result<BenchResult> {
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
            )?;
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
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    run(&mut model, steps)?;
    let seconds = t0.elapsed().as_secs_f64();
    let cores_busy = process_cpu_seconds()
        .zip(cpu0)
        .map(|(end, start)| (end - start) / seconds);
    Ok(BenchResult {
        batch,
        steps,
        seconds,
        images_per_s: (batch * steps) as f64 / seconds,
        ms_per_step: seconds * 1000.0 / steps as f64,
        peak_rss_mib: peak_rss_mib(),
        cores_busy,
    })
}

/// `umae bench --data`: the input pipeline alone (read, decode, augment, normalise into the
/// batch tensor the step takes) on the recipe's training data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineBench {
    pub batch: usize,
    /// Images timed in each measurement.
    pub images: usize,
    /// With one worker thread: the rate of one core.
    pub per_core: f64,
    pub workers: usize,
    /// With `workers` worker threads.
    pub with_workers: f64,
    /// CPU time over wall time during the `workers` measurement.
    pub cores_busy: Option<f64>,
}

/// Time `batches` batches of the training pipeline with one worker and with `workers`, after
/// one untimed pass over the same images (so files come from the page cache in both).
pub fn bench_pipeline(
    recipe: &Recipe,
    batch: usize,
    batches: usize,
    workers: usize,
) -> crate::Result<PipelineBench> {
    let set = crate::data::open(&recipe.data, crate::data::Split::Train, recipe.seed)?;
    let pipe = crate::data::Pipeline::new(set.clone(), &recipe.data, true, recipe.seed);
    let images = batch * batches;
    let mut order = Vec::with_capacity(images);
    for epoch in 0.. {
        if order.len() >= images {
            break;
        }
        order.extend(set.epoch_order(recipe.seed, epoch));
    }
    order.truncate(images);
    let pass = |w: usize| -> crate::Result<f64> {
        let t0 = Instant::now();
        for b in crate::data::Loader::start(&pipe, order.clone(), batch, false, 0, w) {
            b.map_err(crate::Error::data)?;
        }
        Ok(images as f64 / t0.elapsed().as_secs_f64())
    };
    pass(workers)?;
    let per_core = pass(1)?;
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    let with_workers = pass(workers)?;
    let cores_busy = process_cpu_seconds()
        .zip(cpu0)
        .map(|(end, start)| (end - start) / t0.elapsed().as_secs_f64());
    Ok(PipelineBench {
        batch,
        images,
        per_core,
        workers,
        with_workers,
        cores_busy,
    })
}

/// `umae device-check`: one training step's losses on a device against the CPU.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceCheck {
    /// Total loss of the step on the CPU, f32.
    pub cpu: f32,
    /// The same step on the device, f32.
    pub device_f32: f32,
    /// The same step on the device with bf16 matrix products.
    pub device_bf16: f32,
}

impl DeviceCheck {
    /// Relative differences to the CPU: (f32, bf16).
    pub fn errors(&self) -> (f32, f32) {
        let rel = |x: f32| (x - self.cpu).abs() / self.cpu.abs().max(1e-6);
        (rel(self.device_f32), rel(self.device_bf16))
    }

    /// Whether the device agrees with the CPU: within 1% in f32 (GPU matrix units may round
    /// products to TF32) and 5% with bf16 products.
    pub fn passed(&self) -> bool {
        let (f, h) = self.errors();
        self.device_f32.is_finite() && self.device_bf16.is_finite() && f <= 1e-2 && h <= 5e-2
    }
}

/// Build `recipe`'s model on the CPU and on `device` with the same weights (and the same fitted
/// target state), and compare the loss of one training step on the same images and masks, in
/// f32 and with bf16 products on the device.
pub fn device_check(recipe: &Recipe, device: &Device, batch: usize) -> crate::Result<DeviceCheck> {
    let cpu = crate::parse_device("cpu")?;
    let cache = std::env::temp_dir().join(format!("umae-device-check-{}", std::process::id()));
    std::fs::create_dir_all(&cache)
        .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let result = (|| {
        let (mut reference, opt, norm) = training_parts(recipe, &cpu)?;
        prepare_target(&mut reference, recipe, None, Some(&cache), &cpu)?;
        let snapshot = crate::exec::replicas::Snapshot::of(&reference, &norm, &opt);
        let (mut model, mut opt, mut norm) = training_parts(recipe, device)?;
        // The target loads what the CPU fitted from the cache instead of fitting again.
        prepare_target(&mut model, recipe, None, Some(&cache), device)?;
        snapshot.apply(&mut model, &mut norm, &mut opt, device)?;
        let g = reference.geometry;
        let n = batch * g.channels * g.height * g.width;
        let pixels: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let plan = reference
            .masker
            .sample(&g, batch, &mut Rng::new(recipe.seed));
        let labels = vec![0i64; batch];
        let loss = |m: &Model, d: &Device| -> Result<f32, String> {
            let images = crate::model::images_tensor(pixels.clone(), batch, &g, d);
            let out = crate::step::forward_backward(
                m,
                None,
                images,
                &labels,
                &plan.to_device(d),
                1.0,
                &crate::step::OwnBatch,
            )?;
            Ok(out.scalars.narrow(0, 0, 1).into_scalar())
        };
        let cpu_loss = loss(&reference, &cpu)?;
        model.precision = umae_api::precision::Precision::F32;
        let device_f32 = loss(&model, device)?;
        model.precision = umae_api::precision::Precision::Bf16;
        let device_bf16 = loss(&model, device)?;
        Ok(DeviceCheck {
            cpu: cpu_loss,
            device_f32,
            device_bf16,
        })
    })();
    let _ = std::fs::remove_dir_all(&cache);
    result
}
