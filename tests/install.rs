//! `scripts/install.sh PREFIX`: the installed launcher runs its own copies of the program and
//! the SDK (in `PREFIX/lib`), runs the installed recipes, and loads a plugin from the build
//! tree.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

#[test]
fn the_installed_umae_runs_recipes_and_loads_plugins() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("opt umae"); // a space, as in real paths
    let target = Path::new(env!("CARGO_BIN_EXE_umae"))
        .parent()
        .and_then(Path::parent)
        .unwrap();
    let o = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg(&prefix)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "bin/umae",
        "lib/libumae.so",
        "lib/libumae_sdk.so",
        "share/umae/recipes/u-mae-fmnist.ron",
    ] {
        assert!(prefix.join(f).is_file(), "{f} installed");
    }
    let umae = prefix.join("bin/umae");
    let plugin = target.join("release/libumae_example_dylib.so");
    let plugin = if plugin.exists() {
        plugin
    } else {
        target.join("release/deps/libumae_example_dylib.so")
    };
    // Run from elsewhere, with the loader's log: the SDK comes from PREFIX/lib.
    let o = Command::new(&umae)
        .args([
            "--plugin",
            plugin.to_str().unwrap(),
            "plugins",
            "--kind",
            "masker",
        ])
        .env("LD_DEBUG", "libs")
        .env_remove("LD_LIBRARY_PATH") // cargo sets it for tests; a user's shell does not
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("stripes"), "the example plugin's masker: {t}");
    for lib in ["libumae_sdk.so", "libumae.so"] {
        let path = prefix.join("bin/../lib").join(lib);
        assert!(
            t.contains(&format!("init: {}", path.display())),
            "{lib} loaded from {}: {}",
            path.display(),
            &t[..t.len().min(4000)]
        );
    }

    let out = tmp.path().join("run");
    let o = Command::new(&umae)
        .args([
            "run",
            prefix
                .join("share/umae/recipes/u-mae-fmnist.ron")
                .to_str()
                .unwrap(),
            "--set",
            "data.format=Synthetic",
            "--set",
            "data.synthetic_size=64",
            "--set",
            "data.eval_limit=Some(32)",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=32",
            "--set",
            "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)",
            "--output",
            out.to_str().unwrap(),
        ])
        .env_remove("LD_LIBRARY_PATH")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.join("metrics.jsonl").is_file());
}
