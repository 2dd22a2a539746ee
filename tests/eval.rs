//! `umae eval`, `umae analyze` and `umae plot` through the real binary.

mod common;

use common::*;

fn json_line(o: &std::process::Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().expect("a line")).expect("JSON")
}

/// The probe itself works: a linear classifier on raw Fashion-MNIST pixels reaches the known
/// logistic-regression level (about 84%).
#[test]
fn linear_probe_on_raw_pixels_reaches_logistic_regression_level() {
    if !have_fmnist() {
        return;
    }
    let o = run(&[
        "eval",
        "linear",
        "recipes/pixels-fmnist.ron",
        "--set",
        "data.train_limit=None",
        "--set",
        "data.eval_limit=None",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json_line(&o);
    assert_eq!(v["train_images"], 60000);
    assert_eq!(v["test_images"], 10000);
    let top1 = v["top1"].as_f64().unwrap();
    assert!(
        (0.82..0.87).contains(&top1),
        "raw-pixel linear probe top-1 {top1}"
    );
    assert!(v["top5"].as_f64().unwrap() > 0.98);
}

/// A short real run with the recipe's end-of-run evaluations, then every command on it.
#[test]
fn evaluations_analyses_and_figures_of_a_run() {
    if !have_fmnist() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let rd = run_dir.to_str().unwrap();
    let o = run(&[
        "run",
        "recipes/u-mae-fmnist.ron",
        "-o",
        rd,
        "--set",
        "train.epochs=2",
        "--set",
        "data.train_limit=512",
        "--set",
        "data.eval_limit=256",
        "--set",
        "train.batch_size=64",
        "--set",
        "eval.linear.epochs=3",
        "--set",
        "eval.linear.warmup_epochs=1",
        "--set",
        "eval.erank_samples=64",
        "--set",
        "eval.finetune=Some((epochs: 1, batch_size: 32, warmup_epochs: 0))",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("linear probe") && text(&o).contains("kNN"),
        "{}",
        text(&o)
    );
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let eval: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "eval")
        .collect();
    assert_eq!(eval.len(), 1, "one offline evaluation after the last epoch");
    assert_eq!(eval[0]["epoch"], 2);
    let linear = eval[0]["linear.top1"].as_f64().unwrap();
    assert_eq!(eval[0]["finetune.epochs"].as_array().unwrap().len(), 1);
    assert!(text(&o).contains("fine-tuned"), "{}", text(&o));
    assert!(linear > 0.1 && linear <= 1.0, "{linear}");

    // kNN reads the features cached by the run's evaluation.
    let o = run(&["eval", "knn", rd, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let knn = json_line(&o);
    assert_eq!(knn["top1"], eval[0]["knn.top1"], "same features, same kNN");
    let o = run(&["eval", "knn", rd]);
    assert!(text(&o).contains("cached features"), "{}", text(&o));

    // The exact probe on the same cached features fits the training split at least as well as
    // the 3-epoch LARS schedule, and says how many iterations it took.
    let o = run(&["eval", "linear", rd, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let lars = json_line(&o);
    let o = run(&["eval", "linear", rd, "--optimizer", "lbfgs", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let lbfgs = json_line(&o);
    assert!(
        lbfgs["iterations"].as_u64().is_some_and(|i| i > 0),
        "{lbfgs}"
    );
    assert!(
        lbfgs["train_top1"].as_f64().unwrap() >= lars["train_top1"].as_f64().unwrap(),
        "L-BFGS {lbfgs} vs LARS {lars}"
    );
    let o = run(&["eval", "linear", rd, "--optimizer", "lbfgs", "--l2=-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Effective rank over both checkpoints; the last equals the one logged in training.
    let o = run(&["analyze", "rank", rd, "--samples", "64", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let ranks = json_line(&o);
    let ranks = ranks.as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    let logged: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .map(|v| v["erank"].as_f64().unwrap())
        .collect();
    for (r, l) in ranks.iter().zip(&logged) {
        assert!(
            (r["erank"].as_f64().unwrap() - l).abs() < 1e-3,
            "{r} vs {l}"
        );
        assert_eq!(r["spectrum"].as_array().unwrap().len(), 64);
    }

    let o = run(&[
        "analyze",
        "mask-ratio",
        rd,
        "--per-class",
        "4",
        "--ratios",
        "0,0.5,0.9",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("sweet spot"), "{}", text(&o));
    let o = run(&[
        "analyze",
        "tsne",
        rd,
        "--samples",
        "60",
        "--perplexity",
        "10",
        "--iterations",
        "300",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["analyze", "reconstruct", rd, "--images", "4"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run_dir.join("figures/reconstruction.png").exists());

    // Fine-tuning trains a copy: the run's checkpoint stays as it was.
    let ckpt = run_dir.join("checkpoints/epoch-0002/model.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    let o = run(&[
        "eval", "finetune", rd, "--epochs", "2", "--warmup", "1", "--batch", "32", "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let ft = json_line(&o);
    let epochs = ft["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    for e in epochs {
        assert!(e["train_loss"].as_f64().unwrap().is_finite());
        let t1 = e["test"]["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&t1));
    }
    assert_eq!(before, std::fs::read(&ckpt).unwrap());
    let evals = std::fs::read_to_string(run_dir.join("eval.jsonl")).unwrap();
    assert!(
        evals.lines().any(|l| l.contains("\"kind\":\"finetune\"")),
        "{evals}"
    );

    let figs = dir.path().join("figs");
    let o = run(&[
        "plot",
        rd,
        rd,
        "--names",
        "a,b",
        "-o",
        figs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["loss", "probe", "erank", "spectrum", "mask-ratio-a", "tsne"] {
        let p = figs.join(format!("{f}.png"));
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(img.width() >= 600 && img.height() >= 400, "{f}");
        // Not a blank canvas: many distinct colours were drawn.
        let rgb = img.to_rgb8();
        let mut colours: Vec<[u8; 3]> = rgb.pixels().map(|p| p.0).collect();
        colours.sort();
        colours.dedup();
        assert!(
            colours.len() > 20,
            "{f} looks empty ({} colours)",
            colours.len()
        );
    }
}

#[test]
fn bad_sources_and_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let o = run(&["eval", "linear", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));

    // A folder that is not a run.
    let o = run(&["eval", "knn", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("neither a run directory"), "{}", text(&o));

    // A run with no checkpoint yet.
    std::fs::copy(
        repo().join("recipes/mae-fmnist.ron"),
        dir.path().join("recipe.ron"),
    )
    .unwrap();
    let o = run(&["eval", "knn", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no checkpoint yet"), "{}", text(&o));

    // --checkpoint with a recipe, an unknown pooling, an unknown optimizer.
    let o = run(&[
        "eval",
        "knn",
        "recipes/pixels-fmnist.ron",
        "--checkpoint",
        "epoch-0001",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("needs a run directory"), "{}", text(&o));
    let o = run(&["eval", "knn", "recipes/pixels-fmnist.ron", "--pool", "max"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("unknown pooling"), "{}", text(&o));
    let o = run(&[
        "eval",
        "linear",
        "recipes/pixels-fmnist.ron",
        "--optimizer",
        "adam",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("lars, sgd or lbfgs"), "{}", text(&o));

    // The identity encoder cannot be pretrained.
    let o = run(&[
        "run",
        "recipes/pixels-fmnist.ron",
        "-o",
        dir.path().join("p").to_str().unwrap(),
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o).contains("no parameters to pretrain"),
        "{}",
        text(&o)
    );

    // Nothing to plot.
    let o = run(&["plot", dir.path().join("nope").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no metrics.jsonl"), "{}", text(&o));

    for cmd in [
        vec!["eval", "linear", "--help"],
        vec!["eval", "knn", "--help"],
        vec!["eval", "finetune", "--help"],
        vec!["analyze", "rank", "--help"],
        vec!["analyze", "mask-ratio", "--help"],
        vec!["plot", "--help"],
        vec!["export", "--help"],
        vec!["import", "--help"],
    ] {
        let o = run(&cmd);
        assert!(o.status.success() && text(&o).contains("Usage"), "{cmd:?}");
    }
}
