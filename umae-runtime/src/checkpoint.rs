//! Checkpoints: weights and optimizer moments as safetensors, training position and RNG state
//! as JSON. Each checkpoint is written to a temporary folder and renamed into place, and the
//! `latest` pointer is replaced atomically, so an interrupted write never damages the last
//! good checkpoint.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use umae_api::store::{
    read_safetensors, read_safetensors_meta, write_safetensors, write_safetensors_meta, HostTensor,
};
use umae_api::{Device, Rng, Trainable};

/// Training position saved with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// The masking RNG.
    pub rng: Rng,
    pub umae_version: String,
}

/// Every parameter of the components, keyed `prefix.path`.
pub fn collect_params(modules: &[(&'static str, &dyn Trainable)]) -> HashMap<String, HostTensor> {
    let mut out = HashMap::new();
    for (prefix, m) in modules {
        m.visit_params(&mut |info, t| {
            out.insert(
                format!("{prefix}.{}", info.path),
                HostTensor::from_inner(t, info.shape),
            );
        });
    }
    out
}

/// Load parameters into the components; every parameter must be present with its shape.
pub fn load_params(
    modules: &mut [(&'static str, &mut dyn Trainable)],
    tensors: &HashMap<String, HostTensor>,
    device: &Device,
    source: &Path,
) -> Result<(), String> {
    let mut problems = Vec::new();
    for (prefix, m) in modules.iter_mut() {
        m.map_params(&mut |info, current| {
            let k = format!("{prefix}.{}", info.path);
            match tensors.get(&k) {
                Some(t) if t.shape == info.shape => t.to_inner(device),
                Some(t) => {
                    problems.push(format!(
                        "`{k}` has shape {:?} in the file, the model needs {:?}",
                        t.shape, info.shape
                    ));
                    current
                }
                None => {
                    problems.push(format!("`{k}` is missing"));
                    current
                }
            }
        });
    }
    misfit(source, "this model", &problems)
}

/// `Ok` when `problems` is empty, else one error naming the file and the first five problems.
pub fn misfit(source: &Path, what: &str, problems: &[String]) -> Result<(), String> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} does not fit {what} ({} problem(s)): {}{}",
        source.display(),
        problems.len(),
        problems[..problems.len().min(5)].join("; "),
        if problems.len() > 5 { "; ..." } else { "" }
    ))
}

/// Write `dir` atomically: fill `dir.tmp`, then rename.
pub fn write_dir_atomic(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| format!("cannot clear {}: {e}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    fill(&tmp)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("cannot replace {}: {e}", dir.display()))?;
    }
    fs::rename(&tmp, dir).map_err(|e| format!("cannot move {} into place: {e}", dir.display()))
}

/// Replace a small text file atomically.
pub fn write_file_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot move {} into place: {e}", path.display()))
}

/// The newest complete checkpoint of a run directory, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, String> {
    let pointer = run_dir.join("checkpoints").join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&pointer)
        .map_err(|e| format!("cannot read {}: {e}", pointer.display()))?;
    let dir = run_dir.join("checkpoints").join(name.trim());
    if !dir.join("state.json").exists() {
        return Err(format!(
            "{} points to {}, which is not a complete checkpoint",
            pointer.display(),
            dir.display()
        ));
    }
    Ok(Some(dir))
}

pub fn read_state(dir: &Path) -> Result<State, String> {
    let p = dir.join("state.json");
    let text = fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is damaged: {e}", p.display()))
}
