//! Command-line interface.

mod analyze;
mod eval;
mod interop;
mod scaffold;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use umae_api::recipe::Recipe;
use umae_api::registry::{self, PluginKind};
use umae_runtime::{bench, model::Model, parse_device, Error, RunOptions};

#[derive(Parser)]
#[command(
    name = "umae",
    version,
    about = "Masked-image-modeling pretraining with swappable plugins (MAE, U-MAE, ...)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Load a dynamic plugin library first (repeatable; recipes can also list them in `plugins`).
    #[arg(long = "plugin", value_name = "LIB.so", global = true)]
    plugins: Vec<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct RecipeArgs {
    /// Recipe file (RON).
    recipe: PathBuf,
    /// Override a recipe field, e.g. `--set train.epochs=10` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

/// Multi-node training: the same command on every node, each with its own --node-rank.
#[derive(clap::Args, Clone, Default)]
struct NodeArgs {
    /// Number of nodes training together (each with the same --device list).
    #[arg(long, requires_all = ["node_rank", "orchestrator", "node_address"])]
    nodes: Option<usize>,
    /// This node's index, 0..NODES.
    #[arg(long, requires = "nodes")]
    node_rank: Option<usize>,
    /// HOST:PORT of `umae orchestrator`.
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    orchestrator: Option<String>,
    /// HOST:PORT where the other nodes reach this one (it serves tensors on PORT).
    #[arg(long, value_name = "HOST:PORT", requires = "nodes")]
    node_address: Option<String>,
}

impl NodeArgs {
    fn resolve(&self) -> Result<Option<umae_runtime::exec::nodes::Nodes>, String> {
        match (
            self.nodes,
            self.node_rank,
            &self.orchestrator,
            &self.node_address,
        ) {
            (Some(count), Some(rank), Some(orch), Some(addr)) => {
                let nodes = umae_runtime::exec::nodes::Nodes::new(count, rank, orch, addr)?;
                Ok(Some(nodes))
            }
            _ => Ok(None),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write a new dynamic plugin crate (masker, encoder, decoder, target or regularizer) with
    /// one test.
    NewPlugin {
        /// Plugin name, e.g. `my-term` (lowercase letters, digits, dashes).
        name: String,
        /// masker, encoder, decoder, target or regularizer.
        #[arg(long)]
        kind: String,
        /// Folder to create (default: plugins/NAME in umae's sources, a member of its workspace).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Train a recipe (or continue a stopped run with --resume RUN_DIR).
    Run {
        /// Recipe file (RON); not used with --resume.
        #[arg(required_unless_present = "resume")]
        recipe: Option<PathBuf>,
        /// Override a recipe field, e.g. `--set train.epochs=10` (repeatable).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// Run directory (default: runs/<recipe name>).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Continue the run in this directory from its latest checkpoint.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["recipe", "output"])]
        resume: Option<PathBuf>,
        /// Replace the run already in the output directory (its checkpoints, metrics and
        /// evaluations; other files stay).
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// cpu, cuda, cuda:N or tch (default: the recipe's `device`, else cpu); a list such
        /// as `cuda:0,cuda:1` trains data-parallel, train.batch_size images per device.
        #[arg(long, visible_alias = "devices")]
        device: Option<String>,
        #[command(flatten)]
        nodes: NodeArgs,
    },
    /// Train every cell of a grid of overrides with several seeds, each as its own `umae run`
    /// in DIR/NN-PATH=VALUE-seedS/, then write DIR/summary.md and .csv (mean ± std over seeds
    /// of the final loss, effective rank and accuracies) and DIR/sweep-PATH.png (each against
    /// the swept values, error bars of one std). Run it again to continue: finished cells are
    /// skipped, interrupted ones resume from their checkpoint.
    Sweep {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// A swept field and its values, e.g. `--grid regularizers.0.weight=0,1e-3,1e-2`
        /// (repeatable: the cells are every combination). Values are RON, split at top-level
        /// commas.
        #[arg(long = "grid", value_name = "PATH=V1,V2,...")]
        grids: Vec<String>,
        /// Seeds per combination: the recipe's seed S, S+1, ...
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        /// Cells trained at the same time (the cores are shared out among them).
        #[arg(long, short, default_value_t = 1)]
        jobs: usize,
        /// Device for every cell (as `umae run --device`).
        #[arg(long)]
        device: Option<String>,
        /// Sweep directory (default: runs/<recipe name>-sweep).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Serve the rendezvous of a multi-node run: start it once, then `umae run ... --nodes N
    /// --node-rank R --orchestrator HOST:PORT` on each node. Runs until Ctrl-C.
    Orchestrator {
        /// Port to listen on (all interfaces).
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
    /// Validate a recipe and build its model: components, shapes and parameter counts.
    Check {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every plugin with its parameters and defaults.
    Plugins {
        /// Only this kind (masker, encoder, decoder, target, regularizer).
        #[arg(long)]
        kind: Option<String>,
    },
    /// Evaluate a frozen or fine-tuned encoder: linear probe, kNN, fine-tuning.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// The paper's analyses: effective rank, mask-ratio study, t-SNE, reconstructions.
    #[command(subcommand)]
    Analyze(analyze::AnalyzeCommand),
    /// PNG figures from run directories: loss, online probe, effective rank, spectra,
    /// mask-ratio curves and t-SNE (whatever the runs have data for).
    Plot {
        /// Run directories, plotted together.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output folder.
        #[arg(long, short, default_value = "figures")]
        output: PathBuf,
        /// Legend names, comma separated (default: the run folder names).
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
    },
    /// Write the encoder of a run (or checkpoint, or recipe) for PyTorch: `--format timm` gives
    /// a safetensors state dict with timm VisionTransformer names and layouts.
    Export {
        #[command(flatten)]
        source: eval::ModelArgs,
        /// Output layout (timm).
        #[arg(long, default_value = "timm")]
        format: String,
        /// Output file (default: <run>/export/<checkpoint>-timm.safetensors).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Read a PyTorch encoder (official MAE `.pth` such as mae_pretrain_vit_base.pth, a timm
    /// state dict, or `umae export` output) into a new run directory for eval, analysis or
    /// further pretraining.
    Import {
        /// Checkpoint file (.pth, .pt or .safetensors).
        file: PathBuf,
        /// Recipe describing the encoder (e.g. recipes/mae-vitb.ron).
        #[arg(long)]
        recipe: PathBuf,
        /// Override a recipe field (repeatable).
        #[arg(long = "set", value_name = "PATH=VALUE")]
        sets: Vec<String>,
        /// New run directory.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Time training steps on synthetic input of the recipe's shape.
    Bench {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Images per step (default: the recipe's train.batch_size).
        #[arg(long)]
        batch: Option<usize>,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long)]
        device: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Time the input pipeline alone (read, decode, augment, normalise) on the recipe's
        /// training data instead of the model: `--steps` batches with one worker, then with
        /// `--workers`.
        #[arg(long)]
        data: bool,
        /// Worker threads for `--data` (default: the recipe's data.workers).
        #[arg(long, requires = "data")]
        workers: Option<usize>,
    },
    /// Check that a device computes what the CPU does: one training step of the recipe's model
    /// with the same weights, images and masks, in f32 and with bf16 products; exit 1 if they
    /// disagree.
    DeviceCheck {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// The device to check (default: the recipe's `device`).
        #[arg(long)]
        device: Option<String>,
        /// Images in the step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
}

/// Run the command line; returns the process exit code (0 ok, 1 failure, 2 bad input).
pub fn main() -> ExitCode {
    ExitCode::from(run())
}

/// [`main`]'s exit code as a number (0 ok, 1 failure, 2 bad input, 130 interrupted).
pub fn run() -> u8 {
    // Before any thread starts: freed buffers stay in the heap for the next training step.
    umae_runtime::memory::keep_freed_memory();
    crate::builtin_plugins();
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("UMAE_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = cli
        .plugins
        .iter()
        .try_for_each(|p| {
            umae_runtime::plugins::load(p)
                .map(drop)
                .map_err(Error::plugin)
        })
        .and_then(|()| dispatch(cli.command, &cli.plugins));
    exit(result)
}

/// The one place where errors become exit codes: 2 for bad input, 1 for a failure while
/// working, 130 for an interrupt (README.md, "Exit codes").
fn exit(result: Result<(), Error>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            match &e {
                Error::Interrupted(m) => eprintln!("{m}"),
                other => eprintln!("error: {other}"),
            }
            e.exit_code()
        }
    }
}

fn load(path: &Path, sets: &[String]) -> Result<Recipe, Error> {
    Recipe::load(path, sets).map_err(Error::from)
}

pub(crate) fn device_for(flag: Option<&str>, recipe: &Recipe) -> Result<umae_api::Device, Error> {
    let name = flag.or(recipe.device.as_deref()).unwrap_or("cpu");
    parse_device(name).map_err(Error::command_line)
}

fn dispatch(command: Command, plugins: &[PathBuf]) -> Result<(), Error> {
    match command {
        Command::Sweep {
            recipe,
            grids,
            seeds,
            jobs,
            device,
            output,
        } => sweep(recipe, &grids, seeds, jobs, device, output, plugins),
        Command::Plugins { kind } => list_plugins(kind.as_deref()),
        Command::Orchestrator { port } => {
            println!("orchestrator listening on port {port} (Ctrl-C to stop)");
            umae_runtime::exec::nodes::orchestrator(port).map_err(Error::Failed)
        }
        Command::NewPlugin { name, kind, output } => scaffold::new_plugin(&name, &kind, output),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Analyze(cmd) => analyze::run(cmd),
        Command::Export {
            source,
            format,
            output,
        } => interop::export(source, &format, output),
        Command::Import {
            file,
            recipe,
            sets,
            output,
        } => interop::import(file, recipe, sets, output),
        Command::Plot {
            runs,
            output,
            names,
        } => {
            let files = analyze::plot_runs(&runs, &output, &names)?;
            if files.is_empty() {
                return Err(Error::command_line(
                    "the runs have nothing to plot yet (no metrics rows)",
                ));
            }
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::Check { recipe, json } => {
            let r = load(&recipe.recipe, &recipe.sets)?;
            let device = parse_device("cpu").map_err(Error::command_line)?;
            let model = Model::build(&r, &device).map_err(Error::from)?;
            let report = model.report();
            if json {
                let mut v =
                    serde_json::to_value(&report).map_err(|e| Error::Failed(e.to_string()))?;
                v["trainable"] = report.trainable().into();
                v["fixed"] = report.fixed().into();
                println!("{v}");
            } else {
                println!("recipe   {} ({})", r.name, r.path.display());
                print!("{report}");
                println!(
                    "ok: effective batch {}, peak lr {:.3e}, {} epochs",
                    r.effective_batch(),
                    r.peak_lr(),
                    r.train.epochs
                );
            }
            Ok(())
        }
        Command::Run {
            recipe,
            sets,
            output,
            resume,
            force,
            device,
            nodes,
        } => {
            let (r, run_dir, resume) = match resume {
                Some(dir) => {
                    let path = dir.join("recipe.ron");
                    if !path.exists() {
                        return Err(Error::command_line(format!(
                            "{} is not a run directory (no recipe.ron)",
                            dir.display()
                        )));
                    }
                    (load(&path, &sets)?, dir, true)
                }
                None => {
                    let r = load(recipe.as_deref().expect("clap requires a recipe"), &sets)?;
                    let dir = output
                        .or_else(|| r.output.dir.as_ref().map(PathBuf::from))
                        .unwrap_or_else(|| PathBuf::from("runs").join(&r.name));
                    (r, dir, false)
                }
            };
            let name = device.as_deref().or(r.device.as_deref()).unwrap_or("cpu");
            let mut devices = umae_runtime::parse_devices(name).map_err(Error::command_line)?;
            let device = devices.remove(0);
            let summary = umae_runtime::run(
                &r,
                &RunOptions {
                    run_dir: run_dir.clone(),
                    device,
                    parallel: devices,
                    nodes: nodes.resolve().map_err(Error::command_line)?,
                    resume,
                    force,
                },
            )?;
            if let Some(name) = &summary.interrupted {
                return Err(Error::Interrupted(format!(
                    "stopped after step {}: checkpoint {name} written; continue with `umae run --resume {}`",
                    summary.steps,
                    run_dir.display()
                )));
            }
            println!(
                "done: {} epochs, {} steps, final target loss {:.4}{}{}{} -> {}",
                summary.epochs,
                summary.steps,
                summary.last_target_loss,
                summary
                    .probe_accuracy
                    .map(|a| format!(", online probe {:.2}%", a * 100.0))
                    .unwrap_or_default(),
                summary
                    .erank
                    .map(|e| format!(", erank {e:.2}"))
                    .unwrap_or_default(),
                summary
                    .linear
                    .map(|a| format!(", linear probe {:.2}%", a * 100.0))
                    .unwrap_or_default()
                    + &summary
                        .knn
                        .map(|a| format!(", kNN {:.2}%", a * 100.0))
                        .unwrap_or_default()
                    + &summary
                        .finetune
                        .map(|a| format!(", fine-tuned {:.2}%", a * 100.0))
                        .unwrap_or_default(),
                run_dir.display()
            );
            Ok(())
        }
        Command::Bench {
            recipe,
            batch,
            steps,
            warmup,
            device,
            json,
            data,
            workers,
        } => {
            let r = load(&recipe.recipe, &recipe.sets)?;
            let batch = batch.unwrap_or(r.train.batch_size);
            if batch == 0 || steps == 0 || workers == Some(0) {
                return Err(Error::command_line(
                    "--batch, --steps and --workers must be at least 1",
                ));
            }
            if data {
                let workers = workers.unwrap_or(r.data.workers);
                let res = bench::bench_pipeline(&r, batch, steps, workers)?;
                if json {
                    print_json(&res)?;
                } else {
                    println!(
                        "{} input pipeline: {} images of {}x{} in batches of {batch}: {:.0} images/s on 1 worker (one core), {:.0} images/s on {workers} workers ({:.2}x, {} cores busy)",
                        r.name,
                        res.images,
                        r.data.image_size,
                        r.data.image_size,
                        res.per_core,
                        res.with_workers,
                        res.with_workers / res.per_core,
                        res.cores_busy.map(|c| format!("{c:.2}")).unwrap_or("n/a".into()),
                    );
                }
                return Ok(());
            }
            let device = device_for(device.as_deref(), &r)?;
            let res = bench::bench(&r, &device, batch, steps, warmup)?;
            if json {
                print_json(&res)?;
            } else {
                println!(
                    "{}: batch {batch}, {steps} steps in {:.2}s: {:.1} images/s, {:.1} ms/step, {} cores busy, peak memory {}",
                    r.name,
                    res.seconds,
                    res.images_per_s,
                    res.ms_per_step,
                    res.cores_busy.map(|c| format!("{c:.2}")).unwrap_or("n/a".into()),
                    res.peak_rss_mib.map(|m| format!("{m:.0} MiB (process RSS)")).unwrap_or("n/a".into())
                );
            }
            Ok(())
        }
        Command::DeviceCheck {
            recipe,
            device,
            batch,
        } => {
            let r = load(&recipe.recipe, &recipe.sets)?;
            let name = device.as_deref().or(r.device.as_deref()).unwrap_or("cpu");
            let device = device_for(Some(name), &r)?;
            if batch == 0 {
                return Err(Error::command_line("--batch must be at least 1"));
            }
            let c = bench::device_check(&r, &device, batch)?;
            let (f, h) = c.errors();
            println!("{}: one training step, batch {batch}, total loss", r.name);
            println!("  reference: cpu f32 {:.6}", c.cpu);
            println!(
                "  {name} f32: {:.6} (relative difference {f:.2e}, at most 1e-2)",
                c.device_f32
            );
            println!(
                "  {name} bf16: {:.6} (relative difference {h:.2e}, at most 5e-2)",
                c.device_bf16
            );
            if c.passed() {
                println!("{name} agrees with the CPU");
                Ok(())
            } else {
                Err(Error::Failed(format!(
                    "{name} disagrees with the CPU: check the driver and the build (`cargo build --release --features cuda`), and report it with this output"
                )))
            }
        }
    }
}

/// One line of JSON on stdout.
pub(crate) fn print_json(value: &impl umae_api::serde::Serialize) -> Result<(), Error> {
    let line = serde_json::to_string(value).map_err(|e| Error::Failed(e.to_string()))?;
    println!("{line}");
    Ok(())
}

/// `umae sweep`: run the cells, print where the summary is and what failed.
fn sweep(
    recipe: RecipeArgs,
    grids: &[String],
    seeds: usize,
    jobs: usize,
    device: Option<String>,
    output: Option<PathBuf>,
    plugins: &[PathBuf],
) -> Result<(), Error> {
    use umae_runtime::sweep::{self, Axis, SweepOptions};
    let axes = grids
        .iter()
        .map(|g| Axis::parse(g).map_err(Error::command_line))
        .collect::<Result<Vec<_>, _>>()?;
    // The cells run this very binary: on Linux through /proc/self/exe, which stays this
    // process's executable even if `cargo build` replaces target/release/umae meanwhile.
    let proc_exe = Path::new("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().map_err(|e| {
            Error::Failed(format!("cannot find the umae binary to run the cells: {e}"))
        })?
    };
    let report = sweep::run(&SweepOptions {
        exe,
        plugins: plugins.to_vec(),
        recipe: recipe.recipe,
        sets: recipe.sets,
        axes,
        seeds,
        jobs,
        device,
        output,
    })?;
    if let Some(e) = &report.figure_error {
        eprintln!("warning: no figures: {e}");
    }
    for f in &report.files {
        println!("wrote {}", f.display());
    }
    let dir = report.dir.display();
    if report.interrupted {
        return Err(Error::Interrupted(format!(
            "sweep stopped: {} of {} cells finished; running cells checkpointed; continue with the same command",
            report.skipped + report.finished,
            report.cells
        )));
    }
    if !report.failed.is_empty() {
        let list: Vec<String> = report
            .failed
            .iter()
            .map(|(c, why)| format!("  {c}: {why}"))
            .collect();
        return Err(Error::Failed(format!(
            "{} of {} cells failed (the summary in {dir} has the others; the same command retries them):\n{}",
            report.failed.len(),
            report.cells,
            list.join("\n")
        )));
    }
    println!(
        "done: {} cells ({} trained now, {} already finished) -> {dir}",
        report.cells, report.finished, report.skipped
    );
    Ok(())
}

fn list_plugins(kind: Option<&str>) -> Result<(), Error> {
    let only = match kind {
        None => None,
        Some(k) => Some(
            PluginKind::ALL
                .into_iter()
                .find(|p| p.name() == k)
                .ok_or_else(|| {
                    let names: Vec<&str> = PluginKind::ALL.iter().map(|k| k.name()).collect();
                    Error::command_line(format!(
                        "unknown plugin kind `{k}` (valid: {}){}",
                        names.join(", "),
                        umae_api::suggest::nearest(k, names.iter().copied())
                            .map(|s| format!("; did you mean `{s}`?"))
                            .unwrap_or_default()
                    ))
                })?,
        ),
    };
    for p in registry::plugins() {
        if only.is_some_and(|k| k != p.kind()) {
            continue;
        }
        println!("{:<12} {:<14} {}", p.kind(), p.name, p.doc);
        for f in (p.params)() {
            let default = f.default.rsplit("::").next().unwrap_or(f.default);
            println!(
                "    {:<12} {:<16} = {:<14} {}",
                f.name,
                f.ty.replace(' ', ""),
                default,
                f.doc.trim()
            );
        }
    }
    Ok(())
}
