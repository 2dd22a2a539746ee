//! The `umae` executable is a launcher: when the libumae_sdk.so beside it is not the one it was
//! built with, it says so and exits 2 instead of dying in the dynamic loader. The SDKs of other
//! builds are made here from copies of this build's files: one with another build identity
//! (what another feature set or toolchain records), and a program that needs a symbol the SDK
//! lacks (what a rebuilt SDK with the same identity does to the old program).

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output};

/// A copy of umae's three files in `dir`, run there without cargo's LD_LIBRARY_PATH.
fn lay_out(dir: &Path) {
    let release = Path::new(env!("CARGO_BIN_EXE_umae")).parent().unwrap();
    for f in ["umae", "libumae.so", "libumae_sdk.so"] {
        std::fs::copy(release.join(f), dir.join(f)).unwrap();
    }
}

fn start(dir: &Path) -> Output {
    Command::new(dir.join("umae"))
        .args(["plugins", "--kind", "masker"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap()
}

fn refused(dir: &Path) -> String {
    let o = start(dir);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "exit 2, not a crash: {t}");
    assert!(
        t.contains("umae cannot start") && !t.contains("symbol lookup error"),
        "{t}"
    );
    t
}

#[test]
fn a_copy_of_the_build_runs_on_its_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out(tmp.path());
    let o = start(tmp.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("random"), "{}", text(&o));
    // Nothing beside it: what the executable needs, and how to get it.
    std::fs::remove_file(tmp.path().join("libumae.so")).unwrap();
    let t = refused(tmp.path());
    assert!(
        t.contains("libumae.so is neither in") && t.contains("scripts/install.sh"),
        "{t}"
    );
}

#[test]
fn an_sdk_of_another_build_is_named_with_the_expected_one() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out(tmp.path());
    let sdk = tmp.path().join("libumae_sdk.so");
    let mut bytes = std::fs::read(&sdk).unwrap();
    let (from, to) = (b"burn 0.21.0 (flex", b"burn 0.21.0 (flax");
    let mut edited = 0;
    for i in 0..bytes.len() - from.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + to.len()].copy_from_slice(to);
            edited += 1;
        }
    }
    assert!(edited >= 1, "the SDK holds its build identity");
    std::fs::write(&sdk, bytes).unwrap();
    let t = refused(tmp.path());
    assert!(
        t.contains(&format!(
            "{} is not the SDK this umae was built with",
            sdk.display()
        )) && t.contains("expected: umae-api")
            && t.contains("(flax")
            && t.contains("Rebuild umae: `cargo build --release"),
        "{t}"
    );
}

#[test]
fn a_program_that_needs_what_the_sdk_lacks_is_refused_before_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    lay_out(tmp.path());
    let program = tmp.path().join("libumae.so");
    let mut bytes = std::fs::read(&program).unwrap();
    let missing = rename_needed_symbol(&mut bytes, b"_ZN8umae_api");
    std::fs::write(&program, bytes).unwrap();
    let t = refused(tmp.path());
    assert!(
        t.contains(&format!("{} does not match", program.display()))
            && t.contains(&missing)
            && t.contains("Rebuild umae: `cargo build --release"),
        "{t}"
    );
}
