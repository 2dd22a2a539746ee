//! `umae new-plugin` and the plugin guide: the templates it writes are compiled and their
//! tests run here, the command's output is checked, and every Rust block of docs/plugins.md is
//! a verbatim part of a compiled source.

mod common;
use common::*;

// The templates, compiled as the scaffold writes them (with the name `my-plugin`).
mod masker_template {
    include!("../src/cli/templates/masker.rs");
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
        PluginKind::Target,
        PluginKind::Regularizer,
    ] {
        assert!(find(kind, "my-plugin").is_some(), "{kind}");
    }
    let _ = (
        masker_template::MyPlugin { count: 1 }.count,
        regularizer_template::MyPlugin { radius: 1.0 }.radius,
        std::mem::size_of::<target_template::MyPlugin>(),
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
    let o = run(&["new-plugin", "my-enc", "--kind", "encoder", "-o", out]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("masker, target or regularizer"),
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
        "src/cli/templates/target.rs",
        "src/cli/templates/regularizer.rs",
        "plugins/example-dylib/src/lib.rs",
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
