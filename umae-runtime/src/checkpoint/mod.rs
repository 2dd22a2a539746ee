//! Checkpoints: weights and optimizer moments as safetensors, training position and RNG state
//! as JSON, the recipe they were trained with, and a manifest with every file's size and
//! CRC-32. Each checkpoint is written to a temporary folder, synced to disk and renamed into
//! place, and the `latest` pointer is replaced the same way, so an interrupted write (a crash,
//! SIGKILL, a full disk) never damages the last good checkpoint; a damaged one is found by
//! [`verify`] before anything is loaded from it.

pub mod source;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
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
    /// Optimizer steps already taken in epoch `epoch + 1` (a checkpoint written when the run
    /// was stopped mid-epoch); 0 at an epoch's end.
    #[serde(default)]
    pub epoch_step: usize,
    /// That epoch's running metric sums and images seen, to complete its metrics row. Stored
    /// as IEEE bit patterns: JSON's decimal floats are not read back bit-exactly by
    /// serde_json's default parser, and a resumed run must sum exactly as an uninterrupted one.
    #[serde(default, with = "f64_bits")]
    pub epoch_sums: Vec<f64>,
    #[serde(default)]
    pub epoch_seen: usize,
}

/// `Vec<f64>` (de)serialised as the `u64` bit patterns of its values.
mod f64_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|x| x.to_bits())
            .collect::<Vec<u64>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?
            .into_iter()
            .map(f64::from_bits)
            .collect())
    }
}

impl State {
    /// The checkpoint folder name: `epoch-NNNN` at an epoch's end, `epoch-NNNN-step-SSSSSSSS`
    /// within the next epoch (sorting after `epoch-NNNN` and before `epoch-NNNN+1`).
    pub fn checkpoint_name(&self) -> String {
        if self.epoch_step == 0 {
            format!("epoch-{:04}", self.epoch)
        } else {
            format!("epoch-{:04}-step-{:08}", self.epoch, self.step)
        }
    }
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

/// The file of a checkpoint that lists its other files.
pub const MANIFEST: &str = "manifest.json";

/// A checkpoint's table of contents, written last.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    umae_version: String,
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

fn file_sum(path: &Path) -> Result<FileSum, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        crc32: hasher.finalize(),
    })
}

/// Flush a file or a directory (its entries) to the disk.
fn sync(path: &Path) -> Result<(), String> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {} to disk: {e}", path.display()))
}

fn sync_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync(p),
        _ => sync(Path::new(".")),
    }
}

/// Write checkpoint folder `dir` atomically: `fill` writes its files into `dir.tmp`; then the
/// manifest (sizes and CRC-32 of every file) is added, everything is synced to disk, and the
/// folder is renamed into place.
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
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(&tmp).map_err(|e| format!("cannot list {}: {e}", tmp.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        sync(&path)?;
        files.insert(name, file_sum(&path)?);
    }
    let manifest = Manifest {
        umae_version: env!("CARGO_PKG_VERSION").into(),
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    let path = tmp.join(MANIFEST);
    fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    sync(&path)?;
    sync(&tmp)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("cannot replace {}: {e}", dir.display()))?;
    }
    fs::rename(&tmp, dir).map_err(|e| format!("cannot move {} into place: {e}", dir.display()))?;
    sync_parent(dir)
}

/// Check a checkpoint folder against its manifest: every file present, of the recorded size
/// and CRC-32. The error names the file and what is wrong with it.
pub fn verify(dir: &Path) -> Result<(), String> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| {
        format!(
            "checkpoint {} is incomplete or damaged: cannot read its {MANIFEST} ({e})",
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("checkpoint {} is damaged: {MANIFEST}: {e}", dir.display()))?;
    for (name, want) in &manifest.files {
        let file = dir.join(name);
        let got =
            file_sum(&file).map_err(|e| format!("checkpoint {} is damaged: {e}", dir.display()))?;
        if got.bytes != want.bytes {
            return Err(format!(
                "checkpoint {} is damaged: {name} has {} bytes, {} were written (truncated or overwritten)",
                dir.display(), got.bytes, want.bytes
            ));
        }
        if got.crc32 != want.crc32 {
            return Err(format!(
                "checkpoint {} is damaged: {name} does not match its checksum (CRC-32 {:08x}, written {:08x})",
                dir.display(), got.crc32, want.crc32
            ));
        }
    }
    Ok(())
}

/// Delete the oldest checkpoints of `run_dir` so that the newest `keep` remain (0: keep all).
/// The one `latest` points to is never deleted. A folder is renamed away before it is removed,
/// so an interrupted deletion never leaves a half checkpoint under a checkpoint's name.
pub fn prune(run_dir: &Path, keep: usize) -> Result<(), String> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(run_dir);
    let current = latest_name(run_dir);
    for dir in all.iter().take(all.len().saturating_sub(keep)) {
        if dir.file_name().and_then(|n| n.to_str()) == current.as_deref() {
            continue;
        }
        let doomed = dir.with_extension("deleting");
        fs::rename(dir, &doomed)
            .and_then(|()| fs::remove_dir_all(&doomed))
            .map_err(|e| format!("cannot delete old checkpoint {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Delete the mid-epoch checkpoints written during epoch `completed + 1` (named
/// `epoch-NNNN-step-*` with NNNN = `completed`), once that epoch's own checkpoint exists.
pub fn remove_within_epoch(run_dir: &Path, completed: usize) -> Result<(), String> {
    let prefix = format!("epoch-{completed:04}-step-");
    for dir in list(run_dir) {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) {
            let doomed = dir.with_extension("deleting");
            fs::rename(&dir, &doomed)
                .and_then(|()| fs::remove_dir_all(&doomed))
                .map_err(|e| format!("cannot delete checkpoint {}: {e}", dir.display()))?;
        }
    }
    Ok(())
}

/// The checkpoint folders of a run directory (`epoch-NNNN`), oldest first, without checking
/// their contents.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let dir = run_dir.join("checkpoints");
    let mut out: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_checkpoint_name)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// `epoch-NNNN` or `epoch-NNNN-step-SSSSSSSS`.
fn is_checkpoint_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match name.strip_prefix("epoch-") {
        Some(rest) => match rest.split_once("-step-") {
            Some((e, s)) => digits(e) && digits(s),
            None => digits(rest),
        },
        None => false,
    }
}

fn latest_name(run_dir: &Path) -> Option<String> {
    fs::read_to_string(run_dir.join("checkpoints").join("latest"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Replace a small text file atomically (written, synced, renamed).
pub fn write_file_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    sync(&tmp)?;
    fs::rename(&tmp, path)
        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))?;
    sync_parent(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(run: &Path, name: &str) -> PathBuf {
        let dir = run.join("checkpoints").join(name);
        write_dir_atomic(&dir, |tmp| {
            fs::write(tmp.join("state.json"), name).map_err(|e| e.to_string())?;
            fs::write(tmp.join("model.safetensors"), vec![7u8; 3000]).map_err(|e| e.to_string())
        })
        .unwrap();
        write_file_atomic(&run.join("checkpoints").join("latest"), name).unwrap();
        dir
    }

    #[test]
    fn verify_finds_truncation_corruption_and_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = checkpoint(tmp.path(), "epoch-0001");
        assert!(!tmp.path().join("checkpoints/epoch-0001.tmp").exists());
        verify(&dir).unwrap();
        let model = dir.join("model.safetensors");
        fs::write(&model, vec![7u8; 2999]).unwrap();
        let e = verify(&dir).unwrap_err();
        assert!(
            e.contains("model.safetensors has 2999 bytes, 3000 were written"),
            "{e}"
        );
        let mut bytes = vec![7u8; 3000];
        bytes[1500] = 8;
        fs::write(&model, bytes).unwrap();
        let e = verify(&dir).unwrap_err();
        assert!(e.contains("does not match its checksum"), "{e}");
        fs::remove_file(&model).unwrap();
        let e = verify(&dir).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("model.safetensors"),
            "{e}"
        );
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let e = verify(&dir).unwrap_err();
        assert!(e.contains("incomplete or damaged"), "{e}");
    }

    #[test]
    fn state_round_trips_the_epoch_sums_bit_exactly() {
        // Many arbitrary finite values: serde_json's default float parser reads some of them
        // back one ulp off (a resumed run's epoch metrics differed in the last digit).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let sums: Vec<f64> = (0..10_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f64::from_bits(x >> 2 | 0x3000_0000_0000_0000)
            })
            .filter(|v| v.is_finite())
            .collect();
        let state = State {
            epoch: 3,
            step: 77,
            rng: Rng::derive(1, &[2]),
            umae_version: "x".into(),
            epoch_step: 5,
            epoch_sums: sums.clone(),
            epoch_seen: 160,
        };
        let text = serde_json::to_string(&state).unwrap();
        let back: State = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.epoch_sums), bits(&sums));
    }

    #[test]
    fn prune_keeps_the_newest_and_the_latest() {
        let tmp = tempfile::tempdir().unwrap();
        for e in 1..=5 {
            checkpoint(tmp.path(), &format!("epoch-{e:04}"));
        }
        // Leftovers of interrupted writes and deletions are not checkpoints.
        fs::create_dir_all(tmp.path().join("checkpoints/epoch-0006.tmp")).unwrap();
        fs::create_dir_all(tmp.path().join("checkpoints/epoch-0000.deleting")).unwrap();
        fs::create_dir_all(tmp.path().join("checkpoints/epoch-0001-step-x")).unwrap();
        let names = |run: &Path| -> Vec<String> {
            list(run)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(tmp.path()).len(), 5);
        prune(tmp.path(), 0).unwrap();
        assert_eq!(names(tmp.path()).len(), 5, "0 keeps all");
        prune(tmp.path(), 2).unwrap();
        assert_eq!(names(tmp.path()), ["epoch-0004", "epoch-0005"]);
        // `latest` pointing at an older checkpoint (a resume fell back to it) keeps it.
        write_file_atomic(&tmp.path().join("checkpoints/latest"), "epoch-0004").unwrap();
        checkpoint(tmp.path(), "epoch-0006");
        write_file_atomic(&tmp.path().join("checkpoints/latest"), "epoch-0004").unwrap();
        prune(tmp.path(), 1).unwrap();
        assert_eq!(names(tmp.path()), ["epoch-0004", "epoch-0006"]);
        // Mid-epoch checkpoints of epoch 7 go once it is complete, others stay.
        checkpoint(tmp.path(), "epoch-0006-step-00000100");
        checkpoint(tmp.path(), "epoch-0006-step-00000103");
        checkpoint(tmp.path(), "epoch-0007-step-00000110");
        remove_within_epoch(tmp.path(), 6).unwrap();
        assert_eq!(
            names(tmp.path()),
            ["epoch-0004", "epoch-0006", "epoch-0007-step-00000110"]
        );
    }
}
