//! Data parallelism through the real binary on the CPU: two replicas (`--device cpu,cpu`) with
//! half of every batch each train like one device with the whole batch, regularizer included
//! (it sees the features of both halves).

mod common;
use common::*;
use std::path::Path;

fn tiny(batch: usize) -> Vec<String> {
    [
        "data.format=Synthetic".to_string(),
        "data.synthetic_size=256".into(),
        "data.eval_limit=Some(64)".into(),
        format!("train.batch_size={batch}"),
        "train.epochs=2".into(),
        "train.log_every=1".into(),
        "encoder.params.depth=Some(2)".into(),
        "encoder.params.dim=Some(64)".into(),
        // A large weight, so that a wrong regularizer gradient would show in the losses.
        "regularizers=[(plugin: \"uniformity\", weight: 0.5, params: (tau: 0.1))]".into(),
        "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn train(out: &Path, device: &str, batch: usize) -> (Vec<[f64; 3]>, String) {
    let mut args: Vec<String> = ["run", "recipes/u-mae-fmnist.ron", "--output"]
        .map(String::from)
        .to_vec();
    args.push(out.to_str().unwrap().into());
    args.extend(["--device".into(), device.into()]);
    args.extend(tiny(batch));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(&args);
    assert!(o.status.success(), "{device}: {}", text(&o));
    let rows = metrics_rows(out)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| ["loss", "target.pixels", "reg.uniformity"].map(|k| r[k].as_f64().unwrap()))
        .collect();
    (rows, text(&o))
}

#[test]
fn two_cpu_replicas_train_like_one_device_with_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, _) = train(&tmp.path().join("one"), "cpu", 32);
    let (two, log) = train(&tmp.path().join("two"), "cpu,cpu", 16);
    assert!(
        log.contains("on 2 device(s)") && log.contains("effective batch 32"),
        "{log}"
    );
    assert_eq!(one.len(), 16, "256 images / 32 per step x 2 epochs");
    assert_eq!(one.len(), two.len());
    for (step, (a, b)) in one.iter().zip(&two).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-3),
                "step {}: one device {a:?}, two {b:?}",
                step + 1
            );
        }
    }
}

#[test]
fn bad_device_lists_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    for (list, needle) in [
        ("cpu,,cpu", "empty device name"),
        ("cpu,gpu", "unknown device"),
    ] {
        let o = run(&[
            "run",
            "recipes/mae-fmnist.ron",
            "--output",
            out.to_str().unwrap(),
            "--devices",
            list,
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(needle), "{}", text(&o));
    }
    assert!(!out.exists(), "nothing written for a refused command line");
    let o = run(&["bench", "recipes/mae-fmnist.ron", "--device", "cpu,cpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("only `umae run`"), "{}", text(&o));
}
