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
