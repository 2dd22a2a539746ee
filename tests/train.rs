//! `umae run`, `--resume` and `umae bench` through the real binary on Fashion-MNIST.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const SMALL: &[&str] = &[
    "--set",
    "data.train_limit=Some(640)",
    "--set",
    "data.eval_limit=Some(200)",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.log_every=5",
    "--set",
    "eval.erank_samples=50",
];

fn epoch_rows(dir: &Path) -> Vec<serde_json::Value> {
    metrics_rows(dir)
        .into_iter()
        .filter(|r| r["kind"] == "epoch")
        .collect()
}

fn train(out: &Path, recipe: &str, epochs: usize) -> std::process::Output {
    let mut args = vec!["run", recipe, "--output", out.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let e = format!("train.epochs={epochs}");
    args.extend_from_slice(&["--set", &e]);
    run(&args)
}

#[test]
fn u_mae_trains_writes_metrics_and_checkpoints() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&out, "recipes/u-mae-fmnist.ron", 2);
    assert!(o.status.success(), "{}", text(&o));
    let all = metrics_rows(&out);
    let first = all.iter().find(|r| r["kind"] == "step").unwrap();
    let epochs = epoch_rows(&out);
    assert_eq!(epochs.len(), 2);
    let last = &epochs[1];
    for key in [
        "loss",
        "target.pixels",
        "reg.uniformity",
        "probe.loss",
        "probe.test_acc",
        "erank",
        "images_per_s",
    ] {
        assert!(last[key].is_number(), "{key} missing in {last}");
    }
    let (l0, l1) = (
        first["target.pixels"].as_f64().unwrap(),
        last["target.pixels"].as_f64().unwrap(),
    );
    assert!(l1 < l0, "reconstruction loss did not fall: {l0} -> {l1}");
    let acc = last["probe.test_acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    // The probe learns: its cross-entropy falls below that of a uniform guess, ln(10).
    let ce = last["probe.loss"].as_f64().unwrap();
    assert!(ce < 10f64.ln(), "probe cross-entropy {ce}");
    assert!(all
        .iter()
        .filter(|r| r["kind"] == "step")
        .all(|r| r["lr"].as_f64().unwrap() > 0.0));
    let ck = out.join("checkpoints");
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap().trim(),
        "epoch-0002"
    );
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(ck.join("epoch-0002").join(f).exists(), "{f}");
    }
    assert!(out.join("recipe.ron").exists());

    // A second run into the same directory is refused, and nothing there changes.
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let o = train(&out, "recipes/u-mae-fmnist.ron", 2);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--resume"), "{}", text(&o));
    assert_eq!(before, std::fs::read(out.join("metrics.jsonl")).unwrap());
}

#[test]
fn killed_run_resumes_to_the_same_result() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let o = train(&straight, "recipes/mae-fmnist.ron", 3);
    assert!(o.status.success(), "{}", text(&o));

    let killed = tmp.path().join("killed");
    let mut args = vec![
        "run".to_string(),
        "recipes/mae-fmnist.ron".into(),
        "--output".into(),
        killed.display().to_string(),
    ];
    args.extend(SMALL.iter().map(|s| s.to_string()));
    args.extend(["--set".into(), "train.epochs=3".into()]);
    let mut child = umae()
        .args(&args)
        .current_dir(repo())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pointer = killed.join("checkpoints/latest");
    let t0 = Instant::now();
    while std::fs::read_to_string(&pointer)
        .map(|s| s.trim() != "epoch-0001")
        .unwrap_or(true)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no first checkpoint"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let o = run(&["run", "--resume", killed.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (epoch_rows(&straight), epoch_rows(&killed));
    assert_eq!(b.len(), 3, "{b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        let (lx, ly) = (
            x["target.pixels"].as_f64().unwrap(),
            y["target.pixels"].as_f64().unwrap(),
        );
        assert!(
            (lx - ly).abs() < 1e-4 * lx.abs().max(1.0),
            "epoch {}: {lx} vs {ly}",
            x["epoch"]
        );
    }
    // Step rows are not duplicated by the resumed part.
    let steps: Vec<u64> = metrics_rows(&killed)
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    let mut sorted = steps.clone();
    sorted.dedup();
    assert_eq!(steps, sorted);

    let o = run(&["run", "--resume", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn missing_dataset_says_how_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&[
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        tmp.path().join("r").to_str().unwrap(),
        "--set",
        "data.root=/nonexistent/fashion-mnist",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no IDX files"), "{}", text(&o));
}

#[test]
fn bench_reports_throughput() {
    let o = run(&[
        "bench",
        "recipes/mae-vitt-cifar10.ron",
        "--batch",
        "4",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
    // A step does work on at least one core, and the process cannot use more than it has.
    let cores = v["cores_busy"].as_f64().unwrap();
    let have = std::thread::available_parallelism().unwrap().get() as f64;
    assert!(cores > 0.05 && cores < have + 0.5, "cores busy: {cores}");
    let o = run(&["bench", "recipes/mae-vitt-cifar10.ron", "--device", "cuda"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

#[test]
fn gradient_accumulation_matches_the_full_batch() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let go = |name: &str, batch: &str, accum: &str| {
        let out = tmp.path().join(name);
        let (b, a) = (
            format!("train.batch_size={batch}"),
            format!("train.accum_steps={accum}"),
        );
        let o = run(&[
            "run",
            "recipes/mae-fmnist.ron",
            "--output",
            out.to_str().unwrap(),
            "--set",
            "data.train_limit=Some(256)",
            "--set",
            "eval.online_probe=false",
            "--set",
            "eval.erank_samples=0",
            "--set",
            "train.epochs=2",
            "--set",
            &b,
            "--set",
            &a,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        epoch_rows(&out)
    };
    let full = go("full", "64", "1");
    let accumulated = go("accum", "32", "2");
    for (x, y) in full.iter().zip(&accumulated) {
        assert_eq!(x["step"], y["step"]);
        let (lx, ly) = (
            x["target.pixels"].as_f64().unwrap(),
            y["target.pixels"].as_f64().unwrap(),
        );
        assert!((lx - ly).abs() < 1e-4, "epoch {}: {lx} vs {ly}", x["epoch"]);
    }
}

/// The in-run evaluations (the online probe on the test split, the effective rank) cost the
/// memory of a batch, not of the test split. They run on the training model, and burn keeps the
/// autodiff graph of a forward pass that never runs backward alive unless the parameters are
/// untracked: every test image's activations (about 1.5 MB each here) would stay resident until
/// the next training step, against 512 bytes for its feature. Two runs that differ only in the
/// size of the test split must use the same memory.
#[test]
fn in_run_evaluation_memory_does_not_grow_with_the_test_split() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let peak = |eval_images: usize| -> f64 {
        let out = tmp.path().join(format!("run-{eval_images}"));
        let limit = format!("data.eval_limit=Some({eval_images})");
        let eval = format!(
            "eval=(online_probe: true, erank_samples: {eval_images}, linear: None, knn: None)"
        );
        let o = run(&[
            "run",
            "recipes/u-mae-fmnist.ron",
            "--output",
            out.to_str().unwrap(),
            "--set",
            "data.train_limit=Some(256)",
            "--set",
            &limit,
            "--set",
            "train.batch_size=64",
            "--set",
            "train.epochs=2",
            "--set",
            &eval,
        ]);
        assert!(o.status.success(), "{}", text(&o));
        epoch_rows(&out)
            .iter()
            .map(|r| r["rss_mib"].as_f64().expect("rss_mib in every epoch row"))
            .fold(0.0, f64::max)
    };
    let (small, large) = (peak(100), peak(600));
    // 500 more test images: 0.25 MB more features; retained activations would add ~0.7 GB.
    assert!(
        large - small < 64.0,
        "resident memory {small:.0} MiB with 100 test images, {large:.0} MiB with 600"
    );
}
