//! Dynamic plugins through the real binary: the example plugin built as a shared library is
//! loaded, listed, trained with, and compared step by step with the built-in it copies; bad
//! libraries are refused with what to do.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A plugin library built by cargo as a dev-dependency of these tests.
fn built_so(file: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_umae"));
    let dir = bin.parent().unwrap();
    for d in [dir.to_path_buf(), dir.join("deps")] {
        let p = d.join(file);
        if p.exists() {
            return p;
        }
    }
    panic!("{file} not found next to {}", bin.display());
}

/// The example plugin's shared library.
fn example_so() -> PathBuf {
    built_so("libumae_example_dylib.so")
}

fn plugin_args(so: &Path) -> Vec<String> {
    vec!["--plugin".into(), so.to_str().unwrap().into()]
}

#[test]
fn the_example_plugin_is_listed() {
    let so = example_so();
    let mut args = plugin_args(&so);
    args.push("plugins".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for needle in ["stripes", "dyn-uniformity", "Example plugin", "uniformity"] {
        assert!(t.contains(needle), "missing {needle} in\n{t}");
    }
    // Without the plugin they are not there.
    assert!(!text(&run(&["plugins"])).contains("stripes"));
}

fn step_losses(dir: &Path) -> Vec<(f64, f64)> {
    metrics_rows(dir)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            let reg = r
                .as_object()
                .unwrap()
                .iter()
                .find(|(k, _)| k.starts_with("reg."))
                .map(|(_, v)| v.as_f64().unwrap())
                .unwrap();
            (r["loss"].as_f64().unwrap(), reg)
        })
        .collect()
}

const TINY: &[&str] = &[
    "--set",
    "data.train_limit=Some(256)",
    "--set",
    "data.eval_limit=Some(64)",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.log_every=1",
    "--set",
    "train.epochs=1",
    "--set",
    "eval.erank_samples=0",
    "--set",
    "eval.online_probe=false",
    "--set",
    "eval.linear=None",
    "--set",
    "eval.knn=None",
    "--set",
    "encoder.params.depth=Some(2)",
];

#[test]
fn a_dynamic_copy_of_a_builtin_gives_the_same_losses_step_by_step() {
    if !have_fmnist() {
        return;
    }
    let so = example_so();
    let tmp = tempfile::tempdir().unwrap();
    let builtin = tmp.path().join("builtin");
    let mut args = vec![
        "run",
        "recipes/u-mae-fmnist.ron",
        "--output",
        builtin.to_str().unwrap(),
    ];
    args.extend_from_slice(TINY);
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));

    // The same recipe with the regularizer from the library, named in the recipe itself.
    let recipe = tmp.path().join("dyn.ron");
    std::fs::write(
        &recipe,
        format!(
            "Recipe(name: \"dyn\", base: Some(\"{}\"), plugins: [\"{}\"], \
             regularizers: [(plugin: \"dyn-uniformity\", weight: 1e-2, params: (tau: 0.1))])",
            repo().join("recipes/u-mae-fmnist.ron").display(),
            so.display()
        ),
    )
    .unwrap();
    let dynamic = tmp.path().join("dynamic");
    let mut args = vec![
        "run",
        recipe.to_str().unwrap(),
        "--output",
        dynamic.to_str().unwrap(),
    ];
    args.extend_from_slice(TINY);
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("dyn-uniformity"), "{}", text(&o));
    let (a, b) = (step_losses(&builtin), step_losses(&dynamic));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "built-in and dynamic uniformity differ");

    // The plugin's masker trains too.
    let out = tmp.path().join("stripes");
    let mut args = plugin_args(&so);
    args.extend(
        [
            "run",
            "recipes/mae-fmnist.ron",
            "--output",
            out.to_str().unwrap(),
            "--set",
            "masker=(plugin: \"stripes\", params: (ratio: 0.5))",
        ]
        .map(String::from),
    );
    args.extend(TINY.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
}

/// Every kind across the library boundary: a model made only of the `new-plugin` templates,
/// all five loaded from one shared library, trains and lowers its loss.
#[test]
fn a_dynamic_plugin_of_every_kind_trains() {
    let so = built_so("libumae_templates_dylib.so");
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("templates.ron");
    std::fs::write(
        &recipe,
        format!(
            "Recipe(name: \"templates\", base: Some(\"{}\"), plugins: [\"{}\"], \
             data: (format: Synthetic, synthetic_size: 256, eval_limit: Some(64)), \
             masker: (plugin: \"my-plugin\", params: (count: 24)), \
             encoder: (plugin: \"my-plugin\", params: (patch: 4, dim: 32)), \
             decoder: (plugin: \"my-plugin\", params: ()), \
             target: (plugin: \"my-plugin\", params: ()), \
             regularizers: [(plugin: \"my-plugin\", weight: 0.1, params: ())], \
             train: (epochs: 3, batch_size: 32, log_every: 1), \
             eval: (online_probe: false, erank_samples: 0, linear: None, knn: None))",
            repo().join("recipes/mae-fmnist.ron").display(),
            so.display()
        ),
    )
    .unwrap();
    let report = check_json(recipe.to_str().unwrap());
    assert!(report.to_string().contains("my-plugin"), "{report}");
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (target, reg): (Vec<f64>, Vec<f64>) = metrics_rows(&out)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            (
                r["target.my-plugin"].as_f64().unwrap(),
                r["reg.my-plugin"].as_f64().unwrap(),
            )
        })
        .unzip();
    assert_eq!(target.len(), 24);
    assert!(target.iter().chain(&reg).all(|v| v.is_finite()));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&target[20..]) < mean(&target[..4]), "{target:?}");
}

fn refused(so: &Path) -> String {
    let o = run(&["--plugin", so.to_str().unwrap(), "plugins"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    text(&o)
}

#[test]
fn bad_libraries_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing file.
    let t = refused(&tmp.path().join("libnothing.so"));
    assert!(
        t.contains("no such file") && t.contains("libnothing.so"),
        "{t}"
    );
    // A shared library that is not a plugin.
    let not_plugin = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libm");
    let t = refused(&not_plugin);
    assert!(
        t.contains("is not a umae plugin") && t.contains("declare_plugin!"),
        "{t}"
    );
    // A plugin built against another umae-api: the same library with its ABI record edited.
    let mut bytes = std::fs::read(example_so()).unwrap();
    let from = format!("umae-api {}; burn", env!("CARGO_PKG_VERSION"));
    let to = format!(
        "umae-api {}; burn",
        "9".repeat(env!("CARGO_PKG_VERSION").len())
    );
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("ABI record");
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    let other = tmp.path().join("libother_api.so");
    std::fs::write(&other, bytes).unwrap();
    let t = refused(&other);
    assert!(
        t.contains("was built against umae-api 99") && t.contains("rebuild the plugin"),
        "{t}"
    );
    // A plugin built against another build of umae-sdk (other features of burn, say): its
    // record matches, but the hashes in the names of the SDK symbols it needs do not. Made
    // here by changing one hash digit of one such name, everywhere the file holds it.
    let mut bytes = std::fs::read(example_so()).unwrap();
    let other_name = rename_needed_symbol(&mut bytes, b"_ZN8umae_api");
    let other = tmp.path().join("libother_sdk.so");
    std::fs::write(&other, bytes).unwrap();
    let t = refused(&other);
    assert!(
        t.contains("was built against another build of umae-sdk")
            && t.contains(&other_name)
            && t.contains("cargo build --release -p NAME"),
        "{t}"
    );
    // A second copy of the example registers names that are taken.
    let copy = tmp.path().join("libcopy.so");
    std::fs::copy(example_so(), &copy).unwrap();
    let o = run(&[
        "--plugin",
        example_so().to_str().unwrap(),
        "--plugin",
        copy.to_str().unwrap(),
        "plugins",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("already taken") && text(&o).contains("masker `stripes`"),
        "{}",
        text(&o)
    );
}
