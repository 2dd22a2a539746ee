//! Evaluations inside a run: the online probe on the test split, the effective rank, and the
//! recipe's offline evaluations on a checkpoint (exactly as `umae eval` runs them).

use std::path::Path;

use serde_json::{json, Map, Value};
use umae_api::Device;

use crate::analysis::rank;
use crate::data::{Loader, Pipeline};
use crate::eval::features::{encode, Pool};
use crate::model::{images_tensor, Model};
use crate::step::{labels_tensor, probe_logits, ProbeNorm};

/// The recipe's offline evaluations (`eval.linear`, `eval.knn`) on a checkpoint of the run,
/// exactly as `umae eval` runs them (features cached under `<run>/features`).
pub fn offline_eval(
    run_dir: &Path,
    checkpoint: &str,
    device: &Device,
) -> crate::Result<Map<String, Value>> {
    let loaded = crate::checkpoint::source::load(run_dir, Some(checkpoint), &[], device)
        .map_err(|e| e.to_string())?;
    let ev = loaded.recipe.eval.clone();
    let pool = ev.pool;
    let d = &loaded.recipe.data;
    let fs = crate::eval::features::feature_set(
        &loaded,
        pool,
        d.train_limit,
        d.eval_limit,
        256,
        device,
        true,
    )?;
    let mut row = Map::new();
    if let Some(spec) = &ev.linear {
        let r = crate::eval::linear::linear_probe(&fs.train, &fs.test, fs.classes, spec, device)?;
        row.insert("linear.top1".into(), json!(r.test.top1));
        row.insert("linear.top5".into(), json!(r.test.top5));
    }
    if let Some(spec) = &ev.knn {
        let a = crate::eval::linear::knn(&fs.train, &fs.test, fs.classes, spec, device)?;
        row.insert("knn.top1".into(), json!(a.top1));
        row.insert("knn.top5".into(), json!(a.top5));
    }
    Ok(row)
}

/// The recipe's fine-tuning evaluation (`eval.finetune`) on a checkpoint of the run.
pub fn finetune_eval(
    run_dir: &Path,
    checkpoint: &str,
    device: &Device,
) -> crate::Result<Option<Map<String, Value>>> {
    let mut loaded = crate::checkpoint::source::load(run_dir, Some(checkpoint), &[], device)
        .map_err(|e| e.to_string())?;
    let Some(spec) = loaded.recipe.eval.finetune.clone() else {
        return Ok(None);
    };
    let rows = crate::eval::finetune::finetune(&mut loaded, &spec, device, |r| {
        tracing::info!(
            "fine-tune epoch {}/{}: train loss {:.4}, test top-1 {:.4}",
            r.epoch,
            spec.epochs,
            r.train_loss,
            r.test.top1
        )
    })?;
    let last = rows.last().expect("at least one epoch");
    let mut row = Map::new();
    row.insert("finetune.top1".into(), json!(last.test.top1));
    row.insert("finetune.top5".into(), json!(last.test.top5));
    row.insert("finetune.epochs".into(), json!(rows));
    Ok(Some(row))
}

/// `f` on `model` with the encoder's and the probe's parameters untracked, then tracked again:
/// burn keeps the autodiff graph of a forward pass that never runs backward alive, so an
/// evaluation on the training model would otherwise hold the activations of the whole test
/// split, every epoch.
pub(super) fn untracked<T>(model: &mut Model, f: impl FnOnce(&Model) -> T) -> T {
    use umae_api::burn::module::Module;
    model.encoder.set_trainable(false);
    let head = model.probe.as_mut().map(|p| {
        let tracked = p.head.clone();
        p.head = tracked.clone().no_grad();
        tracked
    });
    let out = f(model);
    model.encoder.set_trainable(true);
    if let (Some(p), Some(h)) = (model.probe.as_mut(), head) {
        p.head = h;
    }
    out
}

/// The online probe's top-1 accuracy on the test split.
pub(super) fn probe_accuracy(
    model: &Model,
    norm: &mut ProbeNorm,
    pipeline: &Pipeline,
    batch: usize,
    device: &Device,
) -> Result<f64, String> {
    let mut correct = 0.0;
    let mut total = 0usize;
    for b in Loader::start(
        pipeline,
        (0..pipeline.dataset.len()).collect(),
        batch,
        false,
        0,
        2,
    ) {
        let b = b?;
        let x = images_tensor(b.images, b.n, &model.geometry, device);
        let out = model.encoder.forward(x, None);
        let logits = probe_logits(model, norm, out.pooled, false);
        let y = labels_tensor(&b.labels, device);
        let c: f32 = logits
            .argmax(1)
            .reshape([b.n])
            .equal(y)
            .float()
            .sum()
            .into_scalar();
        correct += c as f64;
        total += b.n;
    }
    Ok(correct / total.max(1) as f64)
}

/// The effective rank of the first `samples` test images' features.
pub(super) fn erank(
    model: &Model,
    pipeline: &Pipeline,
    samples: usize,
    batch: usize,
    device: &Device,
) -> Result<f64, String> {
    let n = samples.min(pipeline.dataset.len());
    let f = encode(
        model,
        pipeline,
        (0..n).collect(),
        Pool::Model,
        batch,
        device,
        "erank",
    )?;
    Ok(rank::effective_rank(&f.data, f.n, f.dim))
}
