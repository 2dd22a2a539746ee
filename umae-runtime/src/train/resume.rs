//! Checkpoints of a run and continuing from them: the newest one that verifies and loads.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use umae_api::recipe::Recipe;
use umae_api::{Device, Rng};

use super::metrics::Metrics;
use crate::checkpoint::{self, HostTensor, State};
use crate::model::Model;
use crate::optim::{AdamW, AdamWState};
use crate::step::ProbeNorm;
use crate::Error;

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
        let opt_state = opt.state();
        let mut moments = HashMap::new();
        for (prefix, list) in [("m", opt_state.m), ("v", opt_state.v)] {
            for (k, t) in list {
                let n = t.dims()[0];
                moments.insert(format!("{prefix}.{k}"), HostTensor::from_inner(t, &[n]));
            }
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
    let mut moments: Vec<(String, HostTensor)> =
        checkpoint::read_safetensors(&dir.join("optimizer.safetensors"))?
            .into_iter()
            .collect();
    moments.sort_by(|a, b| a.0.cmp(&b.0));
    let mut restored = AdamWState {
        step: state.step,
        m: Vec::new(),
        v: Vec::new(),
    };
    for (k, t) in moments {
        if let Some(key) = k.strip_prefix("m.") {
            restored.m.push((key.to_string(), t.to_inner(device)));
        } else if let Some(key) = k.strip_prefix("v.") {
            restored.v.push((key.to_string(), t.to_inner(device)));
        }
    }
    opt.load_state(restored);
    Ok(state)
}

/// Where a run starts: the beginning, or (`--resume`) the newest checkpoint of `run_dir` that
/// verifies and loads, a damaged one reported and the one before it tried. Metrics rows
/// written after that checkpoint are dropped.
pub(super) fn restore(
    run_dir: &Path,
    resume: bool,
    recipe: &Recipe,
    parts: (&mut Model, &mut Option<ProbeNorm>, &mut AdamW),
    metrics: &Metrics,
    device: &Device,
) -> crate::Result<State> {
    let state = initial_state(recipe);
    if !resume {
        return Ok(state);
    }
    let existing: Vec<PathBuf> = checkpoint::list(run_dir);
    if existing.is_empty() {
        if !run_dir.join("recipe.ron").exists() {
            return Err(Error::run_dir(format!(
                "{} has no checkpoint to resume from: start it with `umae run` instead",
                run_dir.display()
            )));
        }
        tracing::warn!(
            "{} has no checkpoint yet (stopped before the first one): starting it from the beginning",
            run_dir.display()
        );
        metrics.truncate_after(0)?;
        return Ok(state);
    }
    let (model, norm, opt) = parts;
    let mut problems = Vec::new();
    for dir in existing.iter().rev() {
        let loaded =
            checkpoint::verify(dir).and_then(|()| load_checkpoint(dir, model, norm, opt, device));
        match loaded {
            Ok(state) => {
                metrics.truncate_after(state.step)?;
                tracing::info!(
                    "resuming {} from {} (after epoch {}, step {})",
                    run_dir.display(),
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    state.epoch,
                    state.step
                );
                return Ok(state);
            }
            Err(e) => {
                tracing::warn!("{e}: trying the checkpoint before it");
                problems.push(e);
            }
        }
    }
    Err(Error::Failed(format!(
        "no checkpoint of {} can be loaded: {}",
        run_dir.display(),
        problems.join("; ")
    )))
}
