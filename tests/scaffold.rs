//! `umae new-plugin` and the plugin guide: the templates it writes are compiled and their
//! tests run here, the command's output is checked, and every Rust block of docs/plugins.md is
//! a verbatim part of a compiled source.

mod common;
use common::*;

// The templates, compiled as the scaffold writes them (with the name `my-plugin`).
mod masker_template {
    include!("../src/cli/templates/masker.rs");
}
mod encoder_template {
    include!("../src/cli/templates/encoder.rs");
}
mod decoder_template {
    include!("../src/cli/templates/decoder.rs");
}
mod target_template {
    include!("../src/cli/templates/target.rs");
}
mod regularizer_template {
    include!("../src/cli/templates/regularizer.rs");
}

#[test]
fn templates_register_their_components() {
    use umae_api::registry::{find, PluginKind};
    for kind in [
        PluginKind::Masker,
        PluginKind::Encoder,
        PluginKind::Decoder,
        PluginKind::Target,
        PluginKind::Regularizer,
    ] {
        assert!(find(kind, "my-plugin").is_some(), "{kind}");
    }
    let _ = (
        masker_template::MyPlugin { count: 1 }.count,
        regularizer_template::MyPlugin { radius: 1.0 }.radius,
        std::mem::size_of::<target_template::MyPlugin>(),
        std::mem::size_of::<encoder_template::MyPlugin<umae_api::B>>(),
        std::mem::size_of::<decoder_template::MyPlugin<umae_api::B>>(),
    );
}

#[test]
fn new_plugin_writes_a_crate_from_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-term");
    let o = run(&[
        "new-plugin",
        "my-term",
        "--kind",
        "regularizer",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    assert!(lib.contains("umae_sdk::declare_plugin!();"));
    let body = std::fs::read_to_string(repo().join("src/cli/templates/regularizer.rs"))
        .unwrap()
        .replace("my-plugin", "my-term")
        .replace("MyPlugin", "MyTerm");
    assert!(lib.ends_with(&body), "lib.rs is the template with the name");
    assert!(lib.contains("\"my-term\"") && lib.contains("pub struct MyTermParams"));
    let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(cargo.contains("crate-type = [\"dylib\"]"), "{cargo}");
    for dep in ["umae-api", "umae-sdk"] {
        let path = repo().join(dep);
        assert!(
            cargo.contains(&format!("{dep} = {{ path = \"{}\" }}", path.display())),
            "{cargo}"
        );
    }
    assert!(std::fs::read_to_string(dir.join(".cargo/config.toml"))
        .unwrap()
        .contains("prefer-dynamic"));
    // The folder exists now: refused, nothing changed.
    let o = run(&[
        "new-plugin",
        "my-term",
        "--kind",
        "masker",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("already exists"));
    assert_eq!(
        std::fs::read_to_string(dir.join("src/lib.rs")).unwrap(),
        lib
    );
}

#[test]
fn new_plugin_refuses_bad_names_and_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let out = out.to_str().unwrap();
    let o = run(&["new-plugin", "My Term", "--kind", "regularizer", "-o", out]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("lowercase letters"), "{}", text(&o));
    let o = run(&["new-plugin", "my-net", "--kind", "network", "-o", out]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("use masker, encoder, decoder, target or regularizer"),
        "{}",
        text(&o)
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn every_rust_block_of_the_guide_is_compiled_source() {
    let guide = std::fs::read_to_string(repo().join("docs/plugins.md")).unwrap();
    let sources: String = [
        "src/cli/templates/masker.rs",
        "src/cli/templates/encoder.rs",
        "src/cli/templates/decoder.rs",
        "src/cli/templates/target.rs",
        "src/cli/templates/regularizer.rs",
        "plugins/example-dylib/src/lib.rs",
        "plugins/example-static/src/main.rs",
        "plugins/simmim/src/decoder.rs",
        "umae-sdk/src/lib.rs",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(repo().join(p)).unwrap())
    .collect();
    let mut blocks = 0;
    let mut rest = guide.as_str();
    while let Some(start) = rest.find("```rust\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("closed block");
        let block = &body[..end];
        assert!(
            sources.contains(block),
            "this block of docs/plugins.md is not in a compiled source:\n{block}"
        );
        blocks += 1;
        rest = &body[end + 3..];
    }
    assert!(blocks >= 4, "{blocks} Rust blocks");
}

/// The five templates make a whole algorithm: a recipe of only `my-plugin` components trains
/// (in this process, where the templates are registered) and lowers its loss.
#[test]
fn the_five_templates_train_together() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = umae_api::recipe::Recipe::load(
        &repo().join("recipes/mae-fmnist.ron"),
        &[
            "data.format=Synthetic".into(),
            "data.synthetic_size=256".into(),
            "data.eval_limit=Some(64)".into(),
            "masker=(plugin: \"my-plugin\", params: (count: 24))".into(),
            "encoder=(plugin: \"my-plugin\", params: (patch: 4, dim: 32))".into(),
            "decoder=(plugin: \"my-plugin\", params: ())".into(),
            "target=(plugin: \"my-plugin\", params: ())".into(),
            "regularizers=[(plugin: \"my-plugin\", weight: 0.1, params: ())]".into(),
            "train.epochs=3".into(),
            "train.batch_size=32".into(),
            "train.log_every=1".into(),
            "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)".into(),
        ],
    )
    .unwrap();
    let opts = umae_runtime::train::RunOptions {
        run_dir: tmp.path().join("run"),
        device: umae_api::burn::DispatchDevice::Flex(Default::default()),
        parallel: Vec::new(),
        nodes: None,
        force: false,
        resume: false,
    };
    let summary = umae_runtime::train::run(&recipe, &opts).unwrap();
    assert_eq!(summary.steps, 24);
    let losses: Vec<f64> = metrics_rows(&opts.run_dir)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["target.my-plugin"].as_f64().unwrap())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&losses[losses.len() - 4..]) < mean(&losses[..4]),
        "{losses:?}"
    );
}

#[test]
fn new_plugin_has_a_template_for_every_kind() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["masker", "encoder", "decoder", "target", "regularizer"] {
        let dir = tmp.path().join(kind);
        let name = format!("my-{kind}");
        let o = run(&[
            "new-plugin",
            &name,
            "--kind",
            kind,
            "-o",
            dir.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        let camel = format!("My{}{}", kind[..1].to_uppercase(), &kind[1..]);
        let body = std::fs::read_to_string(repo().join(format!("src/cli/templates/{kind}.rs")))
            .unwrap()
            .replace("my-plugin", &name)
            .replace("MyPlugin", &camel);
        assert!(
            lib.ends_with(&body),
            "{kind}: lib.rs is the template with the name"
        );
        assert!(lib.contains(&format!("--kind {kind}")), "{lib}");
    }
}

#[test]
fn help_texts_describe_what_the_commands_take() {
    let o = run(&["new-plugin", "--help"]);
    assert!(o.status.success(), "{}", text(&o));
    let help = text(&o);
    for kind in ["masker", "encoder", "decoder", "target", "regularizer"] {
        assert!(
            help.contains(kind),
            "new-plugin --help names {kind}: {help}"
        );
    }
    let o = run(&["export", "--help"]);
    assert!(o.status.success(), "{}", text(&o));
    let help = text(&o);
    for used in ["--checkpoint", "--set", "--device", "--format", "--output"] {
        assert!(help.contains(used), "export --help lists {used}: {help}");
    }
    for unused in ["--pool", "--encode-batch", "--no-cache", "--json"] {
        assert!(
            !help.contains(unused),
            "export does nothing with {unused}: {help}"
        );
    }
}
