//! The formats that list their images up front: IDX, CIFAR binary, image folders (labeled by
//! class folder, or every image of a tree unlabeled), synthetic.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use umae_api::Rng;

use super::{Dataset, Image, Sample, Split};

/// Images already decoded into memory (IDX, CIFAR, synthetic), stored as `channels` planes
/// of `height x width` bytes each.
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
    fn get(&self, index: usize) -> Result<(Sample, usize), String> {
        let (c, hw) = (self.channels, self.height * self.width);
        let planes = self
            .pixels
            .get(index * c * hw..(index + 1) * c * hw)
            .ok_or_else(|| format!("image {index} is out of range"))?;
        // Stored as planes (the IDX and CIFAR layout); the pipeline takes interleaved pixels.
        let data = if c == 1 {
            planes.to_vec()
        } else {
            (0..hw * c).map(|i| planes[(i % c) * hw + i / c]).collect()
        };
        Ok((
            Sample::Pixels(Image {
                channels: c,
                height: self.height,
                width: self.width,
                data,
            }),
            self.labels[index],
        ))
    }
}

pub(super) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, String> {
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

pub(super) fn load_idx(root: &Path, split: Split) -> Result<InMemory, String> {
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

pub(super) fn load_cifar(root: &Path, split: Split) -> Result<InMemory, String> {
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

fn is_image_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Image files read on demand: `root/<class>/<image>` (labeled by class folder) or every image
/// under a folder at any depth (unlabeled).
pub struct ImageFolder {
    pub files: Vec<(PathBuf, usize)>,
    /// Class names, the label's index; empty when unlabeled.
    pub classes: Vec<String>,
    pub channels: usize,
}

impl ImageFolder {
    /// One sub-folder of `root` per class, holding `.png`/`.jpg` files.
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
                .filter(|p| is_image_file(p))
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
                "no images in {}: expected one sub-folder per class holding .png/.jpg files (for images without classes use format: Images)",
                root.display()
            ));
        }
        Ok(ImageFolder {
            files,
            classes,
            channels,
        })
    }

    /// Every `.png`/`.jpg` under `root`, at any depth, in path order; no labels.
    pub fn tree(root: &Path, channels: usize) -> Result<Self, String> {
        let mut files = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| format!("cannot read image folder {}: {e}", dir.display()))?;
            for e in entries {
                let p = e
                    .map_err(|e| format!("cannot read image folder {}: {e}", dir.display()))?
                    .path();
                if p.is_dir() {
                    pending.push(p);
                } else if is_image_file(&p) {
                    files.push((p, 0));
                }
            }
        }
        if files.is_empty() {
            return Err(format!(
                "no .png/.jpg images in {} or its sub-folders",
                root.display()
            ));
        }
        files.sort();
        Ok(ImageFolder {
            files,
            classes: Vec::new(),
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
    fn labeled(&self) -> bool {
        !self.classes.is_empty()
    }
    fn get(&self, index: usize) -> Result<(Sample, usize), String> {
        let (path, label) = self
            .files
            .get(index)
            .ok_or_else(|| format!("image {index} is out of range"))?;
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok((
            Sample::Encoded {
                bytes,
                name: path.display().to_string(),
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
