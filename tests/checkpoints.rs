//! Checkpoint integrity through the real binary: every checkpoint carries its recipe and a
//! manifest of checksums, only the newest `train.keep_checkpoints` are kept, a damaged
//! checkpoint is refused with the reason, and `--resume` falls back to the one before it.

mod common;
use common::*;
use std::path::Path;

fn tiny(epochs: usize) -> Vec<String> {
    [
        "data.format=Synthetic".to_string(),
        "data.synthetic_size=128".into(),
        "data.eval_limit=Some(32)".into(),
        "train.batch_size=32".into(),
        format!("train.epochs={epochs}"),
        "train.keep_checkpoints=2".into(),
        "encoder.params.depth=Some(1)".into(),
        "encoder.params.dim=Some(32)".into(),
        "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn train(out: &Path, epochs: usize) -> std::process::Output {
    let mut args: Vec<String> = ["run", "recipes/mae-fmnist.ron", "--output"]
        .map(String::from)
        .to_vec();
    args.push(out.to_str().unwrap().into());
    args.extend(tiny(epochs));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

fn epoch_losses(dir: &Path) -> Vec<f64> {
    metrics_rows(dir)
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| r["target.pixels"].as_f64().unwrap())
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_checkpoints_are_refused_and_resume_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let o = train(&run_dir, 3);
    assert!(o.status.success(), "{}", text(&o));
    // Only the newest two checkpoints are kept, each with its recipe and manifest.
    assert_eq!(names(&run_dir), ["epoch-0002", "epoch-0003", "latest"]);
    for c in ["epoch-0002", "epoch-0003"] {
        let dir = run_dir.join("checkpoints").join(c);
        for f in [
            "manifest.json",
            "recipe.ron",
            "state.json",
            "model.safetensors",
        ] {
            assert!(dir.join(f).is_file(), "{c}/{f}");
        }
    }
    let straight = epoch_losses(&run_dir);
    assert_eq!(straight.len(), 3);

    // Truncate the newest checkpoint's weights.
    let model = run_dir.join("checkpoints/epoch-0003/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("encoder.safetensors");
    let o = run(&[
        "export",
        run_dir.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("epoch-0003 is damaged: model.safetensors has"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());

    // Resuming uses epoch 2 and trains epoch 3 again, to the same loss.
    let o = run(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("trying the checkpoint before it")
            && text(&o).contains("from epoch-0002"),
        "{}",
        text(&o)
    );
    let resumed = epoch_losses(&run_dir);
    assert_eq!(
        resumed.len(),
        3,
        "metrics of epoch 3 replaced, not repeated"
    );
    assert!((resumed[2] - straight[2]).abs() <= 1e-6 * straight[2].abs());

    // A flipped byte is found by the checksum; with no good checkpoint left, resume refuses.
    for c in ["epoch-0002", "epoch-0003"] {
        let f = run_dir
            .join("checkpoints")
            .join(c)
            .join("optimizer.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&f, bytes).unwrap();
    }
    let o = run(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no checkpoint of")
            && text(&o).contains("optimizer.safetensors does not match its checksum"),
        "{}",
        text(&o)
    );
}

/// A run stopped during its final evaluation (after the last checkpoint) resumes into that
/// evaluation alone: the metrics gain the missing row, the weights stay as they were.
#[test]
fn resuming_after_the_last_checkpoint_runs_a_missing_final_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut args: Vec<String> = ["run", "recipes/mae-fmnist.ron", "--output"]
        .map(String::from)
        .to_vec();
    args.push(out.to_str().unwrap().into());
    args.extend(tiny(2));
    args.extend([
        "--set".into(),
        "eval=(online_probe: false, erank_samples: 0, linear: Some((optimizer: Lbfgs, max_iter: 20)), knn: Some(()))".into(),
    ]);
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", text(&o));
    let metrics = out.join("metrics.jsonl");
    let full = std::fs::read_to_string(&metrics).unwrap();
    let eval_row = full
        .lines()
        .find(|l| l.contains("\"kind\":\"eval\""))
        .expect("an eval row")
        .to_string();
    let weights = std::fs::read(out.join("checkpoints/epoch-0002/model.safetensors")).unwrap();
    // As if killed during the evaluation: everything but its row.
    let without: String = full
        .lines()
        .filter(|l| !l.contains("\"kind\":\"eval\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&metrics, without).unwrap();
    let o = run(&["run", "--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("final evaluation is missing"),
        "{}",
        text(&o)
    );
    let rows: Vec<serde_json::Value> = metrics_rows(&out)
        .into_iter()
        .filter(|r| r["kind"] == "eval")
        .collect();
    assert_eq!(rows.len(), 1);
    let old: serde_json::Value = serde_json::from_str(&eval_row).unwrap();
    assert_eq!(rows[0]["linear.top1"], old["linear.top1"]);
    assert_eq!(rows[0]["knn.top1"], old["knn.top1"]);
    assert_eq!(
        std::fs::read(out.join("checkpoints/epoch-0002/model.safetensors")).unwrap(),
        weights
    );
    // Nothing is missing now: a second resume adds nothing.
    let o = run(&["run", "--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        metrics_rows(&out)
            .iter()
            .filter(|r| r["kind"] == "eval")
            .count(),
        1
    );
}
