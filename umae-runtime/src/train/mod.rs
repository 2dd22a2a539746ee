//! The trainer: a run in named phases (prepare the run directory, build, resume, epochs,
//! end), each epoch steps of accumulated gradients through one [`Executor`], then metrics,
//! evaluations and checkpoints.

mod evaluate;
mod faults;
mod metrics;
mod resume;
mod rundir;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use umae_api::recipe::Recipe;
use umae_api::Device;

pub use evaluate::{finetune_eval, offline_eval};
pub(crate) use faults::interrupt_flag;
pub use metrics::{append_jsonl, read_jsonl};
pub use resume::{initial_state, save_checkpoint};
pub use rundir::start_run_from;

use crate::checkpoint::State;
use crate::data::{self, Dataset, Loader, Pipeline, Split};
use crate::exec::{self, nodes::Nodes, Executor, Placement};
use crate::model::Model;
use crate::optim::{learning_rate, AdamW};
use crate::progress;
use crate::step::{prepare_target, training_parts, ProbeNorm, StepScalars, Terms};
use metrics::Metrics;

/// How to run.
pub struct RunOptions {
    pub run_dir: PathBuf,
    pub device: Device,
    /// Further devices for data parallelism (`--device cuda:0,cuda:1` gives `cuda:1` here):
    /// each trains a replica on its share of every batch. Empty: one device.
    pub parallel: Vec<Device>,
    /// Train together with other processes (usually machines), each with the same devices.
    pub nodes: Option<Nodes>,
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

/// Train a recipe into a run directory.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> crate::Result<Summary> {
    exec::nodes::check_available(opts.nodes.as_ref())?;
    let train_set = rundir::prepare(recipe, opts)?;
    let mut trainer = Trainer::build(recipe, opts, train_set)?;
    let mut state = resume::restore(
        &opts.run_dir,
        opts.resume,
        recipe,
        (&mut trainer.model, &mut trainer.norm, &mut trainer.opt),
        &trainer.metrics,
        &opts.device,
    )?;
    let mut exec = trainer.executor()?;
    trainer.announce();
    if state.epoch == trainer.plan.epochs {
        // Resumed after the last epoch's checkpoint: the run may have been stopped during its
        // final evaluation, which is then done now.
        trainer.missing_final_evaluation(&state)?;
    }
    for epoch in state.epoch..trainer.plan.epochs {
        if let Some(checkpoint) = trainer.epoch(exec.as_mut(), epoch, &mut state)? {
            trainer.summary.interrupted = Some(checkpoint);
            break;
        }
    }
    trainer.summary.steps = state.step;
    Ok(trainer.summary)
}

/// The shape of a run: effective batch, steps per epoch, schedule.
struct Plan {
    /// Devices training together.
    world: usize,
    /// Images per micro-batch, all devices together.
    batch: usize,
    accum: usize,
    steps_per_epoch: usize,
    epochs: usize,
    peak_lr: f64,
}

impl Plan {
    fn new(recipe: &Recipe, world: usize, images: usize) -> crate::Result<Plan> {
        let batch = recipe.train.batch_size * world;
        let accum = recipe.train.accum_steps;
        let steps_per_epoch = images / batch / accum;
        if steps_per_epoch == 0 {
            return Err(crate::Error::recipe(format!(
                "the training set has {images} images, fewer than one effective batch of {} (batch_size {} x accum_steps {accum} x {world} device(s)): lower train.batch_size or accum_steps",
                batch * accum, recipe.train.batch_size
            )));
        }
        Ok(Plan {
            world,
            batch,
            accum,
            steps_per_epoch,
            epochs: recipe.train.epochs,
            peak_lr: recipe.peak_lr_on(world),
        })
    }

    /// The learning rate at step `s` of epoch `epoch` (0-based).
    fn lr(&self, recipe: &Recipe, epoch: usize, s: usize) -> f64 {
        let t = epoch as f64 + s as f64 / self.steps_per_epoch as f64;
        learning_rate(t, self.peak_lr, &recipe.schedule, self.epochs as f64)
    }
}

/// Everything a run trains with, built once.
struct Trainer<'a> {
    recipe: &'a Recipe,
    opts: &'a RunOptions,
    model: Model,
    opt: AdamW,
    norm: Option<ProbeNorm>,
    train_set: Arc<dyn Dataset>,
    train_pipe: Pipeline,
    eval_pipe: Option<Pipeline>,
    terms: Terms,
    metrics: Metrics,
    plan: Plan,
    /// Set by Ctrl-C or SIGTERM: finish the step, write a checkpoint, stop.
    stop: Arc<AtomicBool>,
    /// Non-finite steps skipped so far (`train.skip_nonfinite`).
    skipped: usize,
    summary: Summary,
}

/// Sums over an epoch's steps, carried by a mid-epoch checkpoint.
struct EpochTotals {
    sums: StepScalars,
    seen: usize,
}

impl<'a> Trainer<'a> {
    /// The model, its optimizer and probe statistics, the fitted target, the pipelines and
    /// the plan, checked before the first step.
    fn build(
        recipe: &'a Recipe,
        opts: &'a RunOptions,
        train_set: Arc<dyn Dataset>,
    ) -> crate::Result<Self> {
        let device = &opts.device;
        let needs_eval = recipe.eval.online_probe || recipe.eval.erank_samples > 0;
        let eval_pipe = match needs_eval {
            true => Some(data::open(&recipe.data, Split::Eval, recipe.seed)?),
            false => None,
        }
        .map(|d| Pipeline::new(d, &recipe.data, false, recipe.seed));
        let train_pipe = Pipeline::new(train_set.clone(), &recipe.data, true, recipe.seed);
        let (mut model, opt, norm) = training_parts(recipe, device)?;
        rundir::check_disk_space(&opts.run_dir, &model)?;
        let cache = Some(opts.run_dir.as_path());
        prepare_target(&mut model, recipe, Some(train_set.clone()), cache, device)?;
        let placement = placement(opts);
        let plan = Plan::new(recipe, placement.world(), train_set.len())?;
        Ok(Trainer {
            recipe,
            opts,
            terms: Terms::of(&model),
            model,
            opt,
            norm,
            train_set,
            train_pipe,
            eval_pipe,
            metrics: Metrics::in_run(&opts.run_dir),
            plan,
            stop: faults::interrupt_flag()?,
            skipped: 0,
            summary: Summary {
                epochs: recipe.train.epochs,
                ..Default::default()
            },
        })
    }

    fn executor(&self) -> crate::Result<Box<dyn Executor>> {
        exec::start(
            self.recipe,
            &placement(self.opts),
            (&self.model, &self.norm, &self.opt),
            self.train_set.clone(),
            Some(self.opts.run_dir.clone()),
        )
    }

    fn announce(&self) {
        let p = &self.plan;
        let local = 1 + self.opts.parallel.len();
        let across = self
            .opts
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
            "training {} for {} epochs on {} device(s){across}, {} steps/epoch, effective batch {}, peak lr {:.3e}",
            self.recipe.name, p.epochs, p.world, p.steps_per_epoch, p.batch * p.accum, p.peak_lr
        );
    }

    /// One epoch (or its rest, after a mid-epoch checkpoint). Returns the checkpoint written
    /// when the run was interrupted.
    fn epoch(
        &mut self,
        exec: &mut dyn Executor,
        epoch: usize,
        state: &mut State,
    ) -> crate::Result<Option<String>> {
        let (recipe, p) = (self.recipe, &self.plan);
        let t0 = Instant::now();
        // A checkpoint written mid-epoch continues that epoch where it stopped: the same order
        // and augmentations (drawn per epoch and image), minus the batches already trained.
        let first = std::mem::take(&mut state.epoch_step).min(p.steps_per_epoch);
        let per_step = p.accum * p.batch;
        let order = self.train_set.epoch_order(recipe.seed, epoch as u64);
        let order = order[first * per_step..p.steps_per_epoch * per_step].to_vec();
        let mut loader = Loader::start(
            &self.train_pipe,
            order,
            p.batch,
            true,
            epoch as u64,
            recipe.data.workers,
        );
        let bar = progress::bar(
            p.steps_per_epoch as u64,
            &format!("epoch {}/{}", epoch + 1, p.epochs),
        );
        if let Some(bar) = &bar {
            bar.set_position(first as u64);
        }
        let mut totals = EpochTotals {
            sums: StepScalars::from_slice(
                &std::mem::take(&mut state.epoch_sums),
                self.terms.regularizers.len(),
            ),
            seen: std::mem::take(&mut state.epoch_seen),
        };
        let mut window = (Instant::now(), 0usize);
        for s in first..self.plan.steps_per_epoch {
            let lr = self.plan.lr(recipe, epoch, s);
            let step = self.step(exec, &mut loader, lr, epoch, state, &mut totals)?;
            state.step += 1;
            window.1 += self.plan.batch * self.plan.accum;
            let Some(sums) = step else {
                progress::tick(&bar, 1);
                continue;
            };
            totals.sums.add(&sums);
            let means = sums.mean_over(self.plan.accum as f64);
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {:.4} lr {lr:.2e}", means.loss));
            }
            progress::tick(&bar, 1);
            let log_now = state.step.is_multiple_of(recipe.train.log_every as u64);
            if log_now || s + 1 == self.plan.steps_per_epoch {
                self.log_step(&means, lr, epoch, s, state.step, bar.is_none(), window)?;
                window = (Instant::now(), 0);
            }
            if let Some(name) = self.checkpoint_within(s, state, &totals)? {
                progress::finish(bar);
                return Ok(Some(name));
            }
        }
        progress::finish(bar);
        state.epoch = epoch + 1;
        self.end_epoch(state, totals, t0)
    }

    /// One optimizer step of `accum` micro-batches. Returns its terms summed over the
    /// micro-batches, or `None` for a non-finite step skipped under `train.skip_nonfinite`.
    fn step(
        &mut self,
        exec: &mut dyn Executor,
        loader: &mut Loader,
        lr: f64,
        epoch: usize,
        state: &mut State,
        totals: &mut EpochTotals,
    ) -> crate::Result<Option<StepScalars>> {
        let accum = self.plan.accum;
        let mut sums = StepScalars::default();
        let mut fault = None;
        for _ in 0..accum {
            let b = loader
                .next()
                .expect("loader yields steps_per_epoch * accum batches")?;
            totals.seen += b.n;
            let s = exec.micro_batch(
                &self.model,
                self.norm.as_mut(),
                &mut self.opt,
                b,
                &mut state.rng,
                accum,
            )?;
            fault = fault.or_else(|| self.terms.nonfinite(&s));
            sums.add(&s);
        }
        // NaN or Inf in a loss term or the gradients (checked on every device's step): skip the
        // step (no update) while the recipe allows, else stop with the last checkpoint intact.
        if fault.is_none() {
            let norm = exec.reduce(&mut self.opt)?;
            if !norm.is_finite() {
                fault = Some(format!(
                    "the gradient norm became {norm} (every loss term finite)"
                ));
            }
        }
        let Some(what) = fault else {
            exec.apply(
                &mut self.model,
                &mut self.opt,
                lr,
                self.recipe.eval.probe_lr,
            )?;
            return Ok(Some(sums));
        };
        let at = format!("epoch {} step {}", epoch + 1, state.step + 1);
        let allowed = self.recipe.train.skip_nonfinite;
        if self.skipped >= allowed {
            return Err(faults::nonfinite_error(
                &what,
                &at,
                self.skipped,
                &self.opts.run_dir,
            ));
        }
        self.skipped += 1;
        exec.discard(&mut self.opt)?;
        tracing::warn!(
            "{what} at {at}: step skipped, no update ({} of train.skip_nonfinite={allowed} used)",
            self.skipped
        );
        Ok(None)
    }

    /// A `step` row of metrics.jsonl (and a log line without a progress bar).
    #[allow(clippy::too_many_arguments)]
    fn log_step(
        &self,
        means: &StepScalars,
        lr: f64,
        epoch: usize,
        s: usize,
        step: u64,
        log: bool,
        (since, images): (Instant, usize),
    ) -> crate::Result<()> {
        let ips = images as f64 / since.elapsed().as_secs_f64().max(1e-9);
        let mut row = metrics::row("step", epoch + 1, step);
        row.insert("lr".into(), json!(lr));
        metrics::insert_losses(&mut row, &self.terms, means);
        let hits_per_image = means.probe_correct / (self.plan.batch * self.plan.accum) as f64;
        row.insert("probe.train_acc".into(), json!(hits_per_image));
        row.insert("images_per_s".into(), json!(ips));
        self.metrics.write(row)?;
        if log {
            tracing::info!(
                "epoch {}/{} step {}/{} loss {:.4} {} {:.4} lr {lr:.3e} {ips:.0} img/s",
                epoch + 1,
                self.plan.epochs,
                s + 1,
                self.plan.steps_per_epoch,
                means.loss,
                self.terms.target,
                means.target
            );
        }
        Ok(())
    }

    /// A checkpoint within the epoch after step `s`, every `train.checkpoint_steps` or when
    /// interrupted; returns its name when the run must stop.
    fn checkpoint_within(
        &self,
        s: usize,
        state: &State,
        totals: &EpochTotals,
    ) -> crate::Result<Option<String>> {
        let stopping = self.stop.load(Ordering::SeqCst);
        let every = self.recipe.train.checkpoint_steps as u64;
        let due = stopping || (every > 0 && state.step.is_multiple_of(every));
        if s + 1 >= self.plan.steps_per_epoch || !due {
            return Ok(None);
        }
        let mid = State {
            epoch_step: s + 1,
            epoch_sums: totals.sums.to_vec(),
            epoch_seen: totals.seen,
            ..state.clone()
        };
        self.save(&mid)?;
        Ok(stopping.then(|| mid.checkpoint_name()))
    }

    fn save(&self, state: &State) -> crate::Result<()> {
        Ok(save_checkpoint(
            &self.opts.run_dir,
            self.recipe,
            &self.model,
            &self.norm,
            &self.opt,
            state,
        )?)
    }

    /// After an epoch's last step: its metrics row (probe accuracy, effective rank), the
    /// checkpoint, the offline evaluations when due. Returns the checkpoint when interrupted.
    fn end_epoch(
        &mut self,
        state: &State,
        totals: EpochTotals,
        t0: Instant,
    ) -> crate::Result<Option<String>> {
        let (recipe, epochs, done) = (self.recipe, self.plan.epochs, state.epoch);
        let mut row = metrics::row("epoch", done, state.step);
        let steps = self.plan.steps_per_epoch as f64;
        let means = totals
            .sums
            .mean_over(steps)
            .mean_over(self.plan.accum as f64);
        metrics::insert_losses(&mut row, &self.terms, &means);
        self.summary.last_target_loss = means.target;
        self.evaluate_epoch(&mut row, totals.sums.probe_correct / totals.seen as f64)?;
        let skipped_images = self.train_pipe.take_skipped();
        if skipped_images > 0 {
            tracing::warn!("epoch {done}: {skipped_images} unreadable training image(s) skipped (their files are named above)");
            row.insert("data.skipped".into(), json!(skipped_images));
        }
        let secs = t0.elapsed().as_secs_f64();
        row.insert("seconds".into(), json!(secs));
        row.insert("images_per_s".into(), json!(totals.seen as f64 / secs));
        tracing::info!(
            "epoch {done}/{epochs} done in {secs:.1}s: {}",
            serde_json::Value::Object(row.clone())
        );
        self.metrics.write(row)?;
        let ev = &recipe.eval;
        let last = done == epochs;
        let offline = (ev.linear.is_some() || ev.knn.is_some() || (last && ev.finetune.is_some()))
            && (last || (ev.offline_every > 0 && done.is_multiple_of(ev.offline_every)));
        let stopping = self.stop.load(Ordering::SeqCst) && !last;
        if done.is_multiple_of(recipe.train.checkpoint_every) || last || offline || stopping {
            self.save(state)?;
        }
        if offline {
            self.offline_evaluations(state, last)?;
        }
        Ok(stopping.then(|| state.checkpoint_name()))
    }

    /// The online probe's train and test accuracy and the effective rank, into an epoch row.
    fn evaluate_epoch(
        &mut self,
        row: &mut serde_json::Map<String, serde_json::Value>,
        probe_train_acc: f64,
    ) -> crate::Result<()> {
        let (recipe, device, batch) = (self.recipe, &self.opts.device, self.plan.batch);
        if self.norm.is_some() {
            row.insert("probe.train_acc".into(), json!(probe_train_acc));
        }
        let done = row["epoch"].as_u64().unwrap_or(0) as usize;
        let due = done.is_multiple_of(recipe.eval.erank_every.max(1)) || done == self.plan.epochs;
        let (norm, eval_pipe) = (&mut self.norm, &self.eval_pipe);
        let (acc, erank) = evaluate::untracked(&mut self.model, |model| -> crate::Result<_> {
            let acc = match (norm.as_mut(), eval_pipe) {
                (Some(n), Some(p)) => Some(evaluate::probe_accuracy(model, n, p, batch, device)?),
                _ => None,
            };
            let erank = match (recipe.eval.erank_samples > 0, due, eval_pipe) {
                (true, true, Some(p)) => Some(evaluate::erank(
                    model,
                    p,
                    recipe.eval.erank_samples,
                    batch,
                    device,
                )?),
                _ => None,
            };
            Ok((acc, erank))
        })?;
        if let Some(acc) = acc {
            row.insert("probe.test_acc".into(), json!(acc));
            self.summary.probe_accuracy = Some(acc);
        }
        if let Some(e) = erank {
            row.insert("erank".into(), json!(e));
            self.summary.erank = Some(e);
        }
        if let Some(rss) = crate::bench::rss_mib() {
            row.insert("rss_mib".into(), json!(rss.round()));
        }
        Ok(())
    }

    /// Run the final offline evaluation if the recipe asks for one and `metrics.jsonl` has no
    /// evaluation row of the last epoch.
    fn missing_final_evaluation(&mut self, state: &State) -> crate::Result<()> {
        let ev = &self.recipe.eval;
        if ev.linear.is_none() && ev.knn.is_none() && ev.finetune.is_none() {
            return Ok(());
        }
        let rows = read_jsonl(&self.metrics.path).unwrap_or_default();
        let done = rows
            .iter()
            .any(|r| r["kind"] == "eval" && r["epoch"].as_u64() == Some(state.epoch as u64));
        if !done {
            tracing::info!("the final evaluation is missing: running it now");
            self.offline_evaluations(state, true)?;
        }
        Ok(())
    }

    /// The recipe's linear probe, kNN and (after the last epoch) fine-tuning on the
    /// checkpoint just written, as an `eval` row.
    fn offline_evaluations(&mut self, state: &State, last: bool) -> crate::Result<()> {
        let (ev, run_dir, device) = (&self.recipe.eval, &self.opts.run_dir, &self.opts.device);
        let name = format!("epoch-{:04}", state.epoch);
        let mut row = if ev.linear.is_some() || ev.knn.is_some() {
            offline_eval(run_dir, &name, device)?
        } else {
            serde_json::Map::new()
        };
        if last {
            if let Some(ft) = finetune_eval(run_dir, &name, device)? {
                self.summary.finetune = ft.get("finetune.top1").and_then(|v| v.as_f64());
                row.extend(ft);
            }
        }
        self.summary.linear = row.get("linear.top1").and_then(|v| v.as_f64());
        self.summary.knn = row.get("knn.top1").and_then(|v| v.as_f64());
        row.extend(metrics::row("eval", state.epoch, state.step));
        tracing::info!(
            "evaluation after epoch {}: {}",
            state.epoch,
            serde_json::Value::Object(row.clone())
        );
        Ok(self.metrics.write(row)?)
    }
}

fn placement(opts: &RunOptions) -> Placement<'_> {
    Placement {
        device: &opts.device,
        parallel: &opts.parallel,
        nodes: opts.nodes.as_ref(),
    }
}
