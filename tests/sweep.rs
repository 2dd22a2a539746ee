//! `umae sweep` through the real binary, on a tiny grid of synthetic runs: every cell trains
//! with its own seed and override, the summary is the mean and sample std of the cells' own
//! numbers, a second call skips finished cells, an interrupted sweep resumes its cells, and bad
//! grids or failing cells are reported.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

fn tiny(epochs: usize) -> Vec<String> {
    [
        "data.format=Synthetic".to_string(),
        "data.synthetic_size=128".into(),
        "data.eval_limit=Some(64)".into(),
        "train.batch_size=32".into(),
        format!("train.epochs={epochs}"),
        "encoder.params.depth=Some(1)".into(),
        "encoder.params.dim=Some(32)".into(),
        "eval=(online_probe: true, erank_samples: 32, linear: Some((optimizer: Lbfgs, max_iter: 30)), knn: Some(()))".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn sweep_args(out: &Path, grid: &[&str], seeds: usize, jobs: usize, epochs: usize) -> Vec<String> {
    let mut a: Vec<String> = ["sweep", "recipes/u-mae-fmnist.ron", "--output"]
        .map(String::from)
        .to_vec();
    a.push(out.display().to_string());
    for g in grid {
        a.extend(["--grid".into(), g.to_string()]);
    }
    a.extend([
        "--seeds".into(),
        seeds.to_string(),
        "--jobs".into(),
        jobs.to_string(),
    ]);
    a.extend(tiny(epochs));
    a
}

fn umae_run(args: &[String]) -> Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn cell_dirs(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

/// The last epoch row's and the eval row's value of `key` in a cell.
fn final_value(dir: &Path, key: &str) -> f64 {
    let rows = metrics_rows(dir);
    let kind = if key.contains("top1") {
        "eval"
    } else {
        "epoch"
    };
    rows.iter()
        .rev()
        .find(|r| r["kind"] == kind)
        .and_then(|r| r[key].as_f64())
        .unwrap_or_else(|| panic!("{}: no {key}", dir.display()))
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
    (m, v.sqrt())
}

#[test]
fn a_grid_with_seeds_trains_every_cell_and_summarises_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sw");
    let args = sweep_args(&out, &["regularizers.0.weight=0,0.5"], 2, 2, 2);
    let o = umae_run(&args);
    assert!(o.status.success(), "{}", text(&o));

    let cells = cell_dirs(&out);
    let names: Vec<String> = cells
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "00-regularizers.0.weight=0-seed0",
            "00-regularizers.0.weight=0-seed1",
            "01-regularizers.0.weight=0.5-seed0",
            "01-regularizers.0.weight=0.5-seed1",
        ]
    );
    for c in &cells {
        assert!(c.join("done").exists(), "{}", c.display());
        let recipe = std::fs::read_to_string(c.join("recipe.ron")).unwrap();
        let seed = if c.to_string_lossy().ends_with("seed1") {
            1
        } else {
            0
        };
        assert!(recipe.contains(&format!("seed: {seed}")), "{recipe}");
    }
    // The override and the seed reached the runs: two seeds of one cell train differently,
    // and so do the two weights of the uniformity term.
    assert!(std::fs::read_to_string(cells[2].join("recipe.ron"))
        .unwrap()
        .contains("weight: 0.5"));
    let loss = |c: &Path| final_value(c, "target.pixels");
    assert_ne!(
        loss(&cells[0]),
        loss(&cells[1]),
        "seeds 0 and 1 trained alike"
    );
    assert_ne!(
        loss(&cells[0]),
        loss(&cells[2]),
        "weight 0 and 0.5 trained alike"
    );

    // summary.csv: the mean and sample std of the cells' own final numbers.
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let head: Vec<&str> = lines[0].split(',').collect();
    let col = |name: &str| {
        head.iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("{name} in {csv}"))
    };
    for (row, pair) in lines[1..].iter().zip(cells.chunks(2)) {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!(f[col("seeds")], "2");
        assert_eq!(f[col("finished")], "2");
        for key in [
            "target.pixels",
            "erank",
            "probe.test_acc",
            "linear.top1",
            "knn.top1",
        ] {
            let xs: Vec<f64> = pair.iter().map(|c| final_value(c, key)).collect();
            let (m, s) = mean_std(&xs);
            let got_m: f64 = f[col(&format!("{key}_mean"))].parse().unwrap();
            let got_s: f64 = f[col(&format!("{key}_std"))].parse().unwrap();
            assert!((got_m - m).abs() < 1e-12, "{key}: mean {got_m} vs {m}");
            assert!((got_s - s).abs() < 1e-12, "{key}: std {got_s} vs {s}");
            assert_eq!(f[col(&format!("{key}_n"))], "2");
        }
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| `regularizers.0.weight` | seeds |"), "{md}");
    assert!(md.contains("| `0.5` | 2 |") && md.contains(" ± "), "{md}");
    let png = std::fs::read(out.join("sweep-regularizers.0.weight.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );

    // Again: nothing is retrained, nothing changes in the cells.
    let before: Vec<Vec<u8>> = cells
        .iter()
        .map(|c| std::fs::read(c.join("metrics.jsonl")).unwrap())
        .collect();
    let o = umae_run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("4 cells (0 trained now, 4 already finished)"),
        "{}",
        text(&o)
    );
    for (c, b) in cells.iter().zip(&before) {
        assert_eq!(&std::fs::read(c.join("metrics.jsonl")).unwrap(), b);
    }

    // Another grid in the same folder is refused, and nothing there changes.
    let other = sweep_args(&out, &["regularizers.0.weight=0,0.1"], 2, 2, 2);
    let o = umae_run(&other);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("holds another sweep"), "{}", text(&o));
    assert_eq!(cell_dirs(&out).len(), 4);
}

#[test]
fn an_interrupted_sweep_resumes_its_cell_from_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sw");
    // Long enough (about 10 s) that the stop lands inside training.
    let mut args = sweep_args(&out, &[], 1, 1, 40);
    args.extend(["--set".into(), "data.synthetic_size=256".into()]);
    let mut child = umae()
        .args(&args)
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cell = out.join("00-seed0");
    let first = cell.join("checkpoints/epoch-0001/model.safetensors");
    let t0 = Instant::now();
    while !first.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGINT to the sweep alone (as a terminal's Ctrl-C would reach it): the cell gets one
    // SIGTERM, checkpoints and stops.
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(
        text(&o).contains("continue with the same command"),
        "{}",
        text(&o)
    );
    assert!(!cell.join("done").exists());
    let epochs_before = metrics_rows(&cell)
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .count();
    assert!(epochs_before < 40, "stopped after {epochs_before} epochs");

    let o = umae_run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(cell.join("done").exists());
    // Resumed, not restarted: every epoch once, in order, and one final evaluation.
    let rows = metrics_rows(&cell);
    let epochs: Vec<u64> = rows
        .iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| r["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, (1..=40).collect::<Vec<u64>>());
    assert_eq!(rows.iter().filter(|r| r["kind"] == "eval").count(), 1);
    let log = std::fs::read_to_string(cell.join("sweep.log")).unwrap();
    assert!(log.contains("resum"), "{log}");
}

#[test]
fn bad_grids_are_refused_before_anything_runs_and_failed_cells_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sw");
    for (grid, needle) in [
        ("train.epochs", "expected PATH=V1,V2"),
        ("train.epochs=1,,2", "value 2 is empty"),
        ("trian.epochs=1,2", "did you mean `train`"),
        ("seed=1,2", "--seeds"),
    ] {
        let o = umae_run(&sweep_args(&out, &[grid], 1, 1, 1));
        assert_eq!(o.status.code(), Some(2), "{grid}: {}", text(&o));
        assert!(text(&o).contains(needle), "{grid}: {}", text(&o));
        assert!(!out.exists(), "{grid}: wrote {}", out.display());
    }
    let o = umae_run(&sweep_args(&out, &[], 0, 1, 1));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // A cell that cannot train (a batch larger than the data) fails alone; the other finishes
    // and is summarised.
    let o = umae_run(&sweep_args(&out, &["train.batch_size=32,4096"], 1, 1, 1));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("1 of 2 cells failed") && t.contains("01-train.batch_size=4096-seed0"),
        "{t}"
    );
    assert!(t.contains("fewer than one effective batch"), "{t}");
    assert!(out.join("00-train.batch_size=32-seed0/done").exists());
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| `4096` | 0 of 1 |"), "{md}");
}

/// `regularizers.0.weight=0` in a U-MAE sweep is MAE itself: the same weights bit for bit as
/// `recipes/mae-fmnist.ron`, so the zero cell of a lambda grid is the MAE baseline.
#[test]
fn a_zero_uniformity_weight_trains_exactly_mae() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |recipe: &str, name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut a: Vec<String> = vec!["run".into(), recipe.into(), "--output".into()];
        a.push(out.display().to_string());
        a.extend(tiny(2));
        a.extend(extra.iter().map(|s| s.to_string()));
        let o = umae_run(&a);
        assert!(o.status.success(), "{}", text(&o));
        std::fs::read(out.join("checkpoints/epoch-0002/model.safetensors")).unwrap()
    };
    let mae = train("recipes/mae-fmnist.ron", "mae", &[]);
    let zero = train(
        "recipes/u-mae-fmnist.ron",
        "zero",
        &["--set", "regularizers.0.weight=0"],
    );
    let some = train("recipes/u-mae-fmnist.ron", "some", &[]);
    assert!(mae == zero, "weight 0 differs from MAE");
    assert!(mae != some, "the uniformity term changed nothing");
}

/// The cells run the sweep's own binary even when the file it was started from is replaced or
/// removed meanwhile (as `cargo build` does to target/release/umae).
#[test]
fn cells_keep_running_the_sweeps_binary_when_the_file_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    // The launcher with the program and the SDK it loads from beside itself.
    let release = Path::new(env!("CARGO_BIN_EXE_umae")).parent().unwrap();
    for f in ["umae", "libumae.so", "libumae_sdk.so"] {
        std::fs::copy(release.join(f), tmp.path().join(f)).unwrap();
    }
    let exe = tmp.path().join("umae");
    let out = tmp.path().join("sw");
    let mut args = sweep_args(&out, &["train.epochs=40,2"], 1, 1, 40);
    args.extend(["--set".into(), "data.synthetic_size=256".into()]);
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = out.join("00-train.epochs=40-seed0/checkpoints/epoch-0001/model.safetensors");
    let t0 = Instant::now();
    while !first.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_file(&exe).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("01-train.epochs=2-seed0/done").exists());
}
