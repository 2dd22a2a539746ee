//! Numerical faults through the real binary: a diverging run stops at the first NaN with the
//! loss term named and its last checkpoint intact, or skips such steps up to
//! `train.skip_nonfinite` and then stops.

mod common;
use common::*;
use std::path::Path;

fn tiny() -> Vec<String> {
    [
        "data.format=Synthetic",
        "data.synthetic_size=128",
        "data.eval_limit=Some(32)",
        "train.batch_size=32",
        "encoder.params.depth=Some(1)",
        "encoder.params.dim=Some(32)",
        "eval=(online_probe: true, erank_samples: 0, linear: None, knn: None)",
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

fn umae_run(args: &[String]) -> std::process::Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Resume `dir` for two more epochs at a learning rate that makes the loss NaN within steps.
fn diverge(dir: &Path, skips: usize) -> std::process::Output {
    let mut a: Vec<String> = vec!["run".into(), "--resume".into(), dir.display().to_string()];
    for s in [
        "train.epochs=3".to_string(),
        "optimizer.blr=1e12".into(),
        "schedule.warmup_epochs=0.0".into(),
        format!("train.skip_nonfinite={skips}"),
    ] {
        a.extend(["--set".into(), s]);
    }
    umae_run(&a)
}

#[test]
fn nan_stops_the_run_naming_the_term_or_is_skipped_up_to_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut a: Vec<String> = vec!["run".into(), "recipes/mae-fmnist.ron".into()];
    a.extend(["--output".into(), dir.display().to_string()]);
    a.extend(tiny());
    a.extend(["--set".into(), "train.epochs=1".into()]);
    let o = umae_run(&a);
    assert!(o.status.success(), "{}", text(&o));
    let weights = std::fs::read(dir.join("checkpoints/epoch-0001/model.safetensors")).unwrap();

    let o = diverge(&dir, 0);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let log = text(&o);
    assert!(
        log.contains("the loss term target.pixels became NaN")
            && log.contains("its last checkpoint epoch-0001 is intact")
            && !log.contains("skipped"),
        "{log}"
    );
    // Intact: the same bytes, and it still verifies and loads.
    let after = std::fs::read(dir.join("checkpoints/epoch-0001/model.safetensors")).unwrap();
    assert!(weights == after);
    let out = tmp.path().join("enc.safetensors");
    let o = run(&[
        "export",
        dir.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let o = diverge(&dir, 2);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let log = text(&o);
    assert_eq!(log.matches("step skipped, no update").count(), 2, "{log}");
    assert!(log.contains("after 2 skipped step(s)"), "{log}");
}

#[test]
fn replicas_check_every_step_and_skip_on_every_device() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut a: Vec<String> = vec!["run".into(), "recipes/mae-fmnist.ron".into()];
    a.extend(["--output".into(), dir.display().to_string()]);
    a.extend(tiny());
    a.extend(["--set".into(), "train.batch_size=16".into()]);
    a.extend(["--set".into(), "train.epochs=1".into()]);
    a.extend(["--device".into(), "cpu,cpu".into()]);
    let o = umae_run(&a);
    assert!(o.status.success(), "{}", text(&o));

    let mut a: Vec<String> = vec!["run".into(), "--resume".into(), dir.display().to_string()];
    for s in [
        "train.epochs=3",
        "optimizer.blr=1e12",
        "schedule.warmup_epochs=0.0",
        "train.skip_nonfinite=2",
    ] {
        a.extend(["--set".into(), s.into()]);
    }
    a.extend(["--device".into(), "cpu,cpu".into()]);
    let o = umae_run(&a);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let log = text(&o);
    // Skipping needs every replica to drop its gradients; before, two devices stopped at once.
    assert_eq!(log.matches("step skipped, no update").count(), 2, "{log}");
    assert!(log.contains("after 2 skipped step(s)"), "{log}");
    assert!(log.contains("on 2 device(s)"), "{log}");
}
