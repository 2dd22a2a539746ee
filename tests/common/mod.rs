#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn umae() -> Command {
    Command::new(env!("CARGO_BIN_EXE_umae"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(args: &[&str]) -> Output {
    umae()
        .args(args)
        .current_dir(repo())
        .output()
        .expect("umae runs")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST is installed by `.ci/run`; a developer machine without it skips loudly.
pub fn have_fmnist() -> bool {
    let ok = Path::new(FMNIST)
        .join("train-images-idx3-ubyte.gz")
        .exists();
    if !ok {
        eprintln!("SKIPPED: Fashion-MNIST missing; install it with `apt-get install -y dataset-fashion-mnist`");
    }
    ok
}

/// `umae check RECIPE --json`, which must succeed.
pub fn check_json(recipe: &str) -> serde_json::Value {
    let o = run(&["check", recipe, "--json"]);
    assert!(o.status.success(), "{recipe}: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("json report")
}

/// Every row of a run's `metrics.jsonl`.
pub fn metrics_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A finished run's weights at checkpoint `name` and its epoch rows without the measurements of
/// the process (timings, resident memory): what must match between an uninterrupted run and one
/// stopped and resumed.
#[allow(dead_code)]
pub fn outcome(dir: &Path, name: &str) -> (Vec<u8>, Vec<String>) {
    let weights =
        std::fs::read(dir.join("checkpoints").join(name).join("model.safetensors")).unwrap();
    let rows = metrics_rows(dir)
        .into_iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("images_per_s");
            o.remove("rss_mib");
            r.to_string()
        })
        .collect();
    (weights, rows)
}
