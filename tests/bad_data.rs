//! Bad data through the real binary, on a real PNG image folder: unreadable images fail the run
//! naming the file, or are skipped and counted with `data.bad_images: Skip`; an empty class
//! folder and labels beyond `data.num_classes` are refused before training.

mod common;
use common::*;
use std::path::Path;

/// `root/train/<class>/<i>.png` and `root/val/...`: two classes of 16x16 grey images.
fn image_folder(root: &Path, per_class: usize) {
    for split in ["train", "val"] {
        for (c, class) in ["cat", "dog"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let img = image::GrayImage::from_fn(16, 16, |x, y| {
                    image::Luma([((x * 7 + y * 3 + i as u32 * 11 + c as u32 * 90) % 256) as u8])
                });
                img.save(dir.join(format!("{i:03}.png"))).unwrap();
            }
        }
    }
}

fn train(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let data_root = format!("data.root=\"{}\"", root.display());
    let mut a = vec![
        "run",
        "recipes/mae-fmnist.ron",
        "--output",
        out.to_str().unwrap(),
    ];
    for s in [
        "data.format=ImageFolder",
        &data_root,
        "data.image_size=16",
        "encoder.params.patch=4",
        "data.num_classes=2",
        "train.batch_size=8",
        "train.epochs=1",
        "encoder.params.depth=Some(1)",
        "encoder.params.dim=Some(32)",
        "eval=(online_probe: false, erank_samples: 0, linear: None, knn: None)",
    ] {
        a.extend(["--set", s]);
    }
    a.extend_from_slice(extra);
    run(&a)
}

#[test]
fn unreadable_images_fail_the_run_or_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    image_folder(&root, 12);
    let o = train(&root, &tmp.path().join("good"), &[]);
    assert!(o.status.success(), "{}", text(&o));

    // One truncated PNG and one that is not an image at all.
    let truncated = root.join("train/cat/003.png");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = root.join("train/dog/007.png");
    std::fs::write(&garbage, b"this is not a png").unwrap();

    let o = train(&root, &tmp.path().join("fail"), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("cannot decode") && text(&o).contains("data.bad_images = Skip"),
        "{}",
        text(&o)
    );

    let skip = tmp.path().join("skip");
    let o = train(&root, &skip, &["--set", "data.bad_images=Skip"]);
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(
        log.contains("cat/003.png") && log.contains("dog/007.png"),
        "both files named: {log}"
    );
    let epoch = metrics_rows(&skip)
        .into_iter()
        .find(|r| r["kind"] == "epoch")
        .unwrap();
    assert_eq!(epoch["data.skipped"], 2, "{epoch}");
}

#[test]
fn empty_class_folders_and_labels_out_of_range_are_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    image_folder(&root, 4);
    std::fs::create_dir_all(root.join("train/empty")).unwrap();
    let out = tmp.path().join("run");
    let o = train(&root, &out, &["--set", "data.num_classes=3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("class folder") && text(&o).contains("empty holds no .png/.jpg images"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
    std::fs::remove_dir(root.join("train/empty")).unwrap();

    let o = train(&root, &out, &["--set", "data.num_classes=1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("has 2 class folders, but data.num_classes is 1"),
        "{}",
        text(&o)
    );

    // IDX labels beyond num_classes (Fashion-MNIST has 10 classes).
    if have_fmnist() {
        let o = run(&[
            "run",
            "recipes/mae-fmnist.ron",
            "--output",
            out.to_str().unwrap(),
            "--set",
            "data.num_classes=5",
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            text(&o).contains("has labels up to 9, but data.num_classes is 5"),
            "{}",
            text(&o)
        );
    }
    assert!(!out.exists());
}
