//! Datasets (IDX, CIFAR binary, image folders, synthetic), augmentation, and a loader that
//! decodes and augments on worker threads ahead of the trainer, in a deterministic order.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use umae_api::recipe::{AugmentSpec, DataFormat, DataSpec};
use umae_api::Rng;

/// A decoded image: channels x height x width, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// Random-access images with labels.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn get(&self, index: usize) -> Result<(Image, usize), String>;
    /// The label alone (formats that store it apart from the pixels skip decoding).
    fn label(&self, index: usize) -> Result<usize, String> {
        self.get(index).map(|(_, l)| l)
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Images already decoded into memory (IDX, CIFAR, synthetic).
#[derive(Debug)]
pub struct InMemory {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<usize>,
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, index: usize) -> Result<usize, String> {
        self.labels
            .get(index)
            .copied()
            .ok_or_else(|| format!("image {index} is out of range"))
    }
    fn get(&self, index: usize) -> Result<(Image, usize), String> {
        let n = self.channels * self.height * self.width;
        let data = self.pixels[index * n..(index + 1) * n]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        Ok((
            Image {
                channels: self.channels,
                height: self.height,
                width: self.width,
                data,
            },
            self.labels[index],
        ))
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{}: not a valid gzip file: {e}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn find_file(root: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| root.join(n))
        .find(|p| p.exists())
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse IDX image and label files (the MNIST format).
pub fn parse_idx(images: &[u8], labels: &[u8], what: &str) -> Result<InMemory, String> {
    if images.len() < 16 || be_u32(images, 0) != 0x0803 {
        return Err(format!(
            "{what}: not an IDX image file (magic 0x00000803 expected)"
        ));
    }
    if labels.len() < 8 || be_u32(labels, 0) != 0x0801 {
        return Err(format!(
            "{what}: not an IDX label file (magic 0x00000801 expected)"
        ));
    }
    let (n, h, w) = (
        be_u32(images, 4) as usize,
        be_u32(images, 8) as usize,
        be_u32(images, 12) as usize,
    );
    let nl = be_u32(labels, 4) as usize;
    if n != nl {
        return Err(format!("{what}: {n} images but {nl} labels"));
    }
    let want = n
        .checked_mul(h)
        .and_then(|x| x.checked_mul(w))
        .and_then(|x| x.checked_add(16));
    if h == 0 || w == 0 {
        return Err(format!("{what}: images of {h}x{w} pixels"));
    }
    if want != Some(images.len()) {
        return Err(format!(
            "{what}: image file is truncated or padded: {} bytes for {n} images of {h}x{w}",
            images.len()
        ));
    }
    if labels.len() != 8 + n {
        return Err(format!("{what}: label file is truncated or padded"));
    }
    Ok(InMemory {
        channels: 1,
        height: h,
        width: w,
        pixels: images[16..].to_vec(),
        labels: labels[8..].iter().map(|&l| l as usize).collect(),
    })
}

fn load_idx(root: &Path, split: Split) -> Result<InMemory, String> {
    let prefix = match split {
        Split::Train => "train",
        Split::Eval => "t10k",
    };
    let img = find_file(root, &format!("{prefix}-images-idx3-ubyte"));
    let lab = find_file(root, &format!("{prefix}-labels-idx1-ubyte"));
    let (Some(img), Some(lab)) = (img, lab) else {
        let hint = if root.starts_with("/usr/share/datasets/fashion-mnist") {
            " Install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist`."
        } else {
            ""
        };
        return Err(format!(
            "no IDX files `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` in {}.{hint}",
            root.display()
        ));
    };
    parse_idx(
        &read_maybe_gz(&img)?,
        &read_maybe_gz(&lab)?,
        &img.display().to_string(),
    )
}

/// Parse CIFAR binary records: `label_bytes` label bytes (1 for CIFAR-10, 2 for CIFAR-100,
/// the fine label last) then 3x32x32 pixels.
pub fn parse_cifar(
    bytes: &[u8],
    label_bytes: usize,
    what: &str,
    into: &mut InMemory,
) -> Result<(), String> {
    let rec = label_bytes + 3072;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(format!(
            "{what}: {} bytes is not a whole number of {rec}-byte CIFAR records",
            bytes.len()
        ));
    }
    for r in bytes.chunks_exact(rec) {
        into.labels.push(r[label_bytes - 1] as usize);
        into.pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok(())
}

fn load_cifar(root: &Path, split: Split) -> Result<InMemory, String> {
    let mut out = InMemory {
        channels: 3,
        height: 32,
        width: 32,
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    let c10: Vec<PathBuf> = match split {
        Split::Train => (1..=5)
            .map(|i| root.join(format!("data_batch_{i}.bin")))
            .collect(),
        Split::Eval => vec![root.join("test_batch.bin")],
    };
    let c100 = root.join(match split {
        Split::Train => "train.bin",
        Split::Eval => "test.bin",
    });
    if c10.iter().all(|p| p.exists()) {
        for p in &c10 {
            parse_cifar(&read_maybe_gz(p)?, 1, &p.display().to_string(), &mut out)?;
        }
    } else if c100.exists() {
        parse_cifar(
            &read_maybe_gz(&c100)?,
            2,
            &c100.display().to_string(),
            &mut out,
        )?;
    } else {
        return Err(format!(
            "no CIFAR binary files in {}: expected data_batch_1..5.bin and test_batch.bin (CIFAR-10) \
             or train.bin and test.bin (CIFAR-100), from the \"binary version\" archives",
            root.display()
        ));
    }
    Ok(out)
}

/// `root/<class>/<image>` with JPEG or PNG files, decoded on demand.
pub struct ImageFolder {
    pub files: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
    pub channels: usize,
}

impl ImageFolder {
    pub fn open(root: &Path, channels: usize) -> Result<Self, String> {
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(|e| format!("cannot read image folder {}: {e}", root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(root.join(class))
                .map_err(|e| format!("cannot read {}: {e}", root.join(class).display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                    })
                })
                .collect();
            if entries.is_empty() {
                return Err(format!(
                    "class folder {} holds no .png/.jpg images: add images or remove it (every sub-folder of {} is a class)",
                    root.join(class).display(),
                    root.display()
                ));
            }
            entries.sort();
            files.extend(entries.into_iter().map(|p| (p, label)));
        }
        if files.is_empty() {
            return Err(format!(
                "no images in {}: expected one sub-folder per class holding .png/.jpg files",
                root.display()
            ));
        }
        Ok(ImageFolder {
            files,
            classes,
            channels,
        })
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn label(&self, index: usize) -> Result<usize, String> {
        self.files
            .get(index)
            .map(|f| f.1)
            .ok_or_else(|| format!("image {index} is out of range"))
    }
    fn get(&self, index: usize) -> Result<(Image, usize), String> {
        let (path, label) = &self.files[index];
        let img =
            image::open(path).map_err(|e| format!("cannot decode {}: {e}", path.display()))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let data: Vec<f32> = if self.channels == 1 {
            img.to_luma8()
                .into_raw()
                .into_iter()
                .map(|p| p as f32 / 255.0)
                .collect()
        } else {
            let rgb = img.to_rgb8().into_raw();
            // HWC -> CHW
            let mut out = vec![0.0; 3 * h * w];
            for (i, px) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * h * w + i] = px[c] as f32 / 255.0;
                }
            }
            out
        };
        Ok((
            Image {
                channels: self.channels,
                height: h,
                width: w,
                data,
            },
            *label,
        ))
    }
}

/// Images of `classes` kinds: each class a distinct smooth pattern plus noise.
pub fn synthetic(n: usize, channels: usize, size: usize, classes: usize, seed: u64) -> InMemory {
    let mut pixels = Vec::with_capacity(n * channels * size * size);
    let mut labels = Vec::with_capacity(n);
    let mut rng = Rng::new(seed);
    for _ in 0..n {
        let label = rng.below(classes.max(1));
        let (fx, fy) = (1.0 + (label % 4) as f64, 1.0 + (label / 4) as f64);
        let phase = rng.range(0.0, std::f64::consts::TAU);
        for c in 0..channels {
            for y in 0..size {
                for x in 0..size {
                    let u = (x as f64 / size as f64) * fx * std::f64::consts::TAU;
                    let v = (y as f64 / size as f64) * fy * std::f64::consts::TAU;
                    let s =
                        0.5 + 0.35 * (u + v * (c as f64 + 1.0) + phase).sin() + 0.1 * rng.normal();
                    pixels.push((s.clamp(0.0, 1.0) * 255.0) as u8);
                }
            }
        }
        labels.push(label);
    }
    InMemory {
        channels,
        height: size,
        width: size,
        pixels,
        labels,
    }
}

/// Open the dataset a recipe names, for one split. Every error is the data's (or `data.*`
/// settings') fault: a missing root, a malformed file, labels beyond `num_classes`, no images.
pub fn open(spec: &DataSpec, split: Split, seed: u64) -> crate::Result<Arc<dyn Dataset>> {
    open_split(spec, split, seed).map_err(crate::Error::data)
}

fn open_split(spec: &DataSpec, split: Split, seed: u64) -> Result<Arc<dyn Dataset>, String> {
    let root = Path::new(&spec.root);
    let in_range = |m: InMemory, what: &str| -> Result<Arc<dyn Dataset>, String> {
        match m.labels.iter().max() {
            Some(&l) if l >= spec.num_classes => Err(format!(
                "{what} in {} has labels up to {l}, but data.num_classes is {}: set data.num_classes to {} or more",
                root.display(),
                spec.num_classes,
                l + 1
            )),
            _ => Ok(Arc::new(m)),
        }
    };
    let ds: Arc<dyn Dataset> = match spec.format {
        DataFormat::Idx => in_range(load_idx(root, split)?, "the IDX data")?,
        DataFormat::Cifar => in_range(load_cifar(root, split)?, "the CIFAR data")?,
        DataFormat::ImageFolder => {
            let sub = match split {
                Split::Train => "train",
                Split::Eval => "val",
            };
            let dir = if root.join(sub).is_dir() {
                root.join(sub)
            } else {
                root.to_path_buf()
            };
            let folder = ImageFolder::open(&dir, spec.channels)?;
            if folder.classes.len() > spec.num_classes {
                return Err(format!(
                    "{} has {} class folders, but data.num_classes is {}: set data.num_classes to {}",
                    dir.display(),
                    folder.classes.len(),
                    spec.num_classes,
                    folder.classes.len()
                ));
            }
            Arc::new(folder)
        }
        DataFormat::Synthetic => {
            let n = match split {
                Split::Train => spec.synthetic_size,
                Split::Eval => spec.synthetic_size.div_ceil(4),
            };
            let s = seed ^ if split == Split::Eval { 0xE7A1 } else { 0 };
            Arc::new(synthetic(
                n,
                spec.channels,
                spec.image_size,
                spec.num_classes,
                s,
            ))
        }
    };
    if ds.is_empty() {
        return Err(format!("the {:?} split of {} is empty", split, spec.root));
    }
    let limit = match split {
        Split::Train => spec.train_limit,
        Split::Eval => spec.eval_limit,
    };
    Ok(match limit {
        Some(l) if l < ds.len() => Arc::new(Limited { inner: ds, len: l }),
        _ => ds,
    })
}

struct Limited {
    inner: Arc<dyn Dataset>,
    len: usize,
}

impl Dataset for Limited {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<(Image, usize), String> {
        self.inner.get(index)
    }
    fn label(&self, index: usize) -> Result<usize, String> {
        self.inner.label(index)
    }
}

/// Bilinear sample of the crop `(x0, y0, cw, ch)` (in source pixels) to `size x size`.
pub fn resized_crop(
    img: &Image,
    x0: f64,
    y0: f64,
    cw: f64,
    ch: f64,
    size: usize,
    flip: bool,
) -> Vec<f32> {
    let (h, w) = (img.height, img.width);
    let mut out = vec![0.0f32; img.channels * size * size];
    for oy in 0..size {
        let sy = (y0 + (oy as f64 + 0.5) * ch / size as f64 - 0.5).clamp(0.0, (h - 1) as f64);
        let (y_lo, fy) = (sy.floor() as usize, sy - sy.floor());
        let y_hi = (y_lo + 1).min(h - 1);
        for ox in 0..size {
            let tx = if flip { size - 1 - ox } else { ox };
            let sx = (x0 + (tx as f64 + 0.5) * cw / size as f64 - 0.5).clamp(0.0, (w - 1) as f64);
            let (x_lo, fx) = (sx.floor() as usize, sx - sx.floor());
            let x_hi = (x_lo + 1).min(w - 1);
            for c in 0..img.channels {
                let p = |y: usize, x: usize| img.data[(c * h + y) * w + x] as f64;
                let v = (1.0 - fy) * ((1.0 - fx) * p(y_lo, x_lo) + fx * p(y_lo, x_hi))
                    + fy * ((1.0 - fx) * p(y_hi, x_lo) + fx * p(y_hi, x_hi));
                out[(c * size + oy) * size + ox] = v as f32;
            }
        }
    }
    out
}

/// torchvision's RandomResizedCrop: 10 tries at a random area and log-uniform aspect ratio,
/// falling back to a center crop.
pub fn random_resized_crop(img: &Image, size: usize, a: &AugmentSpec, rng: &mut Rng) -> Vec<f32> {
    let (h, w) = (img.height as f64, img.width as f64);
    let area = h * w;
    let (lr0, lr1) = (a.crop_ratio.0.ln(), a.crop_ratio.1.ln());
    let flip = a.hflip && rng.uniform() < 0.5;
    for _ in 0..10 {
        let target = area * rng.range(a.crop_scale.0, a.crop_scale.1);
        let ratio = rng.range(lr0, lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x0 = (rng.uniform() * (w - cw + 1.0)).floor();
            let y0 = (rng.uniform() * (h - ch + 1.0)).floor();
            return resized_crop(img, x0, y0, cw, ch, size, flip);
        }
    }
    let ratio = w / h;
    let (cw, ch) = if ratio < a.crop_ratio.0 {
        (w, (w / a.crop_ratio.0).round())
    } else if ratio > a.crop_ratio.1 {
        ((h * a.crop_ratio.1).round(), h)
    } else {
        (w, h)
    };
    resized_crop(
        img,
        ((w - cw) / 2.0).floor(),
        ((h - ch) / 2.0).floor(),
        cw,
        ch,
        size,
        flip,
    )
}

/// Evaluation transform: images already at `size` pass unchanged; others are resized (shorter
/// side to size / 0.875) and center-cropped, as MAE's evaluation.
pub fn eval_transform(img: &Image, size: usize) -> Vec<f32> {
    if img.height == size && img.width == size {
        return img.data.clone();
    }
    let short = img.height.min(img.width) as f64;
    let crop = short * 0.875;
    let x0 = (img.width as f64 - crop) / 2.0;
    let y0 = (img.height as f64 - crop) / 2.0;
    resized_crop(img, x0, y0, crop, crop, size, false)
}

/// A batch ready for the device: `images` is `[n, C, S, S]`, normalised.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub n: usize,
}

/// Per-channel mean and std for a data spec.
pub fn normalization(spec: &DataSpec) -> (Vec<f32>, Vec<f32>) {
    let c = spec.channels;
    let mean = if spec.mean.is_empty() {
        if c == 3 {
            vec![0.485, 0.456, 0.406]
        } else {
            vec![0.5; c]
        }
    } else {
        spec.mean.clone()
    };
    let std = if spec.std.is_empty() {
        if c == 3 {
            vec![0.229, 0.224, 0.225]
        } else {
            vec![0.5; c]
        }
    } else {
        spec.std.clone()
    };
    (mean, std)
}

/// Everything a worker needs to turn dataset indices into a batch.
#[derive(Clone)]
pub struct Pipeline {
    pub dataset: Arc<dyn Dataset>,
    pub size: usize,
    pub channels: usize,
    pub augment: Option<AugmentSpec>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub seed: u64,
    /// `data.bad_images = Skip`: replace unreadable images instead of failing.
    pub skip_bad: bool,
    /// Images replaced since the last [`Pipeline::take_skipped`].
    skipped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pipeline {
    pub fn new(dataset: Arc<dyn Dataset>, spec: &DataSpec, train: bool, seed: u64) -> Self {
        let (mean, std) = normalization(spec);
        Pipeline {
            dataset,
            size: spec.image_size,
            channels: spec.channels,
            augment: if train { spec.augment.clone() } else { None },
            mean,
            std,
            seed,
            skip_bad: spec.bad_images == umae_api::recipe::BadImages::Skip,
            skipped: Arc::default(),
        }
    }

    /// How many unreadable images were replaced since the last call.
    pub fn take_skipped(&self) -> usize {
        self.skipped.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    /// Image `i` with its label, checked against the recipe's channel count.
    fn load(&self, i: usize) -> Result<(Image, usize), String> {
        let (img, label) = self.dataset.get(i)?;
        if img.channels != self.channels {
            return Err(format!(
                "image {i} has {} channels, the recipe says data.channels = {}",
                img.channels, self.channels
            ));
        }
        Ok((img, label))
    }

    /// Image `i`, or with `skip_bad` the next readable one after it (each unreadable image
    /// logged and counted).
    fn load_or_replace(&self, i: usize) -> Result<(Image, usize), String> {
        let n = self.dataset.len();
        let mut first_error = None;
        for k in 0..n.min(64) {
            match self.load((i + k) % n) {
                Ok(x) => return Ok(x),
                Err(e) if self.skip_bad => {
                    tracing::warn!("{e}: skipped (data.bad_images = Skip)");
                    self.skipped
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    return Err(format!(
                        "{e}; set data.bad_images = Skip to skip unreadable images"
                    ))
                }
            }
        }
        Err(format!(
            "{} and the next images are all unreadable: check the dataset",
            first_error.unwrap_or_default()
        ))
    }

    /// Decode, augment and normalise the images at `indices`. The augmentation of each image is
    /// a function of (seed, epoch, index) only, so batches do not depend on thread timing.
    pub fn batch(&self, indices: &[usize], epoch: u64) -> Result<Batch, String> {
        let s = self.size;
        let mut images = Vec::with_capacity(indices.len() * self.channels * s * s);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (img, label) = self.load_or_replace(i)?;
            let px = match &self.augment {
                Some(a) => {
                    random_resized_crop(&img, s, a, &mut Rng::derive(self.seed, &[epoch, i as u64]))
                }
                None => eval_transform(&img, s),
            };
            for (c, chunk) in px.chunks_exact(s * s).enumerate() {
                images.extend(chunk.iter().map(|v| (v - self.mean[c]) / self.std[c]));
            }
            labels.push(label as i64);
        }
        Ok(Batch {
            images,
            labels,
            n: indices.len(),
        })
    }
}

/// The batches of one pass over a dataset, produced by worker threads ahead of the consumer.
/// Worker `w` prepares batches `w, w + W, ...`; the consumer reads the workers round-robin, so
/// the order is fixed.
pub struct Loader {
    receivers: Vec<crossbeam_channel::Receiver<Result<Batch, String>>>,
    next: usize,
    total: usize,
}

impl Loader {
    /// Batches of `batch` images in the order `order` (a permutation or `0..n`), starting at batch
    /// `skip`. With `drop_last` a final short batch is left out.
    pub fn start(
        pipeline: &Pipeline,
        order: Vec<usize>,
        batch: usize,
        drop_last: bool,
        epoch: u64,
        workers: usize,
    ) -> Loader {
        let total = if drop_last {
            order.len() / batch
        } else {
            order.len().div_ceil(batch)
        };
        let order = Arc::new(order);
        let workers = workers.max(1).min(total.max(1));
        let mut receivers = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = crossbeam_channel::bounded(2);
            let p = pipeline.clone();
            let order = order.clone();
            std::thread::spawn(move || {
                for k in (w..total).step_by(workers) {
                    let end = ((k + 1) * batch).min(order.len());
                    let r = p.batch(&order[k * batch..end], epoch);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
            receivers.push(rx);
        }
        Loader {
            receivers,
            next: 0,
            total,
        }
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(
            rx.recv()
                .unwrap_or_else(|_| Err("a data worker stopped unexpectedly".into())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(n: usize, h: usize, w: usize) -> (Vec<u8>, Vec<u8>) {
        let mut img = vec![0, 0, 8, 3];
        for v in [n, h, w] {
            img.extend((v as u32).to_be_bytes());
        }
        img.extend((0..n * h * w).map(|i| (i % 251) as u8));
        let mut lab = vec![0, 0, 8, 1];
        lab.extend((n as u32).to_be_bytes());
        lab.extend((0..n).map(|i| (i % 10) as u8));
        (img, lab)
    }

    #[test]
    fn idx_parses_and_rejects_bad_files() {
        let (img, lab) = idx_bytes(3, 4, 5);
        let ds = parse_idx(&img, &lab, "t").unwrap();
        assert_eq!(ds.len(), 3);
        let (im, l) = ds.get(2).unwrap();
        assert_eq!((im.height, im.width, l), (4, 5, 2));
        assert_eq!(im.data[0], 40.0 / 255.0);
        assert!(parse_idx(&img[..20], &lab, "t")
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_idx(&lab, &lab, "t").unwrap_err().contains("magic"));
    }

    #[test]
    fn cifar_records() {
        let mut bytes = Vec::new();
        for label in [3u8, 7] {
            bytes.push(label);
            bytes.extend(std::iter::repeat_n(label * 10, 3072));
        }
        let mut ds = InMemory {
            channels: 3,
            height: 32,
            width: 32,
            pixels: vec![],
            labels: vec![],
        };
        parse_cifar(&bytes, 1, "t", &mut ds).unwrap();
        assert_eq!(ds.labels, vec![3, 7]);
        assert_eq!(ds.get(1).unwrap().0.data[100], 70.0 / 255.0);
        assert!(parse_cifar(&bytes[..100], 1, "t", &mut ds).is_err());
    }

    #[test]
    fn crop_of_whole_image_is_identity() {
        let img = Image {
            channels: 1,
            height: 4,
            width: 4,
            data: (0..16).map(|v| v as f32).collect(),
        };
        assert_eq!(resized_crop(&img, 0.0, 0.0, 4.0, 4.0, 4, false), img.data);
        let flipped = resized_crop(&img, 0.0, 0.0, 4.0, 4.0, 4, true);
        assert_eq!(&flipped[..4], &[3.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn loader_is_deterministic_and_complete() {
        let ds: Arc<dyn Dataset> = Arc::new(synthetic(37, 1, 8, 3, 1));
        let spec = DataSpec {
            image_size: 8,
            channels: 1,
            ..Default::default()
        };
        let p = Pipeline::new(ds, &spec, true, 5);
        let order: Vec<usize> = Rng::new(1).permutation(37);
        let a: Vec<Batch> = Loader::start(&p, order.clone(), 8, true, 0, 3)
            .map(|b| b.unwrap())
            .collect();
        let b: Vec<Batch> = Loader::start(&p, order.clone(), 8, true, 0, 1)
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(a.len(), 4);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.images, y.images);
            assert_eq!(x.labels, y.labels);
        }
        let all: Vec<Batch> = Loader::start(&p, order, 8, false, 0, 2)
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(all.iter().map(|b| b.n).sum::<usize>(), 37);
    }
}

#[cfg(test)]
mod folder_tests {
    use super::*;

    #[test]
    fn image_folder_reads_png_and_jpeg_trees() {
        let dir = tempfile::tempdir().unwrap();
        for (class, shade) in [("cat", 40u8), ("dog", 200u8)] {
            let d = dir.path().join("train").join(class);
            std::fs::create_dir_all(&d).unwrap();
            let img = image::RgbImage::from_pixel(12, 10, image::Rgb([shade, shade / 2, 0]));
            img.save(d.join("a.png")).unwrap();
            img.save(d.join("b.jpg")).unwrap();
        }
        std::fs::write(dir.path().join("train/cat/notes.txt"), "not an image").unwrap();
        let spec = DataSpec {
            format: DataFormat::ImageFolder,
            root: dir.path().display().to_string(),
            image_size: 8,
            channels: 3,
            ..Default::default()
        };
        let ds = open(&spec, Split::Train, 0).unwrap();
        assert_eq!(ds.len(), 4);
        let (img, label) = ds.get(3).unwrap();
        assert_eq!((img.channels, img.height, img.width, label), (3, 10, 12, 1));
        assert!((img.data[0] - 200.0 / 255.0).abs() < 0.03);
        let p = Pipeline::new(ds, &spec, false, 0);
        let b = p.batch(&[0, 1, 2, 3], 0).unwrap();
        assert_eq!(b.images.len(), 4 * 3 * 8 * 8);
        assert_eq!(b.labels, vec![0, 0, 1, 1]);
        let empty = tempfile::tempdir().unwrap();
        let e = open(
            &DataSpec {
                root: empty.path().display().to_string(),
                ..spec
            },
            Split::Train,
            0,
        )
        .err()
        .expect("an empty folder is refused");
        assert!(e.to_string().contains("no images"), "{e}");
        assert_eq!(e.input_kind(), Some(crate::InputKind::Data), "{e:?}");
    }
}
