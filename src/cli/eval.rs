//! `umae eval linear | knn | finetune`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use umae_runtime::checkpoint::source::{self, Loaded};
use umae_runtime::eval::features::{self, Pool};
use umae_runtime::eval::finetune::{self, FinetuneSpec};
use umae_runtime::eval::linear::{self, KnnSpec, LinearSpec, ProbeOptimizer};

use super::Error;

/// Where the encoder comes from.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A run directory (latest checkpoint), a checkpoint directory, or a recipe (initial weights;
    /// e.g. recipes/pixels-fmnist.ron for the raw-pixel baseline).
    pub source: PathBuf,
    /// Checkpoint of the run directory to use, e.g. epoch-0005 (default: the latest).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Override a field of the run's recipe, e.g. `--set data.train_limit=None` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// cpu, cuda, cuda:N or tch (default: the recipe's `device`, else cpu).
    #[arg(long)]
    pub device: Option<String>,
}

/// Where the encoder comes from and how its features are taken.
#[derive(Args, Clone)]
pub struct SourceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Feature: cls, mean or model (the encoder's own `pool` parameter).
    #[arg(long, default_value = "model")]
    pub pool: String,
    /// Images per encoding batch.
    #[arg(long, default_value_t = 256)]
    pub encode_batch: usize,
    /// Re-encode even when cached features exist (and do not write the cache).
    #[arg(long)]
    pub no_cache: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Linear probe on frozen features (MAE protocol: BatchNorm without affine + linear, no
    /// weight decay, LARS or SGD with momentum, warmup + cosine); top-1/top-5 on the test split.
    Linear {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = LinearSpec::default().epochs)]
        epochs: usize,
        #[arg(long, default_value_t = LinearSpec::default().batch_size)]
        batch: usize,
        /// Base learning rate (lr = blr * batch / 256).
        #[arg(long, default_value_t = LinearSpec::default().blr)]
        blr: f64,
        #[arg(long, default_value_t = LinearSpec::default().warmup_epochs)]
        warmup: usize,
        /// lars, sgd, or lbfgs (full-batch logistic regression on standardised features, to
        /// convergence; --epochs, --batch, --blr and --warmup do not apply).
        #[arg(long, default_value = "lars")]
        optimizer: String,
        /// lbfgs: the L2 penalty on the mean loss (default 1 / training images, scikit-learn's
        /// C = 1).
        #[arg(long)]
        l2: Option<f64>,
    },
    /// Full fine-tuning with a linear head (MAE's protocol: layer-wise lr decay, label smoothing,
    /// drop path, AdamW, warmup + cosine); test top-1/top-5 after every epoch. The run's
    /// checkpoints are not changed.
    Finetune {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = FinetuneSpec::default().epochs)]
        epochs: usize,
        #[arg(long, default_value_t = FinetuneSpec::default().batch_size)]
        batch: usize,
        /// Base learning rate (lr = blr * batch / 256).
        #[arg(long, default_value_t = FinetuneSpec::default().blr)]
        blr: f64,
        #[arg(long, default_value_t = FinetuneSpec::default().warmup_epochs)]
        warmup: usize,
        #[arg(long, default_value_t = FinetuneSpec::default().layer_decay)]
        layer_decay: f64,
        #[arg(long, default_value_t = FinetuneSpec::default().weight_decay)]
        weight_decay: f64,
        #[arg(long, default_value_t = FinetuneSpec::default().label_smoothing)]
        smoothing: f64,
        #[arg(long, default_value_t = FinetuneSpec::default().drop_path)]
        drop_path: f64,
    },
    /// Weighted k-nearest-neighbour classification on L2-normalised frozen features.
    Knn {
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = 20)]
        k: usize,
        #[arg(long, default_value_t = 0.07)]
        temperature: f64,
    },
}

/// The model fields of [`SourceArgs`] read as its own (`args.source`, `args.device`).
impl std::ops::Deref for SourceArgs {
    type Target = ModelArgs;
    fn deref(&self) -> &ModelArgs {
        &self.model
    }
}

pub fn load(a: &ModelArgs) -> Result<(Loaded, umae_api::Device), Error> {
    let (recipe, run_dir, ckpt) = source::resolve(&a.source, a.checkpoint.as_deref(), &a.sets)?;
    let device = super::device_for(a.device.as_deref(), &recipe)?;
    let loaded = source::load_resolved(recipe, run_dir, ckpt, &device)?;
    Ok((loaded, device))
}

fn feature_set(a: &SourceArgs) -> Result<(Loaded, umae_api::Device, features::FeatureSet), Error> {
    let pool = Pool::parse(&a.pool).map_err(Error::command_line)?;
    if a.encode_batch == 0 {
        return Err(Error::command_line("--encode-batch must be at least 1"));
    }
    let (loaded, device) = load(a)?;
    let d = &loaded.recipe.data;
    let fs = features::feature_set(
        &loaded,
        pool,
        d.train_limit,
        d.eval_limit,
        a.encode_batch,
        &device,
        !a.no_cache,
    )?;
    Ok((loaded, device, fs))
}

/// Append a result row to `<run>/eval.jsonl` when the source is a run.
fn record(loaded: &Loaded, row: &serde_json::Value) -> Result<(), Error> {
    if let Some(dir) = &loaded.run_dir {
        umae_runtime::train::append_jsonl(&dir.join("eval.jsonl"), row).map_err(Error::Failed)?;
    }
    Ok(())
}

pub fn run(cmd: EvalCommand) -> Result<(), Error> {
    match cmd {
        EvalCommand::Linear {
            source,
            epochs,
            batch,
            blr,
            warmup,
            optimizer,
            l2,
        } => {
            let optimizer = match optimizer.as_str() {
                "lars" => ProbeOptimizer::Lars,
                "sgd" => ProbeOptimizer::Sgd,
                "lbfgs" => ProbeOptimizer::Lbfgs,
                o => {
                    return Err(Error::command_line(format!(
                        "unknown optimizer `{o}`: use lars, sgd or lbfgs"
                    )))
                }
            };
            if l2.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                return Err(Error::command_line("--l2 must be a finite number >= 0"));
            }
            if epochs == 0 || batch == 0 || blr.is_nan() || blr <= 0.0 || warmup > epochs {
                return Err(Error::command_line(format!(
                    "need epochs >= 1, batch >= 1, blr > 0 and warmup <= epochs (got {epochs}, {batch}, {blr}, {warmup})"
                )));
            }
            let spec = LinearSpec {
                epochs,
                batch_size: batch,
                blr,
                warmup_epochs: warmup,
                optimizer,
                l2,
                ..LinearSpec::default()
            };
            let (loaded, device, fs) = feature_set(&source)?;
            let r = linear::linear_probe(&fs.train, &fs.test, fs.classes, &spec, &device)
                .map_err(Error::Failed)?;
            let row = json!({
                "kind": "linear", "model": loaded.label, "step": loaded.step,
                "pool": source.pool, "train_images": fs.train.n, "test_images": fs.test.n,
                "dim": fs.train.dim, "spec": spec, "top1": r.test.top1, "top5": r.test.top5,
                "train_top1": r.train_top1, "lr": r.lr, "iterations": r.iterations,
            });
            record(&loaded, &row)?;
            if source.json {
                println!("{row}");
            } else {
                println!(
                    "linear probe {}: top-1 {:.2}%  top-5 {:.2}%  (train top-1 {:.2}%, {} train / {} test images, {}-d {} features{})",
                    loaded.label,
                    r.test.top1 * 100.0,
                    r.test.top5 * 100.0,
                    r.train_top1 * 100.0,
                    fs.train.n,
                    fs.test.n,
                    fs.train.dim,
                    source.pool,
                    if fs.cached { ", cached" } else { "" }
                );
            }
            Ok(())
        }
        EvalCommand::Finetune {
            source,
            epochs,
            batch,
            blr,
            warmup,
            layer_decay,
            weight_decay,
            smoothing,
            drop_path,
        } => {
            if blr.is_nan() || blr <= 0.0 || warmup > epochs || !(0.0..=1.0).contains(&layer_decay)
            {
                return Err(Error::command_line(format!(
                    "need blr > 0, warmup <= epochs and layer_decay in [0, 1] (got {blr}, {warmup}, {layer_decay})"
                )));
            }
            let spec = FinetuneSpec {
                epochs,
                batch_size: batch,
                blr,
                warmup_epochs: warmup,
                layer_decay,
                weight_decay,
                label_smoothing: smoothing,
                drop_path,
                seed: 0,
            };
            let (mut loaded, device) = load(&source)?;
            let label = loaded.label.clone();
            let rows = finetune::finetune(&mut loaded, &spec, &device, |r| {
                if !source.json {
                    println!(
                        "fine-tune {label} epoch {}/{epochs}: train loss {:.4}  test top-1 {:.2}%  top-5 {:.2}%",
                        r.epoch,
                        r.train_loss,
                        r.test.top1 * 100.0,
                        r.test.top5 * 100.0
                    );
                }
            })?;
            let last = rows.last().expect("at least one epoch");
            let row = json!({
                "kind": "finetune", "model": loaded.label, "step": loaded.step, "spec": spec,
                "epochs": rows, "top1": last.test.top1, "top5": last.test.top5,
            });
            record(&loaded, &row)?;
            if source.json {
                println!("{row}");
            }
            Ok(())
        }
        EvalCommand::Knn {
            source,
            k,
            temperature,
        } => {
            let spec = KnnSpec { k, temperature };
            let (loaded, device, fs) = feature_set(&source)?;
            let a = linear::knn(&fs.train, &fs.test, fs.classes, &spec, &device)
                .map_err(Error::command_line)?;
            let row = json!({
                "kind": "knn", "model": loaded.label, "step": loaded.step,
                "pool": source.pool, "train_images": fs.train.n, "test_images": fs.test.n,
                "k": k, "temperature": temperature, "top1": a.top1, "top5": a.top5,
            });
            record(&loaded, &row)?;
            if source.json {
                println!("{row}");
            } else {
                println!(
                    "kNN (k {k}, T {temperature}) {}: top-1 {:.2}%  top-5 {:.2}%  ({} train / {} test images{})",
                    loaded.label,
                    a.top1 * 100.0,
                    a.top5 * 100.0,
                    fs.train.n,
                    fs.test.n,
                    if fs.cached { ", cached features" } else { "" }
                );
            }
            Ok(())
        }
    }
}
