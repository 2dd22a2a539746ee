//! The trainer: epochs of accumulated AdamW steps, metrics, evaluation, checkpoints, resume.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use umae_api::recipe::Recipe;
use umae_api::{Device, Rng};

use crate::analysis;
use crate::checkpoint::{self, HostTensor, State};
use crate::data::{self, Dataset, Loader, Pipeline, Split};
use crate::features::{encode, Pool};
use crate::model::{images_tensor, Model};
use crate::optim::{learning_rate, AdamW};
use crate::progress;
use crate::step::{
    apply_step, prepare_target, probe_logits, train_micro_batch, training_parts, ProbeNorm,
};

/// How to run.
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub device: Device,
    /// Further devices for data parallelism (`--device cuda:0,cuda:1` gives `cuda:1` here):
    /// each trains a replica on its share of every batch. Empty: one device.
    pub parallel: Vec<Device>,
    /// Train together with other processes (usually machines), each with the same devices.
    pub nodes: Option<crate::parallel::Nodes>,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Replace a run already in `run_dir` (its checkpoints, metrics and evaluations).
    pub force: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub epochs: usize,
    pub steps: u64,
    pub last_target_loss: f64,
    pub probe_accuracy: Option<f64>,
    pub erank: Option<f64>,
    /// Offline linear-probe and kNN top-1 after the last epoch, when the recipe asks for them.
    pub linear: Option<f64>,
    pub knn: Option<f64>,
    /// Fine-tuning top-1 after the last epoch, when `eval.finetune` is set.
    pub finetune: Option<f64>,
    /// Stopped by SIGINT or SIGTERM, after a checkpoint of the last step.
    pub interrupted: Option<String>,
}

/// The recipe's offline evaluations (`eval.linear`, `eval.knn`) on a checkpoint of the run,
/// exactly as `umae eval` runs them (features cached under `<run>/features`).
pub fn offline_eval(
    run_dir: &Path,
    checkpoint: &str,
    device: &Device,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let loaded =
        crate::source::load(run_dir, Some(checkpoint), &[], device).map_err(|e| e.to_string())?;
    let ev = loaded.recipe.eval.clone();
    let pool = crate::features::Pool::from_recipe(ev.pool);
    let d = &loaded.recipe.data;
    let fs = crate::features::feature_set(
        &loaded,
        pool,
        d.train_limit,
        d.eval_limit,
        256,
        device,
        true,
    )?;
    let mut row = serde_json::Map::new();
    if let Some(spec) = &ev.linear {
        let r = crate::probe::linear_probe(&fs.train, &fs.test, fs.classes, spec, device)?;
        row.insert("linear.top1".into(), json!(r.test.top1));
        row.insert("linear.top5".into(), json!(r.test.top5));
    }
    if let Some(spec) = &ev.knn {
        let a = crate::probe::knn(&fs.train, &fs.test, fs.classes, spec, device)?;
        row.insert("knn.top1".into(), json!(a.top1));
        row.insert("knn.top5".into(), json!(a.top5));
    }
    Ok(row)
}

/// The recipe's fine-tuning evaluation (`eval.finetune`) on a checkpoint of the run.
pub fn finetune_eval(
    run_dir: &Path,
    checkpoint: &str,
    device: &Device,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    let mut loaded =
        crate::source::load(run_dir, Some(checkpoint), &[], device).map_err(|e| e.to_string())?;
    let Some(spec) = loaded.recipe.eval.finetune.clone() else {
        return Ok(None);
    };
    let rows = crate::finetune::finetune(&mut loaded, &spec, device, |r| {
        tracing::info!(
            "fine-tune epoch {}/{}: train loss {:.4}, test top-1 {:.4}",
            r.epoch,
            spec.epochs,
            r.train_loss,
            r.test.top1
        )
    })?;
    let last = rows.last().expect("at least one epoch");
    let mut row = serde_json::Map::new();
    row.insert("finetune.top1".into(), json!(last.test.top1));
    row.insert("finetune.top5".into(), json!(last.test.top5));
    row.insert("finetune.epochs".into(), json!(rows));
    Ok(Some(row))
}

/// Append one JSON row to a `.jsonl` file (created if missing).
pub fn append_jsonl(path: &Path, row: &serde_json::Value) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    writeln!(f, "{row}").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

struct Metrics {
    path: PathBuf,
}

impl Metrics {
    fn write(&self, row: serde_json::Value) -> Result<(), String> {
        append_jsonl(&self.path, &row)
    }

    /// Drop rows written after `step` (by a run that stopped before its next checkpoint).
    fn truncate_after(&self, step: u64) -> Result<(), String> {
        let Ok(text) = fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        checkpoint::write_file_atomic(&self.path, &kept)
    }
}

fn evaluate_probe(
    model: &Model,
    norm: &mut ProbeNorm,
    pipeline: &Pipeline,
    batch: usize,
    device: &Device,
) -> Result<f64, String> {
    let mut correct = 0.0;
    let mut total = 0usize;
    for b in Loader::start(
        pipeline,
        (0..pipeline.dataset.len()).collect(),
        batch,
        false,
        0,
        2,
    ) {
        let b = b?;
        let x = images_tensor(b.images, b.n, &model.geometry, device);
        let out = model.encoder.forward(x, None);
        let logits = probe_logits(model, norm, out.pooled, false);
        let y = crate::step::labels_tensor(&b.labels, device);
        let c: f32 = logits
            .argmax(1)
            .reshape([b.n])
            .equal(y)
            .float()
            .sum()
            .into_scalar();
        correct += c as f64;
        total += b.n;
    }
    Ok(correct / total.max(1) as f64)
}

/// Write checkpoint `epoch-NNNN` of `state.epoch` atomically (with the recipe and a manifest
/// of checksums), point `latest` at it, and delete the checkpoints beyond
/// `train.keep_checkpoints`.
pub fn save_checkpoint(
    run_dir: &Path,
    recipe: &Recipe,
    model: &Model,
    norm: &Option<ProbeNorm>,
    opt: &AdamW,
    state: &State,
) -> Result<(), String> {
    let name = state.checkpoint_name();
    let dir = run_dir.join("checkpoints").join(&name);
    checkpoint::write_dir_atomic(&dir, |tmp| {
        let mut weights = checkpoint::collect_params(&model.trainables());
        if let Some(n) = norm {
            let d = n.mean.dims()[0];
            weights.insert(
                "probe_bn.mean".into(),
                HostTensor::from_inner(n.mean.clone(), &[d]),
            );
            weights.insert(
                "probe_bn.var".into(),
                HostTensor::from_inner(n.var.clone(), &[d]),
            );
        }
        checkpoint::write_safetensors(&tmp.join("model.safetensors"), &weights)?;
        let mut moments = std::collections::HashMap::new();
        for (k, t) in &opt.m {
            let n = t.dims()[0];
            moments.insert(format!("m.{k}"), HostTensor::from_inner(t.clone(), &[n]));
        }
        for (k, t) in &opt.v {
            let n = t.dims()[0];
            moments.insert(format!("v.{k}"), HostTensor::from_inner(t.clone(), &[n]));
        }
        checkpoint::write_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
        fs::write(tmp.join("recipe.ron"), recipe.tree.to_ron())
            .map_err(|e| format!("cannot write recipe.ron: {e}"))?;
        let text = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
        fs::write(tmp.join("state.json"), text).map_err(|e| format!("cannot write state.json: {e}"))
    })?;
    checkpoint::write_file_atomic(&run_dir.join("checkpoints").join("latest"), &name)?;
    if state.epoch_step == 0 && state.epoch > 0 {
        // The epoch is complete: its mid-epoch checkpoints are superseded.
        checkpoint::remove_within_epoch(run_dir, state.epoch - 1)?;
    }
    checkpoint::prune(run_dir, recipe.train.keep_checkpoints)
}

fn load_checkpoint(
    dir: &Path,
    model: &mut Model,
    norm: &mut Option<ProbeNorm>,
    opt: &mut AdamW,
    device: &Device,
) -> Result<State, String> {
    let state = checkpoint::read_state(dir)?;
    let weights = checkpoint::read_safetensors(&dir.join("model.safetensors"))?;
    checkpoint::load_params(
        &mut model.trainables_mut(),
        &weights,
        device,
        &dir.join("model.safetensors"),
    )?;
    if let Some(n) = norm {
        if let (Some(m), Some(v)) = (weights.get("probe_bn.mean"), weights.get("probe_bn.var")) {
            n.mean = m.to_inner(device);
            n.var = v.to_inner(device);
        }
    }
    let moments = checkpoint::read_safetensors(&dir.join("optimizer.safetensors"))?;
    for (k, t) in moments {
        if let Some(key) = k.strip_prefix("m.") {
            opt.m.insert(key.to_string(), t.to_inner(device));
        } else if let Some(key) = k.strip_prefix("v.") {
            opt.v.insert(key.to_string(), t.to_inner(device));
        }
    }
    opt.step = state.step;
    Ok(state)
}

/// The training position before the first step.
pub fn initial_state(recipe: &Recipe) -> State {
    State {
        epoch: 0,
        step: 0,
        rng: Rng::derive(recipe.seed, &[0x4D41_534B]),
        umae_version: env!("CARGO_PKG_VERSION").into(),
        epoch_step: 0,
        epoch_sums: Vec::new(),
        epoch_seen: 0,
    }
}

/// Start a run directory whose first checkpoint (`epoch-0000`) holds `model` as it is now, e.g.
/// an imported encoder. Evaluations read it; `umae run --resume` continues pretraining from it.
pub fn start_run_from(recipe: &Recipe, model: &Model, run_dir: &Path) -> Result<(), String> {
    if !checkpoint::list(run_dir).is_empty() || run_dir.join("metrics.jsonl").exists() {
        return Err(format!(
            "{} already holds a run: choose another output folder",
            run_dir.display()
        ));
    }
    fs::create_dir_all(run_dir.join("checkpoints"))
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    checkpoint::write_file_atomic(&run_dir.join("recipe.ron"), &recipe.tree.to_ron())?;
    let opt = AdamW::new(recipe.optimizer.clone());
    save_checkpoint(run_dir, recipe, model, &None, &opt, &initial_state(recipe))
}

/// Train a recipe into a run directory.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<Summary, String> {
    let device = &opts.device;
    let run_dir = &opts.run_dir;
    let mut existing = checkpoint::list(run_dir);
    let occupied = !existing.is_empty() || run_dir.join("metrics.jsonl").exists();
    if occupied && !opts.resume && !opts.force {
        return Err(format!(
            "{} already holds a run: continue it with `umae run --resume {}`, replace it with --force, or choose another --output",
            run_dir.display(),
            run_dir.display()
        ));
    }
    // Preflight, before anything is written: the dataset opens, and the directory is a
    // directory we can write to.
    let train_set: Arc<dyn Dataset> = data::open(&recipe.data, Split::Train, recipe.seed)?;
    if run_dir.exists() && !run_dir.is_dir() {
        return Err(format!(
            "--output {} is a file, not a directory",
            run_dir.display()
        ));
    }
    if opts.force && !opts.resume {
        clear_run(run_dir)?;
        existing.clear();
    }
    fs::create_dir_all(run_dir.join("checkpoints"))
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let probe_file = run_dir.join(".write-test");
    fs::write(&probe_file, b"")
        .and_then(|()| fs::remove_file(&probe_file))
        .map_err(|e| format!("cannot write into {}: {e}", run_dir.display()))?;
    if !opts.resume {
        checkpoint::write_file_atomic(&run_dir.join("recipe.ron"), &recipe.tree.to_ron())?;
    }

    let needs_eval = recipe.eval.online_probe || recipe.eval.erank_samples > 0;
    let eval_set = if needs_eval {
        Some(data::open(&recipe.data, Split::Eval, recipe.seed)?)
    } else {
        None
    };
    let train_pipe = Pipeline::new(train_set.clone(), &recipe.data, true, recipe.seed);
    let eval_pipe = eval_set.map(|d| Pipeline::new(d, &recipe.data, false, recipe.seed));

    let (mut model, mut opt, mut norm) = training_parts(recipe, device)?;
    check_disk_space(run_dir, &model)?;
    prepare_target(
        &mut model,
        recipe,
        Some(train_set.clone()),
        Some(run_dir),
        device,
    )?;
    let metrics = Metrics {
        path: run_dir.join("metrics.jsonl"),
    };

    let mut state = initial_state(recipe);
    if opts.resume && existing.is_empty() {
        if !run_dir.join("recipe.ron").exists() {
            return Err(format!(
                "{} has no checkpoint to resume from: start it with `umae run` instead",
                run_dir.display()
            ));
        }
        tracing::warn!(
            "{} has no checkpoint yet (stopped before the first one): starting it from the beginning",
            run_dir.display()
        );
        metrics.truncate_after(0)?;
    } else if opts.resume {
        // The newest checkpoint that verifies and loads; a damaged one is reported and the
        // one before it is tried.
        let mut problems = Vec::new();
        let mut resumed = None;
        for dir in existing.iter().rev() {
            let loaded = checkpoint::verify(dir)
                .and_then(|()| load_checkpoint(dir, &mut model, &mut norm, &mut opt, device));
            match loaded {
                Ok(s) => {
                    resumed = Some((dir, s));
                    break;
                }
                Err(e) => {
                    tracing::warn!("{e}: trying the checkpoint before it");
                    problems.push(e);
                }
            }
        }
        let Some((dir, loaded)) = resumed else {
            return Err(format!(
                "no checkpoint of {} can be loaded: {}",
                run_dir.display(),
                problems.join("; ")
            ));
        };
        state = loaded;
        metrics.truncate_after(state.step)?;
        tracing::info!(
            "resuming {} from {} (after epoch {}, step {})",
            run_dir.display(),
            dir.file_name().unwrap_or_default().to_string_lossy(),
            state.epoch,
            state.step
        );
    }

    // Data parallel: `train.batch_size` images per device, one global batch drawn per
    // micro-step and split between the devices.
    let local = 1 + opts.parallel.len();
    let world = local * opts.nodes.as_ref().map_or(1, |n| n.count);
    let batch = recipe.train.batch_size * world;
    let accum = recipe.train.accum_steps;
    let micro_per_epoch = train_set.len() / batch;
    let steps_per_epoch = micro_per_epoch / accum;
    if steps_per_epoch == 0 {
        return Err(format!(
            "the training set has {} images, fewer than one effective batch of {} (batch_size {} x accum_steps {} x {world} device(s)): lower train.batch_size or accum_steps",
            train_set.len(), batch * accum, recipe.train.batch_size, accum
        ));
    }
    let replicas = if world > 1 {
        let devices: Vec<Device> = std::iter::once(device.clone())
            .chain(opts.parallel.iter().cloned())
            .collect();
        let snapshot = crate::parallel::Snapshot::of(&model, &norm, &opt);
        Some(crate::parallel::Replicas::start(
            recipe,
            &devices,
            opts.nodes.as_ref(),
            snapshot,
            train_set.clone(),
            Some(run_dir.to_path_buf()),
        )?)
    } else {
        None
    };
    let epochs = recipe.train.epochs;
    let peak = recipe.peak_lr_on(world);
    let names: Vec<String> = std::iter::once("loss".to_string())
        .chain(std::iter::once(format!("target.{}", model.names[3])))
        .chain(model.regularizers.iter().map(|r| format!("reg.{}", r.name)))
        .chain(["probe.loss".to_string(), "probe.correct".to_string()])
        .collect();
    let mut summary = Summary {
        epochs,
        steps: state.step,
        ..Default::default()
    };
    let across = opts
        .nodes
        .as_ref()
        .map(|n| {
            format!(
                " ({local} on each of {} nodes; this is node {})",
                n.count, n.rank
            )
        })
        .unwrap_or_default();
    tracing::info!(
        "training {} for {epochs} epochs on {world} device(s){across}, {steps_per_epoch} steps/epoch, effective batch {}, peak lr {peak:.3e}",
        recipe.name, batch * accum
    );

    // Ctrl-C or SIGTERM: finish the current step, write a checkpoint, stop. A second Ctrl-C
    // stops at once.
    let stop = interrupt_flag()?;
    let mut skipped = 0usize;
    for epoch in state.epoch..epochs {
        let t0 = Instant::now();
        // A checkpoint written mid-epoch continues that epoch where it stopped: the same order
        // and augmentations (drawn per epoch and image), minus the batches already trained.
        let first = std::mem::take(&mut state.epoch_step).min(steps_per_epoch);
        let order = Rng::derive(recipe.seed, &[epoch as u64, 0xDA7A]).permutation(train_set.len());
        let order = order[first * accum * batch..steps_per_epoch * accum * batch].to_vec();
        let mut loader = Loader::start(
            &train_pipe,
            order,
            batch,
            true,
            epoch as u64,
            recipe.data.workers,
        );
        let bar = progress::bar(
            steps_per_epoch as u64,
            &format!("epoch {}/{epochs}", epoch + 1),
        );
        if let Some(bar) = &bar {
            bar.set_position(first as u64);
        }
        let mut sums = std::mem::take(&mut state.epoch_sums);
        sums.resize(names.len(), 0.0);
        let mut seen = std::mem::take(&mut state.epoch_seen);
        let mut window_start = Instant::now();
        let mut window_images = 0usize;
        for s in first..steps_per_epoch {
            let lr = learning_rate(
                epoch as f64 + s as f64 / steps_per_epoch as f64,
                peak,
                &recipe.schedule,
                epochs as f64,
            );
            let mut step_sums = vec![0.0f64; names.len()];
            let mut fault: Option<String> = None;
            for _ in 0..accum {
                let b = loader
                    .next()
                    .expect("loader yields steps_per_epoch * accum batches")?;
                let vals: Vec<f32> = match &replicas {
                    None => {
                        let images = images_tensor(b.images, b.n, &model.geometry, device);
                        train_micro_batch(
                            &model,
                            norm.as_mut(),
                            &mut opt,
                            images,
                            &b.labels,
                            &mut state.rng,
                            accum,
                        )?
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .map_err(|e| format!("{e:?}"))?
                    }
                    Some(r) => {
                        // The masks of the whole batch, drawn as one device would.
                        let plan = model.masker.sample(&model.geometry, b.n, &mut state.rng);
                        r.micro_batch(
                            &model,
                            norm.as_mut(),
                            &mut opt,
                            b.images,
                            b.n,
                            &b.labels,
                            &plan,
                            accum as f64,
                            device,
                        )?
                    }
                };
                if fault.is_none() {
                    fault = nonfinite_terms(&names, &vals);
                }
                for (a, v) in step_sums.iter_mut().zip(&vals) {
                    *a += *v as f64;
                }
                seen += b.n;
                window_images += b.n;
            }
            // NaN or Inf in a loss term or the gradients: skip the step (no update) while the
            // recipe allows, else stop with the last checkpoint intact.
            if fault.is_none() && replicas.is_none() {
                let norm = opt.grad_norm();
                if !norm.is_finite() {
                    fault = Some(format!(
                        "the gradient norm became {norm} (every loss term finite)"
                    ));
                }
            }
            if let Some(what) = fault {
                let at = format!("epoch {} step {}", epoch + 1, state.step + 1);
                if skipped < recipe.train.skip_nonfinite && replicas.is_none() {
                    skipped += 1;
                    opt.discard();
                    tracing::warn!(
                        "{what} at {at}: step skipped, no update ({skipped} of train.skip_nonfinite={} used)",
                        recipe.train.skip_nonfinite
                    );
                    state.step += 1;
                    if let Some(bar) = &bar {
                        bar.inc(1);
                    }
                    continue;
                }
                let last = checkpoint::list(run_dir)
                    .last()
                    .map(|d| {
                        format!(
                            "its last checkpoint {} is intact",
                            d.file_name().unwrap_or_default().to_string_lossy()
                        )
                    })
                    .unwrap_or_else(|| "no checkpoint was written yet".into());
                let after = if skipped > 0 {
                    format!(" after {skipped} skipped step(s)")
                } else {
                    String::new()
                };
                return Err(format!(
                    "{what} at {at}{after}: the run stops here and {last}; lower the learning rate (optimizer.blr), set optimizer.clip_grad, or let train.skip_nonfinite skip such steps"
                ));
            }
            match &replicas {
                None => apply_step(&mut model, &mut opt, lr, recipe.eval.probe_lr),
                Some(r) => r.apply(&mut model, &mut opt, lr, recipe.eval.probe_lr)?,
            }
            state.step += 1;
            for (a, v) in sums.iter_mut().zip(&step_sums) {
                *a += v;
            }
            let per = |i: usize| step_sums[i] / accum as f64;
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {:.4} lr {lr:.2e}", per(0)));
                bar.inc(1);
            }
            if state.step.is_multiple_of(recipe.train.log_every as u64) || s + 1 == steps_per_epoch
            {
                let secs = window_start.elapsed().as_secs_f64();
                let ips = window_images as f64 / secs.max(1e-9);
                let mut row = serde_json::Map::new();
                row.insert("kind".into(), json!("step"));
                row.insert("epoch".into(), json!(epoch + 1));
                row.insert("step".into(), json!(state.step));
                row.insert("lr".into(), json!(lr));
                for (i, n) in names.iter().enumerate().take(names.len() - 1) {
                    row.insert(n.clone(), json!(per(i)));
                }
                row.insert(
                    "probe.train_acc".into(),
                    json!(step_sums[names.len() - 1] / (batch * accum) as f64),
                );
                row.insert("images_per_s".into(), json!(ips));
                metrics.write(serde_json::Value::Object(row))?;
                if bar.is_none() {
                    tracing::info!("epoch {}/{epochs} step {}/{steps_per_epoch} loss {:.4} {} {:.4} lr {lr:.3e} {ips:.0} img/s", epoch + 1, s + 1, per(0), names[1], per(1));
                }
                window_start = Instant::now();
                window_images = 0;
            }
            let stopping = stop.load(Ordering::SeqCst);
            let every = recipe.train.checkpoint_steps as u64;
            if s + 1 < steps_per_epoch
                && (stopping || (every > 0 && state.step.is_multiple_of(every)))
            {
                let mid = State {
                    epoch_step: s + 1,
                    epoch_sums: sums.clone(),
                    epoch_seen: seen,
                    ..state.clone()
                };
                save_checkpoint(run_dir, recipe, &model, &norm, &opt, &mid)?;
                if stopping {
                    progress::finish(bar);
                    summary.steps = state.step;
                    summary.interrupted = Some(mid.checkpoint_name());
                    return Ok(summary);
                }
            }
        }
        progress::finish(bar);
        state.epoch = epoch + 1;
        let steps = steps_per_epoch as f64;
        let mut row = serde_json::Map::new();
        row.insert("kind".into(), json!("epoch"));
        row.insert("epoch".into(), json!(epoch + 1));
        row.insert("step".into(), json!(state.step));
        for (i, n) in names.iter().enumerate().take(names.len() - 1) {
            row.insert(n.clone(), json!(sums[i] / steps / accum as f64));
        }
        summary.last_target_loss = sums[1] / steps / accum as f64;
        if norm.is_some() {
            row.insert(
                "probe.train_acc".into(),
                json!(sums[names.len() - 1] / seen as f64),
            );
        }
        if let (Some(n), Some(p)) = (norm.as_mut(), &eval_pipe) {
            let acc = evaluate_probe(&model, n, p, batch, device)?;
            row.insert("probe.test_acc".into(), json!(acc));
            summary.probe_accuracy = Some(acc);
        }
        let erank_now =
            (epoch + 1).is_multiple_of(recipe.eval.erank_every.max(1)) || epoch + 1 == epochs;
        if let (true, true, Some(p)) = (recipe.eval.erank_samples > 0, erank_now, &eval_pipe) {
            let n = recipe.eval.erank_samples.min(p.dataset.len());
            let f = encode(
                &model,
                p,
                (0..n).collect(),
                Pool::Model,
                batch,
                device,
                "erank",
            )?;
            let e = analysis::effective_rank(&f.data, f.n, f.dim);
            row.insert("erank".into(), json!(e));
            summary.erank = Some(e);
        }
        let skipped_images = train_pipe.take_skipped();
        if skipped_images > 0 {
            tracing::warn!(
                "epoch {}: {skipped_images} unreadable training image(s) skipped (their files are named above)",
                epoch + 1
            );
            row.insert("data.skipped".into(), json!(skipped_images));
        }
        let secs = t0.elapsed().as_secs_f64();
        row.insert("seconds".into(), json!(secs));
        row.insert("images_per_s".into(), json!(seen as f64 / secs));
        tracing::info!(
            "epoch {}/{epochs} done in {secs:.1}s: {}",
            epoch + 1,
            serde_json::Value::Object(row.clone())
        );
        metrics.write(serde_json::Value::Object(row))?;
        let ev = &recipe.eval;
        let last = state.epoch == epochs;
        let offline = (ev.linear.is_some() || ev.knn.is_some() || (last && ev.finetune.is_some()))
            && (last || (ev.offline_every > 0 && state.epoch.is_multiple_of(ev.offline_every)));
        let stopping = stop.load(Ordering::SeqCst) && state.epoch < epochs;
        if state.epoch.is_multiple_of(recipe.train.checkpoint_every)
            || state.epoch == epochs
            || offline
            || stopping
        {
            save_checkpoint(run_dir, recipe, &model, &norm, &opt, &state)?;
        }
        if offline {
            let name = format!("epoch-{:04}", state.epoch);
            let mut row = if ev.linear.is_some() || ev.knn.is_some() {
                offline_eval(run_dir, &name, device)?
            } else {
                serde_json::Map::new()
            };
            if last {
                if let Some(ft) = finetune_eval(run_dir, &name, device)? {
                    summary.finetune = ft.get("finetune.top1").and_then(|v| v.as_f64());
                    row.extend(ft);
                }
            }
            summary.linear = row.get("linear.top1").and_then(|v| v.as_f64());
            summary.knn = row.get("knn.top1").and_then(|v| v.as_f64());
            row.insert("kind".into(), json!("eval"));
            row.insert("epoch".into(), json!(state.epoch));
            row.insert("step".into(), json!(state.step));
            tracing::info!(
                "evaluation after epoch {}: {}",
                state.epoch,
                serde_json::Value::Object(row.clone())
            );
            metrics.write(serde_json::Value::Object(row))?;
        }
        if stopping {
            summary.steps = state.step;
            summary.interrupted = Some(state.checkpoint_name());
            return Ok(summary);
        }
    }
    summary.steps = state.step;
    Ok(summary)
}

/// What `--force` removes from a run directory: everything a run writes, nothing else.
const RUN_ENTRIES: &[&str] = &[
    "checkpoints",
    "metrics.jsonl",
    "recipe.ron",
    "eval.jsonl",
    "features",
    "analysis",
    "tokenizer.safetensors",
];

fn clear_run(run_dir: &Path) -> Result<(), String> {
    for name in RUN_ENTRIES {
        let p = run_dir.join(name);
        let removed = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else if p.exists() {
            fs::remove_file(&p)
        } else {
            Ok(())
        };
        removed.map_err(|e| format!("--force: cannot remove {}: {e}", p.display()))?;
    }
    tracing::info!("--force: replaced the run in {}", run_dir.display());
    Ok(())
}

/// Bytes a checkpoint of `model` takes: weights and AdamW's two moments, in f32.
fn checkpoint_bytes(model: &Model) -> u64 {
    let mut params = 0u64;
    for (_, m) in model.trainables() {
        m.visit_params(&mut |info, _| params += info.shape.iter().product::<usize>() as u64);
    }
    params * 4 * 3
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::statvfs(path.as_ptr(), &mut st) } == 0;
    ok.then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Refuse to start when the disk cannot hold the next checkpoint (written beside the last).
fn check_disk_space(run_dir: &Path, model: &Model) -> Result<(), String> {
    let need = checkpoint_bytes(model) + (16 << 20);
    match free_bytes(run_dir) {
        Some(free) if free < need => Err(format!(
            "{} has {} MiB free on its disk, a checkpoint of this model needs about {} MiB: free some space or choose another --output",
            run_dir.display(),
            free >> 20,
            need >> 20
        )),
        _ => Ok(()),
    }
}

/// Which loss terms of a step's scalars are NaN or infinite, e.g. `target.pixels became NaN`
/// (the total `loss` only when no single term is named).
fn nonfinite_terms(names: &[String], vals: &[f32]) -> Option<String> {
    // The last scalar counts probe hits; it is not a loss.
    let n = names.len().min(vals.len()).saturating_sub(1);
    let bad: Vec<String> = (1..n)
        .filter(|&i| !vals[i].is_finite())
        .map(|i| format!("{} became {}", names[i], vals[i]))
        .collect();
    match (bad.is_empty(), vals.first()) {
        (false, _) => Some(format!("the loss term {}", bad.join(", "))),
        (true, Some(v)) if !v.is_finite() => Some(format!("the loss became {v}")),
        _ => None,
    }
}

/// The flag SIGINT and SIGTERM set, cleared for a new run. The handlers are installed once per
/// process; with the flag already set, a second signal ends the process at once (exit 130).
fn interrupt_flag() -> Result<Arc<AtomicBool>, String> {
    static FLAG: std::sync::OnceLock<Result<Arc<AtomicBool>, String>> = std::sync::OnceLock::new();
    let flag = FLAG
        .get_or_init(|| {
            let flag = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
                    .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
                    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
            }
            Ok(flag)
        })
        .clone()?;
    flag.store(false, Ordering::SeqCst);
    Ok(flag)
}
