//! Datasets (IDX, CIFAR binary, image folders and trees, tar shards, synthetic), the reference
//! transforms, and a loader that decodes and augments on worker threads ahead of the trainer,
//! in a deterministic order.

mod formats;
mod shards;
pub mod transform;

use std::path::Path;
use std::sync::Arc;

use umae_api::recipe::{AugmentSpec, DataFormat, DataSpec, Interpolation};
use umae_api::Rng;

pub use formats::{parse_cifar, parse_idx, synthetic, ImageFolder, InMemory};
pub use shards::Shards;
pub use transform::{Image, Sample};

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// The order of one epoch over `n` random-access samples.
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    Rng::derive(seed, &[epoch, 0xDA7A]).permutation(n)
}

/// Images with labels.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    /// Sample `index` (pixels, or the encoded file) and its label (0 when unlabeled).
    fn get(&self, index: usize) -> Result<(Sample, usize), String>;
    /// The label alone (formats that store it apart from the pixels skip reading them).
    fn label(&self, index: usize) -> Result<usize, String> {
        self.get(index).map(|(_, l)| l)
    }
    /// Whether the labels are classes (`false`: pretraining data without labels).
    fn labeled(&self) -> bool {
        true
    }
    /// Whether reading follows the storage order ([`Dataset::epoch_order`] is not a free
    /// permutation).
    fn sequential(&self) -> bool {
        false
    }
    /// The order of training epoch `epoch`: a function of (seed, epoch) alone, so a resumed run
    /// sees the same order.
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        shuffled(self.len(), seed, epoch)
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Open the dataset a recipe names, for one split. Every error is the data's (or `data.*`
/// settings') fault: a missing root, a malformed file, labels beyond `num_classes`, no images.
pub fn open(spec: &DataSpec, split: Split, seed: u64) -> crate::Result<Arc<dyn Dataset>> {
    open_split(spec, split, seed).map_err(crate::Error::data)
}

/// `root/train` (or `root/val`) when it is a folder, else `root` itself.
fn split_dir(root: &Path, split: Split) -> std::path::PathBuf {
    let sub = match split {
        Split::Train => "train",
        Split::Eval => "val",
    };
    if root.join(sub).is_dir() {
        root.join(sub)
    } else {
        root.to_path_buf()
    }
}

fn open_split(spec: &DataSpec, split: Split, seed: u64) -> Result<Arc<dyn Dataset>, String> {
    let root = Path::new(&spec.root);
    let labels_fit = |max: Option<usize>, what: &str| -> Result<(), String> {
        match max {
            Some(l) if l >= spec.num_classes => Err(format!(
                "{what} in {} has labels up to {l}, but data.num_classes is {}: set data.num_classes to {} or more",
                root.display(),
                spec.num_classes,
                l + 1
            )),
            _ => Ok(()),
        }
    };
    let in_range = |m: InMemory, what: &str| -> Result<Arc<dyn Dataset>, String> {
        labels_fit(m.labels.iter().max().copied(), what)?;
        Ok(Arc::new(m))
    };
    let ds: Arc<dyn Dataset> = match spec.format {
        DataFormat::Idx => in_range(formats::load_idx(root, split)?, "the IDX data")?,
        DataFormat::Cifar => in_range(formats::load_cifar(root, split)?, "the CIFAR data")?,
        DataFormat::ImageFolder => {
            let dir = split_dir(root, split);
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
        DataFormat::Images => Arc::new(ImageFolder::tree(&split_dir(root, split), spec.channels)?),
        DataFormat::Shards => {
            let shards = Shards::open(&split_dir(root, split), spec.shuffle_buffer)?;
            labels_fit(shards.max_label(), "the shards")?;
            Arc::new(shards)
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

/// The first `len` samples of a dataset.
struct Limited {
    inner: Arc<dyn Dataset>,
    len: usize,
}

impl Dataset for Limited {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<(Sample, usize), String> {
        self.inner.get(index)
    }
    fn label(&self, index: usize) -> Result<usize, String> {
        self.inner.label(index)
    }
    fn labeled(&self) -> bool {
        self.inner.labeled()
    }
    fn sequential(&self) -> bool {
        self.inner.sequential()
    }
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        if self.inner.sequential() {
            let mut o = self.inner.epoch_order(seed, epoch);
            o.retain(|&i| i < self.len);
            o
        } else {
            shuffled(self.len, seed, epoch)
        }
    }
}

/// Why a recipe's `eval` section cannot run on data without labels, or `None` when it can.
pub fn labels_needed(recipe: &umae_api::recipe::Recipe) -> Option<String> {
    let needs = recipe.eval.needs_labels();
    (!needs.is_empty()).then(|| {
        format!(
            "the data in {} has no labels (no .cls members in the shards), but the recipe's eval section measures class accuracy: set eval: ({}) to pretrain without them (eval.erank_samples needs none), or add a KEY.cls member to every sample",
            recipe.data.root,
            needs.join(", ")
        )
    })
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
    /// The evaluation resize's filter (the augmentation's, or bicubic).
    pub interpolation: Interpolation,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub seed: u64,
    /// `data.bad_images = Skip`: replace unreadable images instead of failing.
    pub skip_bad: bool,
    /// `(v / 255 - mean[c]) / std[c]` for every byte `v` of channel `c`.
    table: Arc<Vec<f32>>,
    /// Images replaced since the last [`Pipeline::take_skipped`].
    skipped: Arc<std::sync::atomic::AtomicUsize>,
}

impl Pipeline {
    pub fn new(dataset: Arc<dyn Dataset>, spec: &DataSpec, train: bool, seed: u64) -> Self {
        let (mean, std) = normalization(spec);
        let table = (0..spec.channels)
            .flat_map(|c| (0..256).map(move |v| (c, v)))
            .map(|(c, v)| (v as f32 / 255.0 - mean[c]) / std[c])
            .collect();
        Pipeline {
            dataset,
            size: spec.image_size,
            channels: spec.channels,
            augment: if train { spec.augment.clone() } else { None },
            interpolation: spec
                .augment
                .as_ref()
                .map_or(Interpolation::Bicubic, |a| a.interpolation),
            mean,
            std,
            seed,
            skip_bad: spec.bad_images == umae_api::recipe::BadImages::Skip,
            table: Arc::new(table),
            skipped: Arc::default(),
        }
    }

    /// How many unreadable images were replaced since the last call.
    pub fn take_skipped(&self) -> usize {
        self.skipped.swap(0, std::sync::atomic::Ordering::SeqCst)
    }

    /// The view of sample `i` (`size x size`, interleaved) with its label; `rng` draws the
    /// augmentation.
    pub fn view(&self, i: usize, rng: &mut Rng) -> Result<(Vec<u8>, usize), String> {
        let (sample, label) = self.dataset.get(i)?;
        if let Sample::Pixels(img) = &sample {
            if img.channels != self.channels {
                return Err(format!(
                    "image {i} has {} channels, the recipe says data.channels = {}",
                    img.channels, self.channels
                ));
            }
        }
        let px = match &self.augment {
            Some(a) => transform::train_view(sample, self.channels, self.size, a, rng)?,
            None => transform::eval_view(sample, self.channels, self.size, self.interpolation)?,
        };
        Ok((px, label))
    }

    /// The view of image `i`, or with `skip_bad` of the next readable one after it (each
    /// unreadable image logged and counted). The augmentation is drawn from (seed, epoch, i).
    fn view_or_replace(&self, i: usize, epoch: u64) -> Result<(Vec<u8>, usize), String> {
        let n = self.dataset.len();
        let mut first_error = None;
        for k in 0..n.min(64) {
            let mut rng = Rng::derive(self.seed, &[epoch, i as u64]);
            match self.view((i + k) % n, &mut rng) {
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

    /// Decode, augment and normalise the images at `indices` into `[n, C, S, S]`. The
    /// augmentation of each image is a function of (seed, epoch, index) only, so batches do not
    /// depend on thread timing.
    pub fn batch(&self, indices: &[usize], epoch: u64) -> Result<Batch, String> {
        let (s, c) = (self.size, self.channels);
        let mut images = batch_buffer(indices.len() * c * s * s);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let (px, label) = self.view_or_replace(i, epoch)?;
            for ch in 0..c {
                let table = &self.table[ch * 256..(ch + 1) * 256];
                images.extend(px.chunks_exact(c).map(|p| table[p[ch] as usize]));
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

/// An empty buffer with room for `len` values. A batch of 224x224 images is tens of MB written
/// once: on Linux its 2 MiB-aligned interior is marked for transparent huge pages, so filling it
/// takes a few page faults instead of one per 4 KiB (a sixth of the pipeline's time otherwise).
fn batch_buffer(len: usize) -> Vec<f32> {
    let v = Vec::<f32>::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (first, end) = (
            start.next_multiple_of(HUGE),
            (start + len * 4) / HUGE * HUGE,
        );
        if end > first {
            // SAFETY: the range lies inside the allocation `v` owns; MADV_HUGEPAGE only sets
            // how the kernel backs pages not yet touched, never their contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
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
        let (Sample::Pixels(im), l) = ds.get(2).unwrap() else {
            panic!("IDX images are in memory")
        };
        assert_eq!((im.height, im.width, l), (4, 5, 2));
        assert_eq!(im.data[0], 40);
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
        let Sample::Pixels(im) = ds.get(1).unwrap().0 else {
            panic!("CIFAR images are in memory")
        };
        assert_eq!(im.data[100], 70);
        // Planes in the file, interleaved pixels out: red, green, blue of pixel 0.
        let mut one = vec![1u8];
        one.extend((0..3072).map(|i| (i / 1024) as u8 * 10));
        let mut rgb = InMemory {
            channels: 3,
            height: 32,
            width: 32,
            pixels: vec![],
            labels: vec![],
        };
        parse_cifar(&one, 1, "t", &mut rgb).unwrap();
        let Sample::Pixels(im) = rgb.get(0).unwrap().0 else {
            panic!("in memory")
        };
        assert_eq!(&im.data[..6], &[0, 10, 20, 0, 10, 20]);
        assert!(parse_cifar(&bytes[..100], 1, "t", &mut ds).is_err());
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
        let (sample, label) = ds.get(3).unwrap();
        assert_eq!(sample.dims().unwrap(), (12, 10));
        let img = sample.decode(3, 1).unwrap();
        assert_eq!((img.channels, img.height, img.width, label), (3, 10, 12, 1));
        assert!(img.data[0].abs_diff(200) <= 8, "{}", img.data[0]);
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
