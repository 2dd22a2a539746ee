//! The user's own binary `my-umae` is umae plus this crate's components: listed, checked,
//! refused with the plugin's own message, and trained with, through the real binary.

use std::path::{Path, PathBuf};
use std::process::Output;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn my_umae(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_my-umae"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("my-umae runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn lists_its_own_components_beside_the_builtins() {
    let o = my_umae(&["plugins"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for name in [
        "center",
        "batch-std",
        "Example static plugin",
        "vit",
        "uniformity",
        "block",
    ] {
        assert!(t.contains(name), "missing {name} in\n{t}");
    }
}

const PARTS: &str = "masker=(plugin: \"center\", params: (side: 3))";
const REG: &str = "regularizers=[(plugin: \"batch-std\", weight: 0.1, params: (floor: 1.0))]";

#[test]
fn checks_recipes_and_refuses_bad_parameters() {
    let o = my_umae(&[
        "check",
        "recipes/mae-fmnist.ron",
        "--set",
        PARTS,
        "--set",
        REG,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = my_umae(&[
        "check",
        "recipes/mae-fmnist.ron",
        "--set",
        "masker=(plugin: \"center\", params: (side: 9))",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("side 9 does not fit the 4x4 patch grid"),
        "{}",
        text(&o)
    );
}

#[test]
fn trains_with_its_components() {
    if !Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() {
        eprintln!("SKIPPED: Fashion-MNIST missing; install it with `apt-get install -y dataset-fashion-mnist`");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = my_umae(&[
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        out.to_str().unwrap(),
        "--set",
        PARTS,
        "--set",
        REG,
        "--set",
        "data.train_limit=Some(512)",
        "--set",
        "data.eval_limit=Some(64)",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.log_every=2",
        "--set",
        "train.epochs=2",
        "--set",
        "eval.erank_samples=0",
        "--set",
        "eval.linear=None",
        "--set",
        "eval.knn=None",
        "--set",
        "encoder.params.depth=Some(2)",
        "--set",
        "encoder.params.dim=Some(64)",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["kind"] == "step")
        .collect();
    assert!(rows.len() >= 8, "{rows:?}");
    let series = |key: &str| -> Vec<f64> {
        rows.iter()
            .map(|r| r[key].as_f64().unwrap_or_else(|| panic!("{key} in {r}")))
            .collect()
    };
    let (pixels, reg) = (series("target.pixels"), series("reg.batch-std"));
    assert!(pixels.iter().chain(&reg).all(|v| v.is_finite()));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&pixels[pixels.len() - 2..]) < mean(&pixels[..2]),
        "the reconstruction loss did not fall: {pixels:?}"
    );
}
