//! `umae sweep`: every cell of a grid of recipe overrides, times a number of seeds, as child
//! `umae run` processes, each in its own run directory; then a summary over seeds.
//!
//! A sweep directory holds `sweep.json` (the recipe, overrides and grid it was made for), one
//! folder per cell (`NN-PATH=VALUE-seedS/`, a normal run directory plus `sweep.log` and a
//! `done` marker) and the summary (`summary.md`, `summary.csv`, `sweep-*.png`). Running the
//! same sweep again skips finished cells, resumes a cell with a checkpoint and starts the
//! others afresh, so a killed sweep loses at most the steps since each cell's last checkpoint.

pub mod summary;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use umae_api::recipe::Recipe;

use crate::checkpoint::write_file_atomic;
use crate::Error;

/// One swept field: `--grid PATH=V1,V2,...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub path: String,
    pub values: Vec<String>,
}

impl Axis {
    /// Parse `PATH=V1,V2,...`; the values are RON, split at the commas outside brackets,
    /// parentheses, braces and strings (so `regularizers=[],[(plugin: "uniformity")]` is two).
    pub fn parse(arg: &str) -> Result<Axis, String> {
        let Some((path, list)) = arg.split_once('=') else {
            return Err(format!(
                "--grid {arg}: expected PATH=V1,V2,... (for example --grid regularizers.0.weight=1e-3,1e-2)"
            ));
        };
        let path = path.trim();
        if path.is_empty() {
            return Err(format!("--grid {arg}: the field path before `=` is empty"));
        }
        let values = split_top_level(list);
        if let Some(i) = values.iter().position(|v| v.is_empty()) {
            return Err(format!(
                "--grid {arg}: value {} is empty (values are separated by commas)",
                i + 1
            ));
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                return Err(format!("--grid {arg}: the value `{v}` is listed twice"));
            }
        }
        if path == "seed" {
            return Err(format!(
                "--grid {arg}: seeds are swept with --seeds N (seeds S, S+1, ... from the recipe's `seed`)"
            ));
        }
        Ok(Axis {
            path: path.to_string(),
            values,
        })
    }
}

/// Split at commas not nested in (), [], {} or a string.
fn split_top_level(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth, mut in_str, mut escaped) =
        (Vec::new(), String::new(), 0i32, false, false);
    for c in s.chars() {
        if in_str {
            cur.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur.trim().to_string());
    out
}

/// What `umae sweep` was asked to do.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The `umae` binary that runs the cells (the current executable).
    pub exe: PathBuf,
    /// `--plugin` libraries, passed on to every cell.
    pub plugins: Vec<PathBuf>,
    pub recipe: PathBuf,
    /// `--set` overrides common to every cell.
    pub sets: Vec<String>,
    pub axes: Vec<Axis>,
    pub seeds: usize,
    /// Cells trained at the same time.
    pub jobs: usize,
    /// `--device` for every cell.
    pub device: Option<String>,
    /// Sweep directory (default `runs/<recipe name>-sweep`).
    pub output: Option<PathBuf>,
}

/// What a sweep is, as stored in `sweep.json`: a later sweep into the same directory must be
/// the same one (seeds may be added).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    recipe: String,
    sets: Vec<String>,
    axes: Vec<Axis>,
}

/// One run of the sweep: a combination of axis values and a seed.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Index of the combination in grid order (the last axis changes fastest).
    pub combination: usize,
    /// One value per axis.
    pub values: Vec<String>,
    pub seed: u64,
    pub dir: PathBuf,
}

impl Cell {
    /// `PATH=VALUE` per axis, then `seed=S`.
    pub fn sets(&self, axes: &[Axis]) -> Vec<String> {
        axes.iter()
            .zip(&self.values)
            .map(|(a, v)| format!("{}={v}", a.path))
            .chain([format!("seed={}", self.seed)])
            .collect()
    }

    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn done_marker(&self) -> PathBuf {
        self.dir.join("done")
    }

    fn has_checkpoint(&self) -> bool {
        fs::read_dir(self.dir.join("checkpoints"))
            .map(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("model.safetensors").exists())))
            .unwrap_or(false)
    }
}

/// Keep what a file name can hold: letters, digits and `.=-+,`; the rest becomes `_`.
fn file_safe(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".=-+,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.chars().take(80).collect()
}

/// Every combination of the axes' values, in grid order.
pub fn combinations(axes: &[Axis]) -> Vec<Vec<String>> {
    axes.iter().fold(vec![Vec::new()], |acc, axis| {
        acc.iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push(v.clone());
                    c
                })
            })
            .collect()
    })
}

/// The cells of a sweep, seeds innermost.
pub fn cells(dir: &Path, axes: &[Axis], first_seed: u64, seeds: usize) -> Vec<Cell> {
    let mut out = Vec::new();
    for (i, values) in combinations(axes).into_iter().enumerate() {
        let label: Vec<String> = axes
            .iter()
            .zip(&values)
            .map(|(a, v)| file_safe(&format!("{}={v}", a.path)))
            .collect();
        for k in 0..seeds as u64 {
            let seed = first_seed + k;
            let mut name = format!("{i:02}");
            if !label.is_empty() {
                name += &format!("-{}", label.join(","));
            }
            name += &format!("-seed{seed}");
            out.push(Cell {
                combination: i,
                values: values.clone(),
                seed,
                dir: dir.join(name),
            });
        }
    }
    out
}

/// How a sweep went.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub dir: PathBuf,
    pub cells: usize,
    /// Finished before this invocation.
    pub skipped: usize,
    /// Trained (or resumed) to the end now.
    pub finished: usize,
    /// (cell, why) for each cell that failed.
    pub failed: Vec<(String, String)>,
    /// Stopped by SIGINT or SIGTERM (the running cells checkpointed).
    pub interrupted: bool,
    /// Summary files written.
    pub files: Vec<PathBuf>,
    /// Why a figure could not be drawn, if so.
    pub figure_error: Option<String>,
}

/// Run a sweep to the end (or to an interrupt), then write its summary.
pub fn run(opts: &SweepOptions) -> crate::Result<SweepReport> {
    if opts.seeds == 0 || opts.jobs == 0 {
        return Err(Error::command_line("--seeds and --jobs must be at least 1"));
    }
    for (i, a) in opts.axes.iter().enumerate() {
        if opts.axes[..i].iter().any(|b| b.path == a.path) {
            return Err(Error::command_line(format!(
                "--grid {}: swept twice; give all its values in one --grid",
                a.path
            )));
        }
    }
    let base = Recipe::load(&opts.recipe, &opts.sets)?;
    let dir = opts
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-sweep", base.name)));
    let cells = cells(&dir, &opts.axes, base.seed, opts.seeds);
    // Every cell's recipe must load before anything runs.
    for c in &cells {
        let mut sets = opts.sets.clone();
        sets.extend(c.sets(&opts.axes));
        Recipe::load(&opts.recipe, &sets).map_err(|e| {
            Error::recipe(format!(
                "cell {} ({}): {e}",
                c.name(),
                c.sets(&opts.axes).join(" ")
            ))
        })?;
    }
    claim(&dir, opts)?;
    let mut report = SweepReport {
        dir: dir.clone(),
        cells: cells.len(),
        ..SweepReport::default()
    };
    let mut pending: VecDeque<&Cell> = VecDeque::new();
    for c in &cells {
        if c.done_marker().exists() {
            report.skipped += 1;
        } else {
            pending.push_back(c);
        }
    }
    if report.skipped > 0 {
        tracing::info!(
            "{} of {} cells already finished in {}",
            report.skipped,
            cells.len(),
            dir.display()
        );
    }
    let stop = crate::train::interrupt_flag().map_err(Error::Failed)?;
    let bar = crate::progress::bar(cells.len() as u64, "sweep");
    crate::progress::tick(&bar, report.skipped as u64);
    let threads = cell_threads(opts.jobs);
    let mut running: Vec<(&Cell, Child, Instant)> = Vec::new();
    let mut signalled = false;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping && !signalled {
            // The cells run in their own process groups (a Ctrl-C reaches only this process):
            // one SIGTERM each, so that every cell finishes its step and checkpoints.
            for (_, child, _) in &running {
                // SAFETY: kill(2) on the pid of a child that has not been reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
            signalled = true;
            report.interrupted = true;
        }
        while !stopping && running.len() < opts.jobs {
            let Some(cell) = pending.pop_front() else {
                break;
            };
            let child = spawn(cell, opts, threads)?;
            tracing::info!(
                "cell {} started ({})",
                cell.name(),
                cell.sets(&opts.axes).join(" ")
            );
            running.push((cell, child, Instant::now()));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            let status = running[i]
                .1
                .try_wait()
                .map_err(|e| Error::Failed(format!("cannot wait for a cell: {e}")))?;
            let Some(status) = status else {
                i += 1;
                continue;
            };
            let (cell, _, started) = running.swap_remove(i);
            let took = match started.elapsed().as_secs_f64() {
                s if s < 120.0 => format!("{s:.1} s"),
                s => format!("{:.1} min", s / 60.0),
            };
            match status.code() {
                Some(0) => {
                    write_file_atomic(&cell.done_marker(), "finished\n").map_err(Error::Failed)?;
                    report.finished += 1;
                    crate::progress::tick(&bar, 1);
                    tracing::info!("cell {} finished in {took}", cell.name());
                }
                Some(130) if signalled => {
                    tracing::info!("cell {} stopped at a checkpoint", cell.name())
                }
                code => {
                    let log = cell.dir.join("sweep.log");
                    let why = format!(
                        "exit {}; see {}{}",
                        code.map(|c| c.to_string()).unwrap_or("by a signal".into()),
                        log.display(),
                        last_error(&log)
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default()
                    );
                    tracing::warn!("cell {} failed: {why}", cell.name());
                    report.failed.push((cell.name(), why));
                    crate::progress::tick(&bar, 1);
                }
            }
        }
    }
    crate::progress::finish(bar);
    let (files, figure_error) = summary::write(&dir, &opts.axes, &cells)?;
    report.files = files;
    report.figure_error = figure_error;
    Ok(report)
}

/// Make `dir` this sweep's: record the manifest, or check that the one there matches.
fn claim(dir: &Path, opts: &SweepOptions) -> crate::Result<()> {
    let recipe = fs::canonicalize(&opts.recipe)
        .unwrap_or_else(|_| opts.recipe.clone())
        .display()
        .to_string();
    let manifest = Manifest {
        recipe,
        sets: opts.sets.clone(),
        axes: opts.axes.clone(),
    };
    let path = dir.join("sweep.json");
    if dir.exists() && !dir.is_dir() {
        return Err(Error::run_dir(format!(
            "{} is a file, not a sweep directory: choose another --output",
            dir.display()
        )));
    }
    if path.exists() {
        let text = fs::read_to_string(&path)
            .map_err(|e| Error::run_dir(format!("cannot read {}: {e}", path.display())))?;
        let old: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::run_dir(format!(
                "{} is not a sweep manifest ({e}): choose another --output",
                path.display()
            ))
        })?;
        if old != manifest {
            return Err(Error::run_dir(format!(
                "{} holds another sweep (recipe {}, --set {:?}, grid {}): choose another --output, or repeat that sweep's arguments to continue it",
                dir.display(),
                old.recipe,
                old.sets,
                old.axes
                    .iter()
                    .map(|a| format!("{}={}", a.path, a.values.join(",")))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
        return Ok(());
    }
    if dir.exists()
        && fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        return Err(Error::run_dir(format!(
            "{} exists and is not a sweep directory (no sweep.json): choose another --output",
            dir.display()
        )));
    }
    fs::create_dir_all(dir)
        .map_err(|e| Error::run_dir(format!("cannot create {}: {e}", dir.display())))?;
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Failed(e.to_string()))?;
    write_file_atomic(&path, &(text + "\n")).map_err(Error::Failed)
}

/// Threads per cell when several train at once: the cores shared out, unless the user set
/// `RAYON_NUM_THREADS`.
fn cell_threads(jobs: usize) -> Option<usize> {
    if jobs <= 1 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / jobs).max(1))
}

/// Start a cell: resume it from its checkpoint, or start it afresh (replacing what a cell that
/// never reached a checkpoint left).
fn spawn(cell: &Cell, opts: &SweepOptions, threads: Option<usize>) -> crate::Result<Child> {
    fs::create_dir_all(&cell.dir)
        .map_err(|e| Error::run_dir(format!("cannot create {}: {e}", cell.dir.display())))?;
    let log_path = cell.dir.join("sweep.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::Failed(format!("cannot open {}: {e}", log_path.display())))?;
    let err = log
        .try_clone()
        .map_err(|e| Error::Failed(format!("cannot open {}: {e}", log_path.display())))?;
    let mut cmd = Command::new(&opts.exe);
    for p in &opts.plugins {
        cmd.arg("--plugin").arg(p);
    }
    cmd.arg("run");
    if cell.has_checkpoint() {
        cmd.arg("--resume").arg(&cell.dir);
    } else {
        cmd.arg(&opts.recipe)
            .arg("--output")
            .arg(&cell.dir)
            .arg("--force");
        for s in opts.sets.iter().cloned().chain(cell.sets(&opts.axes)) {
            cmd.arg("--set").arg(s);
        }
    }
    if let Some(d) = &opts.device {
        cmd.arg("--device").arg(d);
    }
    if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0);
    cmd.spawn()
        .map_err(|e| Error::Failed(format!("cannot start {}: {e}", opts.exe.display())))
}

/// The last `error:` line of a cell's log.
fn last_error(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_values_split_at_top_level_commas_only() {
        let a = Axis::parse("regularizers.0.weight=0, 1e-3,1e-2").unwrap();
        assert_eq!(a.path, "regularizers.0.weight");
        assert_eq!(a.values, ["0", "1e-3", "1e-2"]);
        let a = Axis::parse(r#"regularizers=[],[(plugin: "uniformity", weight: 1e-2)]"#).unwrap();
        assert_eq!(
            a.values,
            ["[]", r#"[(plugin: "uniformity", weight: 1e-2)]"#]
        );
        let a = Axis::parse(r#"name="a,b","c\",d""#).unwrap();
        assert_eq!(a.values, [r#""a,b""#, r#""c\",d""#]);
    }

    #[test]
    fn bad_grids_say_what_is_wrong() {
        for (arg, needle) in [
            ("train.epochs", "expected PATH=V1,V2"),
            ("=1,2", "path before `=` is empty"),
            ("train.epochs=1,,2", "value 2 is empty"),
            ("train.epochs=", "value 1 is empty"),
            ("train.epochs=1,1", "listed twice"),
            ("seed=1,2", "--seeds"),
        ] {
            let e = Axis::parse(arg).unwrap_err();
            assert!(e.contains(needle), "{arg}: {e}");
        }
    }

    #[test]
    fn cells_cover_the_grid_times_the_seeds_with_distinct_folders() {
        let axes = [
            Axis::parse("a=1,2").unwrap(),
            Axis::parse("b.c=x,(y: [1])").unwrap(),
        ];
        let cells = cells(Path::new("/s"), &axes, 5, 3);
        assert_eq!(cells.len(), 12);
        let mut names: Vec<String> = cells.iter().map(Cell::name).collect();
        assert_eq!(names[0], "00-a=1,b.c=x-seed5");
        assert_eq!(names[11], "03-a=2,b.c=_y___1__-seed7");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 12);
        assert_eq!(
            cells[4].sets(&axes),
            ["a=1", "b.c=(y: [1])", "seed=6"],
            "combination 1 (a=1, b.c=(y: [1])), second seed"
        );
        assert_eq!(
            super::cells(Path::new("/s"), &[], 0, 2)[1].name(),
            "00-seed1"
        );
    }
}
