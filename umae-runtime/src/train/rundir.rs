//! The run directory: refused when occupied (unless resumed or replaced), checked writable
//! and roomy enough before anything is written, and cleared by `--force`.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use umae_api::recipe::Recipe;

use super::resume::{initial_state, save_checkpoint};
use super::RunOptions;
use crate::checkpoint;
use crate::data::{self, Dataset, Split};
use crate::model::Model;
use crate::optim::AdamW;
use crate::Error;

fn occupied(run_dir: &Path) -> bool {
    !checkpoint::list(run_dir).is_empty() || run_dir.join("metrics.jsonl").exists()
}

/// Check the directory and the training data before anything is written, then make the
/// directory ready: cleared with `--force`, created, writable, holding the recipe. Returns the
/// training set.
pub(super) fn prepare(recipe: &Recipe, opts: &RunOptions) -> crate::Result<Arc<dyn Dataset>> {
    let run_dir = &opts.run_dir;
    if occupied(run_dir) && !opts.resume && !opts.force {
        return Err(Error::run_dir(format!(
            "{} already holds a run: continue it with `umae run --resume {}`, replace it with --force, or choose another --output",
            run_dir.display(),
            run_dir.display()
        )));
    }
    let train_set = data::open(&recipe.data, Split::Train, recipe.seed)?;
    if !train_set.labeled() {
        if let Some(why) = data::labels_needed(recipe) {
            return Err(Error::recipe(why));
        }
    }
    if run_dir.exists() && !run_dir.is_dir() {
        return Err(Error::run_dir(format!(
            "--output {} is a file, not a directory",
            run_dir.display()
        )));
    }
    if opts.force && !opts.resume {
        clear_run(run_dir)?;
    }
    fs::create_dir_all(run_dir.join("checkpoints"))
        .map_err(|e| Error::run_dir(format!("cannot create {}: {e}", run_dir.display())))?;
    let probe_file = run_dir.join(".write-test");
    fs::write(&probe_file, b"")
        .and_then(|()| fs::remove_file(&probe_file))
        .map_err(|e| Error::run_dir(format!("cannot write into {}: {e}", run_dir.display())))?;
    if !opts.resume {
        checkpoint::write_file_atomic(&run_dir.join("recipe.ron"), &recipe.tree.to_ron())?;
    }
    Ok(train_set)
}

/// Start a run directory whose first checkpoint (`epoch-0000`) holds `model` as it is now, e.g.
/// an imported encoder. Evaluations read it; `umae run --resume` continues pretraining from it.
pub fn start_run_from(recipe: &Recipe, model: &Model, run_dir: &Path) -> crate::Result<()> {
    if occupied(run_dir) {
        return Err(Error::run_dir(format!(
            "{} already holds a run: choose another output folder",
            run_dir.display()
        )));
    }
    fs::create_dir_all(run_dir.join("checkpoints"))
        .map_err(|e| Error::run_dir(format!("cannot create {}: {e}", run_dir.display())))?;
    checkpoint::write_file_atomic(&run_dir.join("recipe.ron"), &recipe.tree.to_ron())?;
    let opt = AdamW::new(recipe.optimizer.clone());
    Ok(save_checkpoint(
        run_dir,
        recipe,
        model,
        &None,
        &opt,
        &initial_state(recipe),
    )?)
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

fn clear_run(run_dir: &Path) -> crate::Result<()> {
    for name in RUN_ENTRIES {
        let p = run_dir.join(name);
        let removed = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else if p.exists() {
            fs::remove_file(&p)
        } else {
            Ok(())
        };
        removed
            .map_err(|e| Error::run_dir(format!("--force: cannot remove {}: {e}", p.display())))?;
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
pub(super) fn check_disk_space(run_dir: &Path, model: &Model) -> crate::Result<()> {
    let need = checkpoint_bytes(model) + (16 << 20);
    match free_bytes(run_dir) {
        Some(free) if free < need => Err(Error::run_dir(format!(
            "{} has {} MiB free on its disk, a checkpoint of this model needs about {} MiB: free some space or choose another --output",
            run_dir.display(),
            free >> 20,
            need >> 20
        ))),
        _ => Ok(()),
    }
}
