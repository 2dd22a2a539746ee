//! Random command lines through the real binary: subcommands, flags and values drawn from what
//! users type and get wrong (missing or damaged recipes, negative, huge and non-numeric values,
//! unknown fields, unicode). Every one ends within seconds with exit 0, 1 or 2 and, on failure,
//! an `error:` message (or the usage, for no subcommand); none panics. No combination can start training: recipes given to the
//! commands that compute are unreadable or invalid.

mod common;
use common::*;
use proptest::prelude::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const COMMANDS: &[&[&str]] = &[
    &["run"],
    &["check"],
    &["plugins"],
    &["bench"],
    &["device-check"],
    &["eval", "linear"],
    &["eval", "knn"],
    &["analyze", "rank"],
    &["analyze", "mask-ratio"],
    &["export"],
    &["import"],
    &["plot"],
    &["new-plugin"],
    &[],
];

const FLAGS: &[&str] = &[
    "--set",
    "--device",
    "--devices",
    "--output",
    "-o",
    "--resume",
    "--force",
    "--batch",
    "--steps",
    "--kind",
    "--checkpoint",
    "--pool",
    "--json",
    "--plugin",
    "--nodes",
    "--node-rank",
    "--orchestrator",
    "--node-address",
    "--format",
    "--help",
];

const VALUES: &[&str] = &[
    "-1",
    "0",
    "3",
    "99999999999999999999999",
    "1e400",
    "NaN",
    "",
    "cpu",
    "cuda:7",
    "cpu,cpu",
    "tch",
    "masker",
    "regularizer",
    "my-term",
    "Bad Name",
    "h:1",
    "ünïcødé-✓",
    "/nonexistent/x",
    "train.epochs=-3",
    "train.batch_size=0",
    "train.batch_size=99999999999999999999",
    "data.image_size=1e9",
    "optimizer.blr=NaN",
    "masker.params.ratio=1.5",
    "encoder.params.depth=Some(-1)",
    "nosuch.field=1",
    "regularizers=[(plugin: \"nope\", weight: 1.0)]",
    "eval.knn=Some((k: 0))",
    "train=(epochs: \"five\")",
    "name=\"ünïcødé\"",
];

/// What a command may be given as its recipe or source: `valid` only for `check`, which
/// never trains.
fn sources(dir: &Path, valid: bool) -> Vec<String> {
    let mut v = vec![
        dir.join("garbage.ron").display().to_string(),
        dir.join("truncated.ron").display().to_string(),
        dir.join("huge.ron").display().to_string(),
        dir.join("missing.ron").display().to_string(),
        dir.display().to_string(),
        "ünïcødé.ron".to_string(),
    ];
    if valid {
        v.push("recipes/mae-fmnist.ron".into());
        v.push("recipes/u-mae-vitb.ron".into());
    }
    v
}

fn fixtures(dir: &Path) {
    let base = std::fs::read_to_string(repo().join("recipes/mae-fmnist.ron")).unwrap();
    std::fs::write(dir.join("garbage.ron"), "Recipe(((((\u{0}\u{1}]]]").unwrap();
    std::fs::write(dir.join("truncated.ron"), &base[..base.len() / 2]).unwrap();
    let huge = base.replace("epochs: 5", "epochs: 184467440737095516150");
    std::fs::write(dir.join("huge.ron"), huge).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_command_lines_never_panic_or_hang(
        cmd in 0..COMMANDS.len(),
        src in 0usize..8,
        args in proptest::collection::vec((0..FLAGS.len(), 0..VALUES.len(), any::<bool>()), 0..5),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        fixtures(tmp.path());
        let command = COMMANDS[cmd];
        let mut argv: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        let srcs = sources(tmp.path(), command == ["check"]);
        if !command.is_empty() && command != ["plugins"] {
            argv.push(srcs[src % srcs.len()].clone());
        }
        for (f, v, with_value) in args {
            argv.push(FLAGS[f].to_string());
            if with_value {
                argv.push(VALUES[v].to_string());
            }
        }
        let mut child = umae()
            .args(&argv)
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                prop_assert!(false, "hung: umae {:?}", argv);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        prop_assert!(!err.contains("panicked"), "umae {:?} panicked: {}", argv, err);
        let code = status.code();
        prop_assert!(matches!(code, Some(0..=2)), "umae {:?} exited {:?}: {}", argv, code, err);
        if code != Some(0) {
            // An error message, or clap's usage for a missing subcommand.
            prop_assert!(
                err.contains("error") || err.starts_with("Masked-image-modeling"),
                "umae {:?} failed silently: {}", argv, err
            );
        }
    }
}
