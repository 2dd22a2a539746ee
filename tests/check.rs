//! `umae check` and `umae plugins` through the real binary, and recipe errors.

mod common;
use common::*;

#[test]
fn vit_b_mae_has_its_known_size() {
    for recipe in ["recipes/mae-vitb.ron", "recipes/u-mae-vitb.ron"] {
        let v = check_json(recipe);
        assert_eq!(v["trainable"], 111_655_680, "{recipe}: {v}");
        assert_eq!(v["encoder"][1], 85_647_360, "{recipe}: {v}");
        assert_eq!(
            v["trainable"].as_u64().unwrap() + v["fixed"].as_u64().unwrap(),
            111_907_840
        );
    }
}

#[test]
fn vit_t_cifar_mae_has_its_known_size() {
    for recipe in [
        "recipes/mae-vitt-cifar10.ron",
        "recipes/u-mae-vitt-cifar10.ron",
    ] {
        assert_eq!(check_json(recipe)["trainable"], 5_776_176, "{recipe}");
    }
}

#[test]
fn every_shipped_recipe_checks() {
    for entry in std::fs::read_dir(repo().join("recipes")).unwrap() {
        let p = entry.unwrap().path();
        let o = run(&["check", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}: {}", p.display(), text(&o));
        assert!(text(&o).contains("trainable"));
    }
}

#[test]
fn plugins_lists_every_builtin_with_defaults() {
    let o = run(&["plugins"]);
    assert!(o.status.success());
    let t = text(&o);
    for needle in [
        "masker",
        "random",
        "encoder",
        "vit",
        "decoder",
        "mae",
        "target",
        "pixels",
        "regularizer",
        "uniformity",
        "tau",
        "0.1",
        "ratio",
        "0.75",
    ] {
        assert!(t.contains(needle), "missing {needle} in\n{t}");
    }
    let o = run(&["plugins", "--kind", "regulariser"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("did you mean `regularizer`"),
        "{}",
        text(&o)
    );
}

fn bad_recipe(name: &str, from: &str, to: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(repo().join("recipes/mae-fmnist.ron")).unwrap();
    assert!(src.contains(from), "test setup: {from}");
    let path = dir.path().join(name);
    std::fs::write(&path, src.replacen(from, to, 1)).unwrap();
    let o = run(&["check", path.to_str().unwrap()]);
    (o.status.code().unwrap_or(-1), text(&o))
}

fn line_of(from: &str) -> usize {
    let src = std::fs::read_to_string(repo().join("recipes/mae-fmnist.ron")).unwrap();
    src.lines().position(|l| l.contains(from)).unwrap() + 1
}

#[test]
fn misspelled_plugin_is_located_and_suggested() {
    let (code, t) = bad_recipe("a.ron", "plugin: \"mae\"", "plugin: \"maee\"");
    assert_eq!(code, 2, "{t}");
    let line = line_of("plugin: \"mae\"");
    assert!(t.contains(&format!("a.ron:{line}:")), "{t}");
    assert!(t.contains("did you mean `mae`"), "{t}");
}

#[test]
fn misspelled_field_is_located_and_suggested() {
    let (code, t) = bad_recipe("b.ron", "norm_pix: true", "norm_pixx: true");
    assert_eq!(code, 2, "{t}");
    let line = line_of("norm_pix: true");
    assert!(t.contains(&format!("b.ron:{line}:")), "{t}");
    assert!(t.contains("did you mean `norm_pix`"), "{t}");
    assert!(t.contains("target `pixels`"), "{t}");

    let (code, t) = bad_recipe("c.ron", "epochs: 5", "epoch: 5");
    assert_eq!(code, 2, "{t}");
    assert!(t.contains("did you mean `epochs`"), "{t}");
}

#[test]
fn wrong_type_and_syntax_error_are_located() {
    let (code, t) = bad_recipe("d.ron", "batch_size: 256", "batch_size: \"big\"");
    assert_eq!(code, 2, "{t}");
    let line = line_of("batch_size: 256");
    assert!(
        t.contains(&format!("d.ron:{line}:")) && t.contains("train.batch_size"),
        "{t}"
    );

    let (code, t) = bad_recipe("e.ron", "ratio: 0.75)),", "ratio: 0.75),");
    assert_eq!(code, 2, "{t}");
    assert!(t.contains("e.ron:"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn set_overrides_and_missing_files() {
    let o = run(&[
        "check",
        "recipes/mae-fmnist.ron",
        "--set",
        "decoder.params.depth=3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["decoder"][1].as_u64().unwrap() > 109_456, "{v}");
    let o = run(&["check", "recipes/mae-fmnist.ron", "--set", "trian.epochs=1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("did you mean `train`"), "{}", text(&o));
    let o = run(&["check", "recipes/nope.ron"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("cannot read recipe recipes/nope.ron"),
        "{}",
        text(&o)
    );
}

#[test]
fn shape_mismatch_names_both_components() {
    // The vit encoder cannot cut 28x28 images into 16px patches.
    let o = run(&[
        "check",
        "recipes/mae-fmnist.ron",
        "--set",
        "encoder.params.patch=16",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("not divisible by the patch size 16"),
        "{}",
        text(&o)
    );
}
