//! The recipe schema and its loader: RON files with inheritance (`base`) and `--set` overrides.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::de::{from_node, DeError};
use crate::value::{parse, Field, Kind, Node, Span};

/// A recipe error: where, what, and the nearest valid name when there is one.
#[derive(Debug, Clone)]
pub struct RecipeError {
    pub span: Option<Span>,
    pub message: String,
    pub suggestion: Option<String>,
}

impl RecipeError {
    pub fn new(span: Option<Span>, message: impl Into<String>) -> Self {
        RecipeError {
            span,
            message: message.into(),
            suggestion: None,
        }
    }

    /// Wrap a deserialisation error of a section or component, prefixing `context`
    /// (for example "encoder `vit`: params").
    pub fn from_de(context: &str, e: DeError) -> Self {
        let path = e.path_string();
        let what = match (context.is_empty(), path.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("`{path}`: "),
            (false, true) => format!("{context}: "),
            (false, false) => format!("{context}.{path}: "),
        };
        RecipeError {
            span: e.span,
            message: format!("{what}{}", e.message),
            suggestion: e.suggestion,
        }
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(span) = &self.span {
            write!(f, "{span}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, "; did you mean `{s}`?")?;
        }
        Ok(())
    }
}

impl std::error::Error for RecipeError {}

/// What to do with an image that cannot be decoded (`data.bad_images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BadImages {
    /// Stop the run, naming the file.
    #[default]
    Fail,
    /// Log the file, use the next readable image in its place, count it per epoch.
    Skip,
}

/// Dataset formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataFormat {
    /// MNIST / Fashion-MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    Idx,
    /// CIFAR-10 (`data_batch_*.bin`, `test_batch.bin`) or CIFAR-100 (`train.bin`, `test.bin`).
    Cifar,
    /// `root/train/<class>/*.{png,jpg}` and `root/val/<class>/...`.
    ImageFolder,
    /// Every `.png`/`.jpg` under `root` (or `root/train`, `root/val`), in any sub-folder, without
    /// labels: for pretraining on unlabeled collections.
    Images,
    /// WebDataset-style tar shards: `root/*.tar` (or `root/train/*.tar`, `root/val/*.tar`), each
    /// sample a `KEY.jpg` (or `.jpeg`, `.png`) member with an optional `KEY.cls` label.
    Shards,
    /// Random images with class-dependent structure, for tests and benchmarks.
    Synthetic,
}

/// Pretraining augmentation (MAE: RandomResizedCrop scale (0.2, 1) + horizontal flip).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentSpec {
    /// Random resized crop area range, as a fraction of the image.
    pub crop_scale: (f64, f64),
    /// Random resized crop aspect-ratio range.
    pub crop_ratio: (f64, f64),
    /// Flip horizontally with probability 0.5.
    pub hflip: bool,
    /// Resampling filter of the crop, antialiased when shrinking (as Pillow's); evaluation
    /// resizes with the same filter.
    pub interpolation: Interpolation,
}

/// Resampling filter (`data.augment.interpolation`), Pillow's definitions: a convolution whose
/// support widens with the downscaling factor, so shrinking averages instead of aliasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Interpolation {
    /// Cubic convolution with a = -0.5 (MAE's `interpolation=3`).
    #[default]
    Bicubic,
    /// Triangle filter.
    Bilinear,
}

impl Default for AugmentSpec {
    fn default() -> Self {
        AugmentSpec {
            crop_scale: (0.2, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
            interpolation: Interpolation::Bicubic,
        }
    }
}

/// `data: (...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    pub format: DataFormat,
    /// Folder holding the files; relative paths are taken from the working directory.
    pub root: String,
    /// Side of the square images fed to the model.
    pub image_size: usize,
    pub channels: usize,
    pub num_classes: usize,
    /// Per-channel normalisation; empty means the format's usual values.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// `None` disables augmentation (images are only resized).
    pub augment: Option<AugmentSpec>,
    /// Use only the first N training images.
    pub train_limit: Option<usize>,
    /// Use only the first N evaluation images.
    pub eval_limit: Option<usize>,
    /// Decoding/augmentation worker threads.
    pub workers: usize,
    /// Images in the synthetic training set.
    pub synthetic_size: usize,
    /// Unreadable images (corrupt or truncated files): `Fail` (default) or `Skip`.
    pub bad_images: BadImages,
    /// `Shards`: samples held in the shuffle buffer (the order within an epoch mixes samples at
    /// most this far apart in the shards, which are themselves shuffled).
    pub shuffle_buffer: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            format: DataFormat::Synthetic,
            root: String::new(),
            image_size: 224,
            channels: 3,
            num_classes: 10,
            mean: Vec::new(),
            std: Vec::new(),
            augment: Some(AugmentSpec::default()),
            train_limit: None,
            eval_limit: None,
            workers: 2,
            synthetic_size: 512,
            bad_images: BadImages::Fail,
            shuffle_buffer: 1000,
        }
    }
}

/// `optimizer: (...)`: AdamW with MAE's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Base learning rate; lr = blr * effective_batch / 256.
    pub blr: f64,
    /// Absolute learning rate; overrides `blr` when set.
    pub lr: Option<f64>,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Applied to weights of rank >= 2 only (not biases, norms, tokens).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub clip_grad: Option<f64>,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            blr: 1.5e-4,
            lr: None,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.05,
            clip_grad: None,
        }
    }
}

/// `schedule: (...)`: linear warmup then per-iteration half-cosine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSpec {
    pub warmup_epochs: f64,
    pub min_lr: f64,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        ScheduleSpec {
            warmup_epochs: 40.0,
            min_lr: 0.0,
        }
    }
}

/// `train: (...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    pub epochs: usize,
    /// Images per forward/backward pass.
    pub batch_size: usize,
    /// Passes per optimizer step; effective batch = batch_size * accum_steps.
    pub accum_steps: usize,
    /// Log a line (and a metrics row) every N optimizer steps.
    pub log_every: usize,
    /// Write a checkpoint every N epochs (and always at the end).
    pub checkpoint_every: usize,
    /// Also write a checkpoint every N optimizer steps within an epoch (0: only at epoch
    /// ends); kept until the epoch's own checkpoint is written. For long epochs.
    pub checkpoint_steps: usize,
    /// Keep only the newest K checkpoints of the run (0: keep all, as MAE does).
    pub keep_checkpoints: usize,
    /// Optimizer steps whose loss or gradients are NaN or infinite that may be skipped (no
    /// update) before the run stops; 0: stop at the first. Counted per `umae run` process.
    pub skip_nonfinite: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            epochs: 200,
            batch_size: 64,
            accum_steps: 1,
            log_every: 20,
            checkpoint_every: 1,
            checkpoint_steps: 0,
            keep_checkpoints: 0,
            skip_nonfinite: 0,
        }
    }
}

/// Which encoder feature the offline evaluations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeaturePool {
    /// What the encoder's own `pool` parameter gives.
    Model,
    /// The class token.
    Cls,
    /// The mean of the patch tokens.
    Mean,
}

impl FeaturePool {
    /// The command-line spelling: `model`, `cls` or `mean`.
    pub fn parse(s: &str) -> Result<FeaturePool, String> {
        match s {
            "model" => Ok(FeaturePool::Model),
            "cls" => Ok(FeaturePool::Cls),
            "mean" => Ok(FeaturePool::Mean),
            _ => Err(format!("unknown pooling `{s}`: use cls, mean or model")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FeaturePool::Model => "model",
            FeaturePool::Cls => "cls",
            FeaturePool::Mean => "mean",
        }
    }

    /// `[B, D]` from an encoder output.
    pub fn apply(
        self,
        out: crate::EncoderOutput,
    ) -> Result<burn::tensor::Tensor<crate::B, 2>, String> {
        let [b, t, d] = out.tokens.dims();
        match self {
            FeaturePool::Model => Ok(out.pooled),
            FeaturePool::Cls if out.prefix == 0 => {
                Err("this encoder has no class token: use --pool mean (or model)".to_string())
            }
            FeaturePool::Cls => Ok(out.tokens.narrow(1, 0, 1).reshape([b, d])),
            FeaturePool::Mean => Ok(out
                .tokens
                .narrow(1, out.prefix, t - out.prefix)
                .mean_dim(1)
                .reshape([b, d])),
        }
    }
}

/// The optimizer of the offline linear probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeOptimizer {
    /// Layer-wise adaptive rate scaling (You et al. 2017), trust coefficient 0.001, as MAE.
    Lars,
    /// SGD with momentum.
    Sgd,
    /// Multinomial logistic regression on standardised features, full batch, by L-BFGS with a
    /// strong-Wolfe line search and an L2 penalty, to convergence (the classic protocol for
    /// frozen features that fit in memory; `epochs`, `batch_size`, `blr` do not apply).
    Lbfgs,
}

/// Offline linear probe (MAE's protocol; the batch is sized for small datasets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearSpec {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate: lr = blr * batch_size / 256.
    pub blr: f64,
    pub warmup_epochs: usize,
    pub optimizer: ProbeOptimizer,
    pub momentum: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// `Lbfgs`: the L2 penalty lambda on the mean loss, `lambda / 2 * |W|^2`; `None`: 1 / the
    /// number of training images (scikit-learn's `C = 1`).
    pub l2: Option<f64>,
    /// `Lbfgs`: at most this many iterations.
    pub max_iter: usize,
}

impl Default for LinearSpec {
    fn default() -> Self {
        LinearSpec {
            epochs: 90,
            batch_size: 256,
            blr: 0.1,
            warmup_epochs: 10,
            optimizer: ProbeOptimizer::Lars,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
            l2: None,
            max_iter: 1000,
        }
    }
}

/// Weighted kNN on L2-normalised features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnnSpec {
    pub k: usize,
    pub temperature: f64,
}

impl Default for KnnSpec {
    fn default() -> Self {
        KnnSpec {
            k: 20,
            temperature: 0.07,
        }
    }
}

/// Full fine-tuning with a linear classification head (MAE's fine-tuning defaults, without
/// mixup, cutmix and RandAugment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneSpec {
    pub epochs: usize,
    pub batch_size: usize,
    /// Base learning rate: lr = blr * batch_size / 256.
    pub blr: f64,
    pub warmup_epochs: usize,
    /// Block k of L gets lr * layer_decay^(L + 1 - k); the patch embedding and tokens count as
    /// layer 0, the head as layer L + 1.
    pub layer_decay: f64,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    /// Stochastic depth at the last block (linearly less in earlier blocks).
    pub drop_path: f64,
    pub seed: u64,
}

impl Default for FinetuneSpec {
    fn default() -> Self {
        FinetuneSpec {
            epochs: 50,
            batch_size: 64,
            blr: 1e-3,
            warmup_epochs: 5,
            layer_decay: 0.75,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            drop_path: 0.1,
            seed: 0,
        }
    }
}

/// `eval: (...)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    /// Train a linear classifier on detached pooled features alongside pretraining
    /// (Appendix B.5 of the paper) and report its test accuracy every epoch.
    pub online_probe: bool,
    /// Constant learning rate of the online probe (AdamW, no weight decay). The probe only
    /// measures the features, so it is not tied to the pretraining schedule.
    pub probe_lr: f64,
    /// Effective rank of pooled features on this many test images (0: off).
    pub erank_samples: usize,
    /// Compute the effective rank every this many epochs (and after the last).
    pub erank_every: usize,
    /// Offline linear probe on frozen features after the last epoch (and every
    /// `offline_every` epochs), as `umae eval linear`.
    pub linear: Option<LinearSpec>,
    /// Weighted kNN after the last epoch (and every `offline_every` epochs).
    pub knn: Option<KnnSpec>,
    /// Fine-tune a copy of the encoder after the last epoch, as `umae eval finetune`.
    pub finetune: Option<FinetuneSpec>,
    /// Also run `linear` / `knn` every this many epochs (0: only after the last).
    pub offline_every: usize,
    /// Feature for `linear` and `knn`.
    pub pool: FeaturePool,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            online_probe: true,
            probe_lr: 1e-3,
            erank_samples: 0,
            erank_every: 1,
            linear: None,
            knn: None,
            finetune: None,
            offline_every: 0,
            pool: FeaturePool::Model,
        }
    }
}

impl EvalSpec {
    /// The evaluations that measure class accuracy (and so need labels), each as the setting
    /// that turns it off.
    pub fn needs_labels(&self) -> Vec<&'static str> {
        [
            (self.online_probe, "online_probe: false"),
            (self.linear.is_some(), "linear: None"),
            (self.knn.is_some(), "knn: None"),
            (self.finetune.is_some(), "finetune: None"),
        ]
        .into_iter()
        .filter_map(|(on, off)| on.then_some(off))
        .collect()
    }
}

/// `output: (...)`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSpec {
    /// Run directory; default `runs/<name>`.
    pub dir: Option<String>,
}

/// One plugin slot of a recipe.
#[derive(Debug, Clone)]
pub struct ComponentSpec {
    pub plugin: String,
    /// Where the plugin name was written.
    pub span: Span,
    /// The `params: (...)` node (an empty struct when absent).
    pub params: Node,
}

/// One regularizer entry: a plugin and its weight (lambda in Eq. 10).
#[derive(Debug, Clone)]
pub struct RegularizerSpec {
    pub component: ComponentSpec,
    pub weight: f64,
}

/// A fully resolved recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N` or `tch`; the command line's `--device` wins.
    pub device: Option<String>,
    /// Precision of the matrix products while training (`F32` or `Bf16`).
    pub precision: crate::precision::Precision,
    /// Dynamic plugin libraries to load before the components are built.
    pub plugins: Vec<String>,
    pub data: DataSpec,
    pub masker: ComponentSpec,
    pub encoder: ComponentSpec,
    pub decoder: ComponentSpec,
    pub target: ComponentSpec,
    pub regularizers: Vec<RegularizerSpec>,
    pub optimizer: OptimizerSpec,
    pub schedule: ScheduleSpec,
    pub train: TrainSpec,
    pub eval: EvalSpec,
    pub output: OutputSpec,
    /// The merged document, for saving the exact recipe beside a run.
    pub tree: Node,
}

/// Top-level fields of a recipe.
pub const FIELDS: &[&str] = &[
    "name",
    "base",
    "seed",
    "device",
    "precision",
    "plugins",
    "data",
    "masker",
    "encoder",
    "decoder",
    "target",
    "regularizers",
    "optimizer",
    "schedule",
    "train",
    "eval",
    "output",
];

const COMPONENT_FIELDS: &[&str] = &["plugin", "params"];
const REGULARIZER_FIELDS: &[&str] = &["plugin", "weight", "params"];

impl Recipe {
    /// Load a recipe file, resolve its `base` chain and apply `--set key.path=value` overrides.
    pub fn load(path: &Path, sets: &[String]) -> Result<Recipe, RecipeError> {
        let mut seen = HashSet::new();
        let mut tree = load_tree(path, &mut seen)?;
        for s in sets {
            apply_set(&mut tree, s)?;
        }
        Recipe::from_tree(tree, path)
    }

    /// Parse a recipe from text (no `base` allowed), for tests and tools.
    pub fn from_str(text: &str, name: &str) -> Result<Recipe, RecipeError> {
        let tree = parse(text, name).map_err(|e| RecipeError::new(Some(e.span), e.message))?;
        if let Some(b) = tree.field("base") {
            return Err(RecipeError::new(
                Some(b.name_span.clone()),
                "`base` needs a recipe file; use Recipe::load",
            ));
        }
        Recipe::from_tree(tree, Path::new(name))
    }

    fn from_tree(tree: Node, path: &Path) -> Result<Recipe, RecipeError> {
        let fields = tree.fields().ok_or_else(|| {
            RecipeError::new(
                Some(tree.span.clone()),
                format!(
                    "a recipe is a struct `Recipe(name: ..., ...)`, found {}",
                    tree.kind.describe()
                ),
            )
        })?;
        for f in fields {
            if !FIELDS.contains(&f.name.as_str()) {
                return Err(RecipeError {
                    span: Some(f.name_span.clone()),
                    message: format!(
                        "unknown recipe field `{}` (valid: {})",
                        f.name,
                        FIELDS.join(", ")
                    ),
                    suggestion: crate::suggest::nearest(&f.name, FIELDS.iter().copied()),
                });
            }
        }
        let section = |name: &str| -> Option<&Node> { tree.get(name) };
        fn typed<T: serde::de::DeserializeOwned + Default>(
            name: &str,
            node: Option<&Node>,
        ) -> Result<T, RecipeError> {
            match node {
                None => Ok(T::default()),
                Some(n) => from_node(n).map_err(|e| RecipeError::from_de(name, e)),
            }
        }
        let name = match section("name") {
            Some(n) => from_node::<String>(n).map_err(|e| RecipeError::from_de("name", e))?,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let component = |slot: &str| -> Result<ComponentSpec, RecipeError> {
            let node = section(slot).ok_or_else(|| {
                RecipeError::new(
                    Some(tree.span.clone()),
                    format!("the recipe has no `{slot}`: add `{slot}: (plugin: \"...\")` (see `umae plugins`)"),
                )
            })?;
            read_component(slot, node, COMPONENT_FIELDS)
        };
        let regularizers = match section("regularizers") {
            None => Vec::new(),
            Some(n) => {
                let Kind::Seq(items) = &n.kind else {
                    return Err(RecipeError::new(
                        Some(n.span.clone()),
                        format!(
                            "`regularizers` is a list `[(plugin: ..., weight: ...)]`, found {}",
                            n.kind.describe()
                        ),
                    ));
                };
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let slot = format!("regularizers[{i}]");
                        let component = read_component(&slot, item, REGULARIZER_FIELDS)?;
                        let weight = match item.get("weight") {
                            Some(w) => from_node::<f64>(w)
                                .map_err(|e| RecipeError::from_de(&format!("{slot}.weight"), e))?,
                            None => 1.0,
                        };
                        if !weight.is_finite() {
                            return Err(RecipeError::new(
                                item.get("weight").map(|w| w.span.clone()),
                                format!("{slot}.weight must be a finite number, found {weight}"),
                            ));
                        }
                        Ok(RegularizerSpec { component, weight })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let recipe = Recipe {
            name,
            path: path.to_path_buf(),
            seed: typed("seed", section("seed"))?,
            device: typed("device", section("device"))?,
            precision: typed("precision", section("precision"))?,
            plugins: typed("plugins", section("plugins"))?,
            data: typed("data", section("data"))?,
            masker: component("masker")?,
            encoder: component("encoder")?,
            decoder: component("decoder")?,
            target: component("target")?,
            regularizers,
            optimizer: typed("optimizer", section("optimizer"))?,
            schedule: typed("schedule", section("schedule"))?,
            train: typed("train", section("train"))?,
            eval: typed("eval", section("eval"))?,
            output: typed("output", section("output"))?,
            tree: tree.clone(),
        };
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks of values that types alone cannot express.
    fn validate(&self) -> Result<(), RecipeError> {
        let at = |section: &str, field: &str| -> Option<Span> {
            let s = self.tree.get(section)?;
            Some(s.get(field).map_or(s.span.clone(), |n| n.span.clone()))
        };
        let positive = [
            ("train", "epochs", self.train.epochs),
            ("train", "batch_size", self.train.batch_size),
            ("train", "accum_steps", self.train.accum_steps),
            ("train", "log_every", self.train.log_every),
            ("train", "checkpoint_every", self.train.checkpoint_every),
            ("data", "image_size", self.data.image_size),
            ("data", "channels", self.data.channels),
            ("data", "num_classes", self.data.num_classes),
            ("data", "workers", self.data.workers),
            ("data", "shuffle_buffer", self.data.shuffle_buffer),
        ];
        for (section, field, v) in positive {
            if v == 0 {
                return Err(RecipeError::new(
                    at(section, field),
                    format!("{section}.{field} must be at least 1"),
                ));
            }
        }
        let o = &self.optimizer;
        let finite_nonneg = [
            ("blr", o.blr),
            ("eps", o.eps),
            ("weight_decay", o.weight_decay),
        ];
        for (field, v) in finite_nonneg {
            if !v.is_finite() || v < 0.0 {
                return Err(RecipeError::new(
                    at("optimizer", field),
                    format!("optimizer.{field} must be a finite number >= 0, found {v}"),
                ));
            }
        }
        if let Some(lr) = o.lr {
            if !lr.is_finite() || lr < 0.0 {
                return Err(RecipeError::new(
                    at("optimizer", "lr"),
                    format!("optimizer.lr must be a finite number >= 0, found {lr}"),
                ));
            }
        }
        for (i, b) in [o.betas.0, o.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&b) {
                return Err(RecipeError::new(
                    at("optimizer", "betas"),
                    format!("optimizer.betas.{i} must be in [0, 1), found {b}"),
                ));
            }
        }
        if !(self.eval.probe_lr.is_finite() && self.eval.probe_lr >= 0.0) {
            return Err(RecipeError::new(
                at("eval", "probe_lr"),
                "eval.probe_lr must be a finite number >= 0",
            ));
        }
        if !self.schedule.warmup_epochs.is_finite() || self.schedule.warmup_epochs < 0.0 {
            return Err(RecipeError::new(
                at("schedule", "warmup_epochs"),
                "schedule.warmup_epochs must be a finite number >= 0",
            ));
        }
        let d = &self.data;
        if (!d.mean.is_empty() && d.mean.len() != d.channels)
            || (!d.std.is_empty() && d.std.len() != d.channels)
        {
            return Err(RecipeError::new(
                at("data", "mean"),
                format!(
                    "data.mean and data.std need one value per channel ({})",
                    d.channels
                ),
            ));
        }
        if d.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(RecipeError::new(
                at("data", "std"),
                "data.std values must be > 0",
            ));
        }
        if let Some(l2) = self.eval.linear.as_ref().and_then(|l| l.l2) {
            if !(l2.is_finite() && l2 >= 0.0) {
                return Err(RecipeError::new(
                    at("eval", "linear"),
                    format!("eval.linear.l2 must be a finite number >= 0, found {l2}"),
                ));
            }
        }
        let needs = self.eval.needs_labels();
        if d.format == DataFormat::Images && !needs.is_empty() {
            return Err(RecipeError::new(
                at("data", "format"),
                format!(
                    "data.format Images has no labels, but the eval section measures class accuracy: set eval: ({}) to pretrain without labels (eval.erank_samples needs none), or use format: ImageFolder with one folder per class",
                    needs.join(", ")
                ),
            ));
        }
        if let Some(a) = &d.augment {
            let (lo, hi) = a.crop_scale;
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return Err(RecipeError::new(at("data", "augment"), format!("data.augment.crop_scale must satisfy 0 < min <= max <= 1, found ({lo}, {hi})")));
            }
            let (lo, hi) = a.crop_ratio;
            if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
                return Err(RecipeError::new(
                    at("data", "augment"),
                    format!(
                        "data.augment.crop_ratio must satisfy 0 < min <= max, found ({lo}, {hi})"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The learning rate at the peak of the schedule.
    /// The peak learning rate on one device (`lr`, or MAE's `blr * effective batch / 256`).
    pub fn peak_lr(&self) -> f64 {
        self.peak_lr_on(1)
    }

    /// The peak learning rate when training data-parallel on `devices` devices.
    pub fn peak_lr_on(&self, devices: usize) -> f64 {
        self.optimizer
            .lr
            .unwrap_or(self.optimizer.blr * self.effective_batch_on(devices) as f64 / 256.0)
    }

    /// Images per optimizer step on one device: `batch_size x accum_steps`.
    pub fn effective_batch(&self) -> usize {
        self.effective_batch_on(1)
    }

    /// Images per optimizer step on `devices` devices (`train.batch_size` is per device, as in
    /// MAE's `--batch_size`).
    pub fn effective_batch_on(&self, devices: usize) -> usize {
        self.train.batch_size * self.train.accum_steps * devices
    }
}

fn read_component(slot: &str, node: &Node, allowed: &[&str]) -> Result<ComponentSpec, RecipeError> {
    let fields = node.fields().ok_or_else(|| {
        RecipeError::new(
            Some(node.span.clone()),
            format!(
                "`{slot}` is a struct `(plugin: \"name\", params: (...))`, found {}",
                node.kind.describe()
            ),
        )
    })?;
    for f in fields {
        if !allowed.contains(&f.name.as_str()) {
            return Err(RecipeError {
                span: Some(f.name_span.clone()),
                message: format!(
                    "unknown field `{}` in `{slot}` (valid: {})",
                    f.name,
                    allowed.join(", ")
                ),
                suggestion: crate::suggest::nearest(&f.name, allowed.iter().copied()),
            });
        }
    }
    let plugin = node.get("plugin").ok_or_else(|| {
        RecipeError::new(
            Some(node.span.clone()),
            format!("`{slot}` needs `plugin: \"name\"`"),
        )
    })?;
    let name = from_node::<String>(plugin)
        .map_err(|e| RecipeError::from_de(&format!("{slot}.plugin"), e))?;
    let params = match node.get("params") {
        Some(p) => p.clone(),
        None => Node::new(Kind::Struct(None, Vec::new()), node.span.clone()),
    };
    Ok(ComponentSpec {
        plugin: name,
        span: plugin.span.clone(),
        params,
    })
}

fn load_tree(path: &Path, seen: &mut HashSet<PathBuf>) -> Result<Node, RecipeError> {
    let canonical = path.canonicalize().map_err(|e| {
        RecipeError::new(None, format!("cannot read recipe {}: {e}", path.display()))
    })?;
    if !seen.insert(canonical.clone()) {
        return Err(RecipeError::new(
            None,
            format!("recipe {} is its own base (a `base` cycle)", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        RecipeError::new(None, format!("cannot read recipe {}: {e}", path.display()))
    })?;
    let mut tree = parse(&text, &path.display().to_string())
        .map_err(|e| RecipeError::new(Some(e.span), e.message))?;
    let Kind::Struct(_, fields) = &mut tree.kind else {
        return Ok(tree);
    };
    let Some(i) = fields.iter().position(|f| f.name == "base") else {
        return Ok(tree);
    };
    let base_field: Field = fields.remove(i);
    let base_name = match &base_field.value.kind {
        Kind::Opt(None) => return Ok(tree),
        _ => base_field.value.as_str().ok_or_else(|| {
            RecipeError::new(
                Some(base_field.value.span.clone()),
                "`base` is a file name: `base: Some(\"mae-vitb.ron\")`",
            )
        })?,
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base_name);
    let mut base = load_tree(&base_path, seen).map_err(|mut e| {
        if e.span.is_none() {
            e.span = Some(base_field.value.span.clone());
        }
        e
    })?;
    merge_recipe(&mut base, tree);
    Ok(base)
}

/// Merge a child recipe over its base. A component slot whose plugin changes is replaced whole
/// (the old plugin's parameters would not fit the new one); otherwise fields merge recursively.
fn merge_recipe(base: &mut Node, child: Node) {
    let Kind::Struct(_, child_fields) = child.kind else {
        *base = child;
        return;
    };
    for f in child_fields {
        let replaces_plugin = ["masker", "encoder", "decoder", "target"].contains(&f.name.as_str())
            && match (
                base.get(&f.name).and_then(|b| b.get("plugin")),
                f.value.get("plugin"),
            ) {
                (Some(a), Some(b)) => a.as_str() != b.as_str(),
                _ => false,
            };
        let Kind::Struct(_, base_fields) = &mut base.kind else {
            unreachable!()
        };
        match base_fields.iter_mut().find(|b| b.name == f.name) {
            Some(b) if replaces_plugin => *b = f,
            Some(b) => b.value.merge(f.value),
            None => base_fields.push(f),
        }
    }
}

/// Apply one `key.path=value` override. The value is RON (`10`, `1e-4`, `Some(2)`, `Cls`); a
/// value that is not valid RON is taken as a string (`--set output.dir=runs/a`).
pub fn apply_set(tree: &mut Node, set: &str) -> Result<(), RecipeError> {
    let source: Arc<str> = Arc::from(format!("--set {set}"));
    let span = Span {
        source: source.clone(),
        line: 1,
        col: 1,
    };
    let (key, value) = set.split_once('=').ok_or_else(|| {
        RecipeError::new(
            Some(span.clone()),
            "expected `path.to.field=value`, for example `train.epochs=10`",
        )
    })?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(RecipeError::new(
            Some(span),
            format!("`{key}` is not a field path like `train.epochs`"),
        ));
    }
    if !FIELDS.contains(&path[0]) || path[0] == "base" {
        return Err(RecipeError {
            span: Some(span),
            message: format!("unknown recipe field `{}`", path[0]),
            suggestion: crate::suggest::nearest(path[0], FIELDS.iter().copied()),
        });
    }
    let value = value.trim();
    let mut node = parse(value, &source)
        .unwrap_or_else(|_| Node::new(Kind::Str(value.to_string()), span.clone()));
    relabel(&mut node, &span);
    tree.set_path(&path, node)
        .map_err(|m| RecipeError::new(Some(span), m))
}

fn relabel(node: &mut Node, span: &Span) {
    node.span = span.clone();
    match &mut node.kind {
        Kind::Opt(Some(n)) => relabel(n, span),
        Kind::Seq(items) | Kind::Tuple(_, items) => items.iter_mut().for_each(|n| relabel(n, span)),
        Kind::Struct(_, fields) => fields.iter_mut().for_each(|f| {
            f.name_span = span.clone();
            relabel(&mut f.value, span)
        }),
        Kind::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            relabel(k, span);
            relabel(v, span)
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"Recipe(
    name: "t",
    masker: (plugin: "random", params: (ratio: 0.75)),
    encoder: (plugin: "vit"),
    decoder: (plugin: "mae"),
    target: (plugin: "pixels"),
    regularizers: [(plugin: "uniformity", weight: 1e-4, params: (tau: 0.1))],
    train: (epochs: 3),
)"#;

    #[test]
    fn reads_sections_with_defaults() {
        let r = Recipe::from_str(MINI, "t.ron").unwrap();
        assert_eq!(r.train.epochs, 3);
        assert_eq!(r.train.batch_size, 64);
        assert_eq!(r.optimizer.betas, (0.9, 0.95));
        assert_eq!(r.optimizer.weight_decay, 0.05);
        assert_eq!(r.regularizers[0].weight, 1e-4);
        assert_eq!(r.regularizers[0].component.plugin, "uniformity");
        assert_eq!(r.masker.params.get("ratio").unwrap().as_f64(), Some(0.75));
    }

    #[test]
    fn misspelled_section_field_is_located_and_suggested() {
        let text = MINI.replace("train: (epochs: 3)", "train: (epoch: 3)");
        let e = Recipe::from_str(&text, "t.ron").unwrap_err();
        let span = e.span.clone().unwrap();
        assert_eq!((span.line, span.col), (8, 13), "{e}");
        assert_eq!(e.suggestion.as_deref(), Some("epochs"), "{e}");
        assert!(e.to_string().starts_with("t.ron:8:13: train"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let text = MINI.replace("epochs: 3", "epochs: \"three\"");
        let e = Recipe::from_str(&text, "t.ron").unwrap_err();
        assert!(e.message.contains("train.epochs"), "{e}");
    }

    #[test]
    fn set_overrides_and_rejects_unknown_roots() {
        let mut tree = parse(MINI, "t.ron").unwrap();
        apply_set(&mut tree, "train.epochs=7").unwrap();
        apply_set(&mut tree, "regularizers.0.weight=0.5").unwrap();
        apply_set(&mut tree, "output.dir=runs/x").unwrap();
        let r = Recipe::from_tree(tree.clone(), Path::new("t.ron")).unwrap();
        assert_eq!(r.train.epochs, 7);
        assert_eq!(r.regularizers[0].weight, 0.5);
        assert_eq!(r.output.dir.as_deref(), Some("runs/x"));
        let e = apply_set(&mut tree, "trian.epochs=1").unwrap_err();
        assert_eq!(e.suggestion.as_deref(), Some("train"));
        assert!(apply_set(&mut tree, "train.epochs").is_err());
    }

    #[test]
    fn zero_batch_is_rejected() {
        let text = MINI.replace("epochs: 3", "epochs: 3, batch_size: 0");
        let e = Recipe::from_str(&text, "t.ron").unwrap_err();
        assert!(e.message.contains("batch_size"), "{e}");
    }
}
