//! `metrics.jsonl`: one row per logged step, per epoch and per evaluation.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::checkpoint;
use crate::step::{StepScalars, Terms};

/// Append one JSON row to a `.jsonl` file (created if missing).
pub fn append_jsonl(path: &Path, row: &Value) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    writeln!(f, "{row}").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Every row of a `.jsonl` file (blank lines skipped); a malformed line is an error naming it.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| format!("{}:{}: not a JSON row: {e}", path.display(), i + 1))
        })
        .collect()
}

/// A run's `metrics.jsonl`.
pub(super) struct Metrics {
    pub path: PathBuf,
}

impl Metrics {
    pub fn in_run(run_dir: &Path) -> Metrics {
        Metrics {
            path: run_dir.join("metrics.jsonl"),
        }
    }

    pub fn write(&self, row: Map<String, Value>) -> Result<(), String> {
        append_jsonl(&self.path, &Value::Object(row))
    }

    /// Drop rows written after `step` (by a run that stopped before its next checkpoint).
    pub fn truncate_after(&self, step: u64) -> Result<(), String> {
        let Ok(text) = fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        checkpoint::write_file_atomic(&self.path, &kept)
    }
}

/// A row's position: `kind`, `epoch` (1-based) and `step`.
pub(super) fn row(kind: &str, epoch: usize, step: u64) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("kind".into(), json!(kind));
    row.insert("epoch".into(), json!(epoch));
    row.insert("step".into(), json!(step));
    row
}

/// Every loss term of `means` under its metrics name (`loss`, `target.*`, `reg.*`,
/// `probe.loss`).
pub(super) fn insert_losses(row: &mut Map<String, Value>, terms: &Terms, means: &StepScalars) {
    for (name, v) in terms.named(means) {
        row.insert(name, json!(v));
    }
}
