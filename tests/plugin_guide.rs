//! The dynamic-plugin guide of docs/plugins.md, followed literally after the normal build:
//! `umae new-plugin NAME -o plugins/NAME` (a member of the workspace through `plugins/*`),
//! `cargo build --release -p NAME`, `umae --plugin ... plugins`, a one-epoch run with it. The
//! plugin build must reuse umae-sdk and everything in it: cargo's JSON messages say which
//! units were fresh.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

const NAME: &str = "guide-check";

/// Removes the crate this test adds to the workspace, and restores Cargo.lock, even when the
/// test fails.
struct Added {
    dir: PathBuf,
    lock: PathBuf,
    lock_text: String,
}

impl Drop for Added {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::write(&self.lock, &self.lock_text);
    }
}

/// The target directory the tests' binary was built in (the plugin must be built in the same).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_umae"))
        .parent()
        .and_then(Path::parent)
        .expect("target/release/umae")
        .to_path_buf()
}

#[test]
fn the_guide_builds_and_loads_a_new_plugin_without_rebuilding_the_sdk() {
    let repo = repo();
    let dir = repo.join("plugins").join(NAME);
    let lock = repo.join("Cargo.lock");
    let _ = std::fs::remove_dir_all(&dir); // left by a killed run of this test
    let _added = Added {
        dir: dir.clone(),
        lock_text: std::fs::read_to_string(&lock).unwrap(),
        lock,
    };
    let rel = format!("plugins/{NAME}");
    let o = run(&["new-plugin", NAME, "--kind", "regularizer", "-o", &rel]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("member of umae's workspace")
            && t.contains(&format!("cargo build --release -p {NAME}")),
        "{t}"
    );
    assert!(!t.contains("warning"), "{t}");
    assert!(
        !dir.join(".cargo").exists(),
        "a member uses the workspace's config"
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .args(["build", "--release", "-p", NAME, "--message-format=json"])
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(&repo)
        .output()
        .expect("cargo runs");
    let messages = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}{}",
        messages,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut fresh = 0;
    let mut rebuilt = Vec::new();
    for line in messages.lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" {
            continue;
        }
        let id = m["package_id"].as_str().unwrap_or_default().to_string();
        if id.contains(&format!("plugins/{NAME}#")) {
            continue;
        }
        if m["fresh"] == true {
            fresh += 1;
        } else {
            rebuilt.push(id);
        }
    }
    assert!(
        rebuilt.is_empty(),
        "building the plugin recompiled {} units it shares with umae, so its libumae_sdk.so is not \
         umae's: {rebuilt:?}. A dependency turned on other features inside umae-sdk; pin them in \
         umae-sdk/Cargo.toml",
        rebuilt.len()
    );
    assert!(fresh > 100, "{fresh} fresh units: umae-sdk and burn");

    let so = target_dir()
        .join("release")
        .join(format!("lib{}.so", NAME.replace('-', "_")));
    let so = so.to_str().unwrap();
    let o = run(&["--plugin", so, "plugins", "--kind", "regularizer"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(NAME), "{}", text(&o));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let reg = format!("regularizers=[(plugin: \"{NAME}\", weight: 0.1, params: ())]");
    let o = run(&[
        "--plugin",
        so,
        "run",
        "recipes/mae-fmnist.ron",
        "--set",
        &reg,
        "--set",
        "data.format=Synthetic",
        "--set",
        "data.synthetic_size=128",
        "--set",
        "data.eval_limit=Some(64)",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.log_every=1",
        "--set",
        "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let steps: Vec<f64> = metrics_rows(&out)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            r[format!("reg.{NAME}")]
                .as_f64()
                .expect("the plugin's term")
        })
        .collect();
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert!(steps.iter().all(|v| v.is_finite()), "{steps:?}");
}
