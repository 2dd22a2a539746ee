//! WebDataset-style tar shards: each sample is a group of members sharing a key (the member
//! name up to the first dot of its file name), here `KEY.jpg` / `KEY.jpeg` / `KEY.png` with an
//! optional `KEY.cls` holding the class number as text.
//!
//! Opening reads the tar headers only (seeking over the data) to index the samples. An epoch
//! visits the shards in a shuffled order and streams their samples through a shuffle buffer,
//! so reads move forward through each shard, never more than `shuffle_buffer` samples ahead of
//! the order. The order is a function of (seed, epoch), so it is the same after a restart, and
//! a run resumed mid-epoch continues exactly where it stopped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use umae_api::Rng;

use super::{Dataset, Sample};

struct Member {
    shard: usize,
    key: String,
    offset: u64,
    size: u64,
    label: Option<usize>,
}

/// The samples of a folder of `.tar` shards.
pub struct Shards {
    shards: Vec<(PathBuf, File)>,
    samples: Vec<Member>,
    /// Sample index range of each shard.
    ranges: Vec<std::ops::Range<usize>>,
    buffer: usize,
    labeled: bool,
}

fn sample_key(path: &str) -> (&str, &str) {
    let slash = path.rfind('/').map_or(0, |i| i + 1);
    match path[slash..].find('.') {
        Some(dot) => (&path[..slash + dot], &path[slash + dot + 1..]),
        None => (path, ""),
    }
}

impl Shards {
    /// Index every `*.tar` file in `dir` (in name order). `buffer` is the shuffle buffer.
    pub fn open(dir: &Path, buffer: usize) -> Result<Self, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read shard folder {}: {e}", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tar"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(format!(
                "no .tar shards in {}: expected WebDataset-style tar files (KEY.jpg + KEY.cls members)",
                dir.display()
            ));
        }
        let mut out = Shards {
            shards: Vec::new(),
            samples: Vec::new(),
            ranges: Vec::new(),
            buffer: buffer.max(1),
            labeled: true,
        };
        for path in paths {
            let start = out.samples.len();
            let file = File::open(&path)
                .map_err(|e| format!("cannot open shard {}: {e}", path.display()))?;
            out.index(out.shards.len(), &path, &file)?;
            out.ranges.push(start..out.samples.len());
            out.shards.push((path, file));
        }
        let with = out.samples.iter().filter(|m| m.label.is_some()).count();
        if with > 0 && with < out.samples.len() {
            let m = out
                .samples
                .iter()
                .find(|m| m.label.is_none())
                .expect("one is unlabeled");
            return Err(format!(
                "{}: sample `{}` has no .cls label while {with} others have one: label every sample or none",
                out.shards[m.shard].0.display(),
                m.key
            ));
        }
        out.labeled = with > 0;
        if out.samples.is_empty() {
            return Err(format!("the shards in {} hold no images", dir.display()));
        }
        Ok(out)
    }

    fn index(&mut self, shard: usize, path: &Path, file: &File) -> Result<(), String> {
        let bad =
            |e: &dyn std::fmt::Display| format!("{}: not a readable tar file: {e}", path.display());
        let file_len = file.metadata().map_err(|e| bad(&e))?.len();
        let mut archive = tar::Archive::new(file);
        // The sample being read (a sample's members are adjacent in a shard): its key, its image
        // member's (offset, size) once seen, its label.
        type Pending = (String, Option<(u64, u64)>, Option<usize>);
        let mut pending: Option<Pending> = None;
        let flush = |p: Option<Pending>, samples: &mut Vec<Member>| -> Result<(), String> {
            match p {
                Some((key, Some((offset, size)), label)) => {
                    samples.push(Member {
                        shard,
                        key,
                        offset,
                        size,
                        label,
                    });
                    Ok(())
                }
                Some((key, None, Some(_))) => Err(format!(
                    "{}: sample `{key}` has a .cls label but no .jpg/.jpeg/.png image",
                    path.display(),
                )),
                _ => Ok(()),
            }
        };
        for entry in archive.entries_with_seek().map_err(|e| bad(&e))? {
            let mut entry = entry.map_err(|e| bad(&e))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| bad(&e))?
                .to_string_lossy()
                .into_owned();
            let (key, ext) = sample_key(&name);
            let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
            if pending.as_ref().is_none_or(|p| p.0 != key) {
                flush(pending.take(), &mut self.samples)?;
                pending = Some((key, None, None));
            }
            let p = pending.as_mut().expect("set above");
            match ext.as_str() {
                "jpg" | "jpeg" | "png" => {
                    let (offset, size) = (entry.raw_file_position(), entry.size());
                    if offset + size > file_len {
                        return Err(format!(
                            "{}: member `{name}` runs past the end of the file: the shard is truncated",
                            path.display()
                        ));
                    }
                    p.1 = Some((offset, size));
                }
                "cls" => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut entry, &mut text).map_err(|e| bad(&e))?;
                    let label = text.trim().parse::<usize>().map_err(|_| {
                        format!(
                            "{}: member `{name}` should hold a class number, found {:?}",
                            path.display(),
                            text.chars().take(40).collect::<String>()
                        )
                    })?;
                    p.2 = Some(label);
                }
                _ => {}
            }
        }
        flush(pending, &mut self.samples)
    }

    /// The largest label, if the shards are labeled.
    pub fn max_label(&self) -> Option<usize> {
        self.samples.iter().filter_map(|m| m.label).max()
    }

    /// Shard paths, in index order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|(p, _)| p.as_path())
    }
}

impl Dataset for Shards {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn labeled(&self) -> bool {
        self.labeled
    }
    fn sequential(&self) -> bool {
        true
    }
    fn label(&self, index: usize) -> Result<usize, String> {
        self.samples
            .get(index)
            .map(|m| m.label.unwrap_or(0))
            .ok_or_else(|| format!("sample {index} is out of range"))
    }
    fn get(&self, index: usize) -> Result<(Sample, usize), String> {
        let m = self
            .samples
            .get(index)
            .ok_or_else(|| format!("sample {index} is out of range"))?;
        let (path, file) = &self.shards[m.shard];
        let name = format!("{}:{}", path.display(), m.key);
        let mut bytes = vec![0; m.size as usize];
        file.read_exact_at(&mut bytes, m.offset)
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        Ok((Sample::Encoded { bytes, name }, m.label.unwrap_or(0)))
    }
    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = Rng::derive(seed, &[epoch, 0x5EA4]);
        let mut out = Vec::with_capacity(self.samples.len());
        let mut buf = Vec::with_capacity(self.buffer);
        for s in rng.permutation(self.ranges.len()) {
            for i in self.ranges[s].clone() {
                if buf.len() == self.buffer {
                    let j = rng.below(buf.len());
                    out.push(buf.swap_remove(j));
                }
                buf.push(i);
            }
        }
        while !buf.is_empty() {
            let j = rng.below(buf.len());
            out.push(buf.swap_remove(j));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard of `n` samples `{first + k:06}.png` (+ `.cls` when `labels`), and a text member.
    pub(crate) fn write_shard(path: &Path, first: usize, n: usize, labels: bool) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        for k in first..first + n {
            let img = image::GrayImage::from_pixel(6, 5, image::Luma([k as u8]));
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            add(&format!("s/{k:06}.png"), &png);
            add(&format!("s/{k:06}.json"), b"{}");
            if labels {
                add(&format!("s/{k:06}.cls"), format!("{}\n", k % 3).as_bytes());
            }
        }
        b.finish().unwrap();
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(sample_key("a.b/000001.seg.png"), ("a.b/000001", "seg.png"));
        assert_eq!(sample_key("x.cls"), ("x", "cls"));
    }

    #[test]
    fn shards_index_their_samples_and_read_them_back() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("000.tar"), 0, 5, true);
        write_shard(&dir.path().join("001.tar"), 5, 4, true);
        let s = Shards::open(dir.path(), 3).unwrap();
        assert_eq!((s.len(), s.labeled(), s.max_label()), (9, true, Some(2)));
        for i in 0..9 {
            let (sample, label) = s.get(i).unwrap();
            assert_eq!(label, i % 3);
            let img = sample.decode(1, 1).unwrap();
            assert_eq!((img.width, img.height, img.data[0]), (6, 5, i as u8));
        }
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation_within_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        for k in 0..4 {
            write_shard(&dir.path().join(format!("{k:03}.tar")), k * 10, 10, false);
        }
        let s = Shards::open(dir.path(), 4).unwrap();
        assert!(!s.labeled());
        let a = s.epoch_order(7, 0);
        assert_eq!(
            a,
            s.epoch_order(7, 0),
            "the same seed and epoch give the same order"
        );
        assert_ne!(a, s.epoch_order(7, 1), "each epoch has its own order");
        assert_ne!(a, s.epoch_order(8, 0), "each seed has its own order");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
        // Shards are visited whole, in some order: the stream position of the sample emitted
        // k-th is below k + buffer.
        let mut rng = Rng::derive(7, &[0, 0x5EA4]);
        let stream: Vec<usize> = rng
            .permutation(4)
            .into_iter()
            .flat_map(|sh| sh * 10..sh * 10 + 10)
            .collect();
        for (k, i) in a.iter().enumerate() {
            let p = stream.iter().position(|x| x == i).unwrap();
            assert!(
                p < k + 4,
                "sample {i} at stream position {p} emitted {k}-th"
            );
        }
    }

    #[test]
    fn bad_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Shards::open(dir.path(), 4).err().unwrap();
        assert!(e.contains("no .tar shards"), "{e}");
        write_shard(&dir.path().join("000.tar"), 0, 3, true);
        write_shard(&dir.path().join("001.tar"), 3, 3, false);
        let e = Shards::open(dir.path(), 4).err().unwrap();
        assert!(e.contains("001.tar") && e.contains("no .cls label"), "{e}");
        std::fs::remove_file(dir.path().join("001.tar")).unwrap();
        let full = std::fs::read(dir.path().join("000.tar")).unwrap();
        std::fs::write(dir.path().join("001.tar"), &full[..700]).unwrap();
        let e = Shards::open(dir.path(), 4).err().unwrap();
        assert!(e.contains("001.tar"), "a truncated shard is named: {e}");
    }
}
