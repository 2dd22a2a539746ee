//! Checks before training through the real binary: an existing run is never overwritten without
//! `--force` (which replaces only what a run writes), a bad output path or dataset is refused
//! before anything is written.

mod common;
use common::*;
use std::path::Path;

fn train(out: &Path, epochs: usize, extra: &[&str]) -> std::process::Output {
    let e = format!("train.epochs={epochs}");
    let mut a = vec![
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        out.to_str().unwrap(),
    ];
    for s in [
        "data.format=Synthetic",
        "data.synthetic_size=64",
        "data.eval_limit=Some(32)",
        "train.batch_size=32",
        "encoder.params.depth=Some(1)",
        "encoder.params.dim=Some(32)",
        "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)",
        &e,
    ] {
        a.extend(["--set", s]);
    }
    a.extend_from_slice(extra);
    run(&a)
}

#[test]
fn an_existing_run_is_replaced_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let o = train(&dir, 2, &[]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();

    let o = train(&dir, 1, &[]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an occupied run directory is bad input: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("already holds a run") && text(&o).contains("--force"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);

    let o = train(&dir, 1, &["--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let ckpts: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("epoch-"))
        .collect();
    assert_eq!(ckpts, ["epoch-0001"], "the old run's epoch 2 is gone");
    let epochs = metrics_rows(&dir)
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .count();
    assert_eq!(epochs, 1);
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );

    let o = run(&["run", "--resume", dir.to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(2), "--force and --resume conflict");
}

#[test]
fn bad_outputs_and_datasets_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "keep").unwrap();
    let o = train(&file, 1, &[]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an --output that is a file is bad input: {}",
        text(&o)
    );
    assert!(
        text(&o).contains("is a file, not a directory"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

    let o = train(&file.join("run"), 1, &[]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an --output under a file is bad input: {}",
        text(&o)
    );
    assert!(text(&o).contains("a-file"), "{}", text(&o));

    let dir = tmp.path().join("never");
    let o = run(&[
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        dir.to_str().unwrap(),
        "--set",
        "data.root=/nonexistent/fashion-mnist",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a missing data root is bad input: {}",
        text(&o)
    );
    assert!(
        !dir.exists(),
        "no run directory for a dataset that does not open"
    );
}
