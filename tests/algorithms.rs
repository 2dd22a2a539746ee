//! The algorithm families as recipes: SimMIM, BEiT-style and their U- variants, mixing parts
//! across families, and the new plugins through the real binary.

mod common;
use common::*;
use std::path::Path;

use umae_api::recipe::Recipe;

#[test]
fn simmim_and_beit_vit_b_have_their_known_sizes() {
    // ViT-B/16 encoder with a mask token: 85,647,360 + 768.
    let encoder = 85_647_360 + 768;
    for recipe in ["recipes/simmim-vitb.ron", "recipes/u-simmim-vitb.ron"] {
        let v = check_json(recipe);
        assert_eq!(v["encoder"][1], encoder, "{recipe}: {v}");
        // Linear decoder: 768 x 768 weights + 768 biases (16 x 16 x 3 pixels per patch).
        assert_eq!(v["decoder"][1], 768 * 768 + 768, "{recipe}: {v}");
        assert_eq!(v["target"][1], 768);
    }
    for recipe in ["recipes/beit-vitb.ron", "recipes/u-beit-vitb.ron"] {
        let v = check_json(recipe);
        assert_eq!(v["encoder"][1], encoder, "{recipe}: {v}");
        // Token head: LayerNorm (2 x 768) + linear 768 -> 8192 with bias.
        assert_eq!(
            v["decoder"][1],
            2 * 768 + 768 * 8192 + 8192,
            "{recipe}: {v}"
        );
        assert_eq!(v["target"][1], 8192);
    }
    // Fashion-MNIST versions: 128-d, 4 blocks, 49 values per patch, 256 tokens.
    let fm = check_json("recipes/simmim-fmnist.ron");
    assert_eq!(fm["decoder"][1], 128 * 49 + 49);
    let fm = check_json("recipes/beit-fmnist.ron");
    assert_eq!(fm["decoder"][1], 2 * 128 + 128 * 256 + 256);
    assert_eq!(
        fm["encoder"][1].as_u64().unwrap(),
        check_json("recipes/mae-fmnist.ron")["encoder"][1]
            .as_u64()
            .unwrap()
            + 128,
        "the MaskToken encoder adds exactly its mask token"
    );
}

#[test]
fn each_u_recipe_differs_from_its_base_by_the_regularizer_only() {
    // Every shipped `u-NAME.ron` against `NAME.ron`.
    let mut pairs: Vec<(String, String)> = std::fs::read_dir(repo().join("recipes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|f| {
            let stem = f.strip_suffix(".ron")?.to_string();
            Some((stem.strip_prefix("u-")?.to_string(), stem))
        })
        .collect();
    pairs.sort();
    assert_eq!(pairs.len(), 7, "{pairs:?}");
    for (base, u) in &pairs {
        let load = |n: &str| Recipe::load(&repo().join(format!("recipes/{n}.ron")), &[]).unwrap();
        let (b, mut r) = (load(base), load(u));
        assert!(b.regularizers.is_empty(), "{base} has regularizers");
        assert_eq!(r.regularizers.len(), 1, "{u}");
        assert_eq!(r.regularizers[0].component.plugin, "uniformity", "{u}");
        for field in ["name", "regularizers"] {
            let node = b.tree.get(field).unwrap().clone();
            r.tree.set_path(&[field], node).unwrap();
        }
        assert_eq!(
            r.tree.to_ron(),
            b.tree.to_ron(),
            "{u} differs from {base} beyond its regularizer"
        );
    }
}

fn write_recipe(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(format!("{name}.ron"));
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

/// A Fashion-MNIST recipe with these components, on top of mae-fmnist.
fn mixed(dir: &Path, name: &str, parts: &str) -> String {
    let base = repo().join("recipes/mae-fmnist.ron");
    write_recipe(
        dir,
        name,
        &format!(
            "Recipe(name: \"{name}\", base: Some(\"{}\"), {parts})",
            base.display()
        ),
    )
}

#[test]
fn incompatible_parts_are_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    // SimMIM's linear decoder on MAE's drop-mode encoder.
    let r = mixed(
        tmp.path(),
        "bad",
        "decoder: (plugin: \"linear\", params: ())",
    );
    let o = run(&["check", &r]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("decoder `linear`") && t.contains("encoder `vit`"),
        "{t}"
    );
    assert!(t.contains("mask_mode: MaskToken"), "{t}");
    // The token head as well.
    let r = mixed(
        tmp.path(),
        "bad2",
        "decoder: (plugin: \"token-head\", params: ())",
    );
    let t = text(&run(&["check", &r]));
    assert!(
        t.contains("decoder `token-head`") && t.contains("encoder `vit`"),
        "{t}"
    );
    // SimMIM cells that do not fit the encoder's patches.
    let r = mixed(
        tmp.path(),
        "bad3",
        "masker: (plugin: \"block\", params: (mask_patch_size: 6))",
    );
    let o = run(&["check", &r]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("masker `block`") && text(&o).contains("patch size 7"),
        "{}",
        text(&o)
    );
    // BEiT counts larger than the grid.
    let r = mixed(
        tmp.path(),
        "bad4",
        "masker: (plugin: \"blockwise\", params: (count: 75))",
    );
    let t = text(&run(&["check", &r]));
    assert!(
        t.contains("masker `blockwise`") && t.contains("16 patches"),
        "{t}"
    );
    // A codebook file that is not there.
    let r = mixed(
        tmp.path(),
        "bad5",
        "target: (plugin: \"tokens\", params: (tokenizer: Checkpoint, path: Some(\"/nonexistent/tok.safetensors\")))",
    );
    let o = run(&["check", &r]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("/nonexistent/tok.safetensors"),
        "{}",
        text(&o)
    );
}

const TINY: &[&str] = &[
    "--set",
    "data.train_limit=Some(512)",
    "--set",
    "data.eval_limit=Some(128)",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.log_every=2",
    "--set",
    "train.epochs=2",
    "--set",
    "eval.erank_samples=32",
    "--set",
    "eval.linear=None",
    "--set",
    "eval.knn=None",
    "--set",
    "encoder.params.depth=Some(2)",
    "--set",
    "encoder.params.dim=Some(64)",
];

fn step_losses(dir: &Path, key: &str) -> Vec<f64> {
    metrics_rows(dir)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r[key].as_f64().unwrap_or_else(|| panic!("{key} in {r}")))
        .collect()
}

/// Train a recipe briefly; the target loss of the last logged steps is below the first ones.
fn trains_and_lowers(recipe: &str, out: &Path, key: &str) {
    let mut args = vec!["run", recipe, "--output", out.to_str().unwrap()];
    args.extend_from_slice(TINY);
    let o = run(&args);
    assert!(o.status.success(), "{recipe}: {}", text(&o));
    let l = step_losses(out, key);
    assert!(l.len() >= 6, "{recipe}: {l:?}");
    let head: f64 = l[..2].iter().sum::<f64>() / 2.0;
    let tail: f64 = l[l.len() - 2..].iter().sum::<f64>() / 2.0;
    assert!(tail < head, "{recipe}: {key} did not fall: {l:?}");
    assert!(l.iter().all(|v| v.is_finite()), "{recipe}: {l:?}");
}

#[test]
fn fashion_mnist_recipes_of_each_family_lower_their_loss() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for (recipe, key) in [
        ("recipes/simmim-fmnist.ron", "target.pixels"),
        ("recipes/u-simmim-fmnist.ron", "target.pixels"),
        ("recipes/beit-fmnist.ron", "target.tokens"),
        ("recipes/u-beit-fmnist.ron", "target.tokens"),
    ] {
        let name = Path::new(recipe).file_stem().unwrap().to_str().unwrap();
        trains_and_lowers(recipe, &tmp.path().join(name), key);
    }
    // The BEiT-style run fitted its codebook beside the run, and a second run reusing it
    // through the Checkpoint tokenizer sees the same tokens: the same first loss.
    let book = tmp.path().join("beit-fmnist/tokenizer.safetensors");
    assert!(book.exists());
    let r = mixed(
        tmp.path(),
        "from-file",
        &format!(
            "masker: (plugin: \"blockwise\", params: (count: 6, min_block: 2)), \
             encoder: (plugin: \"vit\", params: (dim: Some(128), depth: Some(4), heads: Some(4), patch: 7, mask_mode: MaskToken)), \
             decoder: (plugin: \"token-head\", params: ()), \
             target: (plugin: \"tokens\", params: (tokenizer: Checkpoint, path: Some(\"{}\")))",
            book.display()
        ),
    );
    let out = tmp.path().join("from-file-run");
    let mut args = vec!["run", r.as_str(), "--output", out.to_str().unwrap()];
    args.extend_from_slice(TINY);
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        step_losses(&out, "target.tokens")[0],
        step_losses(&tmp.path().join("beit-fmnist"), "target.tokens")[0],
        "a codebook loaded from the file gives the same tokens as the fitted one"
    );
}

#[test]
fn parts_mix_across_families() {
    if !have_fmnist() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // MAE masking and decoder with a token target; SimMIM masking + mask-token encoder with the
    // MAE decoder and a HOG target; several regularizers at once.
    let cases = [
        (
            "mae-tokens",
            "target: (plugin: \"tokens\", params: (tokenizer: RandomProjection, vocab: Some(64)))",
            "target.tokens",
        ),
        (
            "simmim-mae-decoder-hog",
            "masker: (plugin: \"block\", params: (ratio: 0.6, mask_patch_size: 4)), \
             encoder: (plugin: \"vit\", params: (dim: Some(128), depth: Some(4), heads: Some(4), patch: 4, mask_mode: MaskToken)), \
             target: (plugin: \"hog\", params: (cell: 4))",
            "target.hog",
        ),
        (
            "mae-all-regularizers",
            "regularizers: [\
               (plugin: \"uniformity\", weight: 1e-2, params: ()), \
               (plugin: \"gaussian-uniformity\", weight: 0.1, params: (t: 2.0)), \
               (plugin: \"variance-covariance\", weight: 1e-3, params: ()), \
               (plugin: \"decorrelation\", weight: 0.1, params: (feature: Mean))]",
            "target.pixels",
        ),
    ];
    for (name, parts, key) in cases {
        let r = mixed(tmp.path(), name, parts);
        trains_and_lowers(&r, &tmp.path().join(format!("{name}-run")), key);
    }
    let out = tmp.path().join("mae-all-regularizers-run");
    for reg in [
        "reg.uniformity",
        "reg.gaussian-uniformity",
        "reg.variance-covariance",
        "reg.decorrelation",
    ] {
        assert!(
            step_losses(&out, reg).iter().all(|v| v.is_finite()),
            "{reg}"
        );
    }
}

#[test]
fn plugins_lists_the_new_families() {
    let o = run(&["plugins"]);
    assert!(o.status.success());
    let t = text(&o);
    for needle in [
        "block",
        "mask_patch_size",
        "blockwise",
        "min_block",
        "linear",
        "token-head",
        "tokens",
        "KMeans",
        "hog",
        "gaussian-uniformity",
        "Wang & Isola",
        "variance-covariance",
        "decorrelation",
        "Hua et al.",
    ] {
        assert!(t.contains(needle), "missing {needle} in\n{t}");
    }
}
