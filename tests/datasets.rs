//! Unlabeled image trees and WebDataset tar shards through the real binary: pretraining on a
//! tree without labels (an eval section that needs them refused before anything is written),
//! shards with and without `.cls` labels, bad members under `data.bad_images`, and a run stopped
//! mid-epoch on shards resuming to exactly the uninterrupted weights. Also `umae bench --data`.

mod common;
use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn grey_png(seed: usize) -> Vec<u8> {
    let img = image::GrayImage::from_fn(20, 18, |x, y| {
        image::Luma([((x * 7 + y * 3 + seed as u32 * 11) % 256) as u8])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// A tar file at `path` with these (name, contents) members, in order.
fn write_tar(path: &Path, members: impl IntoIterator<Item = (String, Vec<u8>)>) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.finish().unwrap();
}

/// `count` samples per shard, `shards` shards, in `dir`: `KEY.png` (+ `KEY.cls`).
fn write_shards(dir: &Path, shards: usize, count: usize, labels: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for s in 0..shards {
        let members = (0..count).flat_map(|k| {
            let i = s * count + k;
            let mut m = vec![(format!("{i:08}.png"), grey_png(i))];
            if labels {
                m.push((format!("{i:08}.cls"), (i % 2).to_string().into_bytes()));
            }
            m
        });
        write_tar(&dir.join(format!("{s:05}.tar")), members);
    }
}

fn args(format: &str, root: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for s in [
        format!("data.format={format}"),
        format!("data.root=\"{}\"", root.display()),
        "data.image_size=16".into(),
        "encoder.params.patch=4".into(),
        "data.num_classes=2".into(),
        "data.train_limit=None".into(),
        "data.eval_limit=None".into(),
        "train.batch_size=8".into(),
        "train.epochs=1".into(),
        "encoder.params.depth=Some(1)".into(),
        "encoder.params.dim=Some(32)".into(),
    ] {
        a.extend(["--set".into(), s]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn umae_run(a: &[String]) -> std::process::Output {
    run(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

const NO_LABELS: &str = "eval=(online_probe: false, erank_samples: 8, linear: None, knn: None)";

#[test]
fn an_unlabeled_tree_pretrains_and_an_eval_that_needs_labels_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    for (i, sub) in ["a", "a/deeper", "b", "b/c/d"].iter().enumerate() {
        let d = root.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..6 {
            std::fs::write(d.join(format!("{k}.png")), grey_png(i * 10 + k)).unwrap();
        }
    }
    std::fs::write(root.join("b/readme.txt"), "not an image").unwrap();
    let out = tmp.path().join("run");
    let o = umae_run(&args("Images", &root, &out, &[]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("has no labels") && text(&o).contains("online_probe: false"),
        "the fix is named: {}",
        text(&o)
    );
    assert!(!out.exists(), "nothing written before the refusal");
    let o = run(&[
        "check",
        "recipes/mae-fmnist.ron",
        "--set",
        "data.format=Images",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "umae check refuses it too: {}",
        text(&o)
    );

    let o = umae_run(&args("Images", &root, &out, &["--set", NO_LABELS]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("3 steps/epoch"),
        "24 images in batches of 8: {}",
        text(&o)
    );
    let epoch = metrics_rows(&out)
        .into_iter()
        .find(|r| r["kind"] == "epoch")
        .unwrap();
    assert!(epoch["erank"].as_f64().is_some_and(|e| e > 1.0), "{epoch}");
}

#[test]
fn shards_train_with_labels_and_bad_members_follow_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("shards");
    write_shards(&root.join("train"), 3, 8, true);
    write_shards(&root.join("val"), 1, 8, true);
    let out = tmp.path().join("labeled");
    let o = umae_run(&args(
        "Shards",
        &root,
        &out,
        &["--set", "eval=(online_probe: true, erank_samples: 8)"],
    ));
    assert!(o.status.success(), "{}", text(&o));
    let epoch = metrics_rows(&out)
        .into_iter()
        .find(|r| r["kind"] == "epoch")
        .unwrap();
    assert!(
        epoch["probe.test_acc"].as_f64().is_some(),
        "the online probe ran on the .cls labels: {epoch}"
    );

    // Unlabeled shards: the probe is refused, pretraining alone runs.
    let bare = tmp.path().join("bare");
    write_shards(&bare, 2, 8, false);
    let o = umae_run(&args("Shards", &bare, &tmp.path().join("r1"), &[]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no .cls members"), "{}", text(&o));
    let o = umae_run(&args(
        "Shards",
        &bare,
        &tmp.path().join("r2"),
        &["--set", NO_LABELS],
    ));
    assert!(o.status.success(), "{}", text(&o));

    // A member that is not an image: named with its shard, or skipped and counted.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    write_tar(
        &broken.join("00000.tar"),
        (0..16).map(|i| {
            let data = if i == 5 {
                b"garbage, not a png".to_vec()
            } else {
                grey_png(i)
            };
            (format!("{i:08}.png"), data)
        }),
    );
    let o = umae_run(&args(
        "Shards",
        &broken,
        &tmp.path().join("r3"),
        &["--set", NO_LABELS],
    ));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("00000.tar:00000005"), "{}", text(&o));
    let skip = tmp.path().join("r4");
    let o = umae_run(&args(
        "Shards",
        &broken,
        &skip,
        &["--set", NO_LABELS, "--set", "data.bad_images=Skip"],
    ));
    assert!(o.status.success(), "{}", text(&o));
    let epoch = metrics_rows(&skip)
        .into_iter()
        .find(|r| r["kind"] == "epoch")
        .unwrap();
    assert_eq!(epoch["data.skipped"], 1, "{epoch}");
}

#[test]
fn a_run_on_shards_stopped_mid_epoch_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("shards");
    write_shards(&root, 4, 40, false);
    let extra = [
        "--set",
        "train.epochs=3",
        "--set",
        "train.log_every=1",
        "--set",
        "data.shuffle_buffer=16",
        "--set",
        NO_LABELS,
    ];
    let straight = tmp.path().join("straight");
    let o = umae_run(&args("Shards", &root, &straight, &extra));
    assert!(o.status.success(), "{}", text(&o));

    let dir = tmp.path().join("stopped");
    let child = umae()
        .args(args("Shards", &root, &dir, &extra))
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stop once a step of the second epoch is logged (20 steps per epoch).
    let t0 = Instant::now();
    while !std::fs::read_to_string(dir.join("metrics.jsonl"))
        .is_ok_and(|m| m.contains("\"epoch\":2,"))
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{log}");
    assert!(
        log.contains("checkpoint epoch-0001-step-"),
        "stopped within the second epoch: {log}"
    );
    let o = run(&["run", "--resume", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (
        outcome(&straight, "epoch-0003"),
        outcome(&dir, "epoch-0003"),
    );
    assert_eq!(a.1, b.1, "epoch metrics differ");
    assert!(a.0 == b.0, "final weights differ");
}

#[test]
fn bench_data_times_the_input_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("jpegs");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..12 {
        let img = image::RgbImage::from_fn(90, 70, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 3) as u8, (i * 20) as u8])
        });
        img.save(root.join(format!("{i}.jpg"))).unwrap();
    }
    let root_set = format!("data.root=\"{}\"", root.display());
    let o = run(&[
        "bench",
        "recipes/mae-vitb.ron",
        "--data",
        "--set",
        "data.format=Images",
        "--set",
        "eval.online_probe=false",
        "--set",
        &root_set,
        "--batch",
        "4",
        "--steps",
        "5",
        "--workers",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["images"].as_u64(), v["workers"].as_u64()),
        (Some(20), Some(2)),
        "{v}"
    );
    for k in ["per_core", "with_workers"] {
        assert!(v[k].as_f64().is_some_and(|r| r > 0.0), "{k}: {v}");
    }
    let o = run(&["bench", "recipes/mae-vitb.ron", "--data", "--workers", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(&[
        "bench",
        "recipes/mae-vitb.ron",
        "--data",
        "--set",
        "data.root=\"/nonexistent\"",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("/nonexistent"), "{}", text(&o));
}
