//! Codebook tokenizers: a patch (optionally projected) becomes the id of its nearest code.
//!
//! One file format serves every tokenizer: a safetensors file with `codebook` `[K, d]`, an
//! optional `projection` `[P, d]` (P = values per patch) and the metadata key `cosine`
//! (`"true"`: vectors and codes are L2-normalised before the nearest-code search). k-means and
//! random-projection tokenizers write it beside the run; the `Checkpoint` tokenizer reads it.

use std::collections::HashMap;
use std::path::Path;

use umae_api::burn::tensor::{Int, Tensor, TensorData};
use umae_api::store::{read_safetensors_meta, write_safetensors_meta, HostTensor};
use umae_api::{Device, Rng, B};

/// Rows per nearest-code search, to bound the `[rows, K]` distance matrix.
const CHUNK: usize = 4096;

/// A fixed codebook, with an optional projection in front of it.
#[derive(Debug, Clone)]
pub struct Codebook {
    /// `[P, d]`, row-major, or `None` (codes live in patch space, `d = P`).
    pub projection: Option<Vec<f32>>,
    /// `[K, d]`, row-major.
    pub codes: Vec<f32>,
    pub input: usize,
    pub dim: usize,
    pub cosine: bool,
    device: Option<DeviceCopy>,
}

#[derive(Debug, Clone)]
struct DeviceCopy {
    projection: Option<Tensor<B, 2>>,
    /// `[d, K]`
    codes_t: Tensor<B, 2>,
    /// `[1, K]`: squared norms of the codes.
    sq: Tensor<B, 2>,
}

/// L2-normalise each row; rows already of unit length are left bit-exact, so that a saved and
/// reloaded codebook is the same codebook.
fn l2_rows(v: &mut [f32], d: usize) {
    for row in v.chunks_mut(d) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        if (n - 1.0).abs() > 1e-6 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
}

impl Codebook {
    pub fn new(
        projection: Option<Vec<f32>>,
        codes: Vec<f32>,
        input: usize,
        dim: usize,
        cosine: bool,
    ) -> Result<Self, String> {
        if dim == 0 || codes.is_empty() || !codes.len().is_multiple_of(dim) {
            return Err(format!(
                "codebook of {} values is not a whole number of {dim}-wide codes",
                codes.len()
            ));
        }
        match &projection {
            Some(p) if p.len() != input * dim => {
                return Err(format!(
                    "projection has {} values, expected {input} x {dim}",
                    p.len()
                ))
            }
            None if input != dim => {
                return Err(format!(
                    "codes are {dim} wide but patches have {input} values (and no projection)"
                ))
            }
            _ => {}
        }
        let mut codes = codes;
        if cosine {
            l2_rows(&mut codes, dim);
        }
        Ok(Codebook {
            projection,
            codes,
            input,
            dim,
            cosine,
            device: None,
        })
    }

    pub fn size(&self) -> usize {
        self.codes.len() / self.dim
    }

    /// Copy the codebook to `device` (done once before use).
    pub fn to_device(&mut self, device: &Device) {
        let k = self.size();
        let codes =
            Tensor::<B, 2>::from_data(TensorData::new(self.codes.clone(), [k, self.dim]), device);
        let sq = codes.clone().powf_scalar(2.0).sum_dim(1).reshape([1, k]);
        self.device = Some(DeviceCopy {
            projection: self.projection.as_ref().map(|p| {
                Tensor::from_data(TensorData::new(p.clone(), [self.input, self.dim]), device)
            }),
            codes_t: codes.transpose(),
            sq,
        });
    }

    /// The id of the nearest code of each row of `x` `[M, P]`, as `[M]`.
    pub fn assign(&self, x: Tensor<B, 2>) -> Tensor<B, 1, Int> {
        let dev = self
            .device
            .as_ref()
            .expect("the codebook is copied to the device before use");
        let x = x.detach();
        let m = x.dims()[0];
        let mut out = Vec::new();
        for start in (0..m).step_by(CHUNK) {
            let end = (start + CHUNK).min(m);
            let mut v = x.clone().narrow(0, start, end - start);
            if let Some(p) = &dev.projection {
                v = v.matmul(p.clone());
            }
            if self.cosine {
                let n = v
                    .clone()
                    .powf_scalar(2.0)
                    .sum_dim(1)
                    .sqrt()
                    .clamp_min(1e-12);
                v = v / n;
            }
            // |v - c|^2 = |v|^2 - 2 v.c + |c|^2; |v|^2 does not change the argmin.
            let dist = dev.sq.clone() - v.matmul(dev.codes_t.clone()) * 2.0;
            out.push(dist.argmin(1).reshape([end - start]));
        }
        Tensor::cat(out, 0)
    }

    /// Write the codebook (atomically) with extra metadata.
    pub fn save(&self, path: &Path, meta: &[(&str, &str)]) -> Result<(), String> {
        let mut t = HashMap::new();
        t.insert(
            "codebook".to_string(),
            HostTensor {
                shape: vec![self.size(), self.dim],
                data: self.codes.clone(),
            },
        );
        if let Some(p) = &self.projection {
            t.insert(
                "projection".to_string(),
                HostTensor {
                    shape: vec![self.input, self.dim],
                    data: p.clone(),
                },
            );
        }
        let cosine = self.cosine.to_string();
        let mut all = vec![("cosine", cosine.as_str())];
        all.extend_from_slice(meta);
        let tmp = path.with_extension("safetensors.tmp");
        write_safetensors_meta(&tmp, &t, &all)?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot move {} into place: {e}", path.display()))
    }

    /// Read a codebook file for patches of `input` values; returns it with its metadata.
    pub fn load(path: &Path, input: usize) -> Result<(Self, HashMap<String, String>), String> {
        let (mut t, meta) = read_safetensors_meta(path)?;
        let codes = t.remove("codebook").ok_or_else(|| {
            format!(
                "{} has no `codebook` tensor (a [codes, width] matrix)",
                path.display()
            )
        })?;
        let [_, dim] = codes.shape[..] else {
            return Err(format!(
                "{}: `codebook` must be 2-D [codes, width], found shape {:?}",
                path.display(),
                codes.shape
            ));
        };
        let projection = match t.remove("projection") {
            Some(p) if p.shape != [input, dim] => {
                return Err(format!(
                    "{}: `projection` has shape {:?} but patches have {input} values and codes {dim}: expected [{input}, {dim}]",
                    path.display(),
                    p.shape
                ))
            }
            Some(p) => Some(p.data),
            None => None,
        };
        let cosine = meta.get("cosine").map(|c| c == "true").unwrap_or(false);
        let book = Codebook::new(projection, codes.data, input, dim, cosine)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((book, meta))
    }
}

/// BEST-RQ's tokenizer (Chiu et al. 2022): a frozen random projection (Xavier normal) to `dim`
/// values and `k` random unit codes; a patch's token is the nearest code by cosine similarity.
pub fn random_projection(input: usize, dim: usize, k: usize, seed: u64) -> Codebook {
    let mut rng = Rng::derive(seed, &[0x7265_7071]);
    let std = (2.0 / (input + dim) as f64).sqrt();
    let projection: Vec<f32> = (0..input * dim)
        .map(|_| (rng.normal() * std) as f32)
        .collect();
    let codes: Vec<f32> = (0..k * dim).map(|_| rng.normal() as f32).collect();
    Codebook::new(Some(projection), codes, input, dim, true).expect("consistent sizes")
}

/// Lloyd's k-means on `m` rows of `d` values (`x`, row-major): `k` distinct rows as the first
/// centres, then `iters` rounds of nearest-centre assignment (on `device`) and centre update;
/// an emptied cluster restarts from the row farthest from its centre. Deterministic for `seed`.
pub fn kmeans(
    x: &[f32],
    d: usize,
    k: usize,
    iters: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<f32>, String> {
    let m = x.len() / d;
    if m < k {
        return Err(format!(
            "k-means needs at least as many patches as codes: {m} patches for {k} codes"
        ));
    }
    let mut rng = Rng::derive(seed, &[0x6b6d_6e73]);
    // k distinct rows, in a random order, as the first centres.
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut chosen: Vec<usize> = Vec::with_capacity(k);
    let mut seen = std::collections::HashSet::new();
    for i in rng.permutation(m) {
        let bits: Vec<u32> = row(i).iter().map(|v| v.to_bits()).collect();
        if seen.insert(bits) {
            chosen.push(i);
            if chosen.len() == k {
                break;
            }
        }
    }
    if chosen.len() < k {
        return Err(format!(
            "k-means needs at least as many distinct patches as codes: {} distinct patches for {k} codes",
            chosen.len()
        ));
    }
    let mut centres: Vec<f32> = chosen
        .iter()
        .flat_map(|&i| row(i).iter().copied())
        .collect();
    let data = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [m, d]), device);
    let mut previous: Vec<i64> = Vec::new();
    for _ in 0..iters {
        let mut book = Codebook::new(None, centres.clone(), d, d, false)?;
        book.to_device(device);
        let ids: Vec<i64> = book
            .assign(data.clone())
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        if ids == previous {
            break;
        }
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (row, &id) in ids.iter().enumerate() {
            let id = id as usize;
            counts[id] += 1;
            for j in 0..d {
                sums[id * d + j] += x[row * d + j] as f64;
            }
        }
        // An emptied cluster restarts at the row farthest from its own centre.
        let mut far: Vec<(f32, usize)> = Vec::new();
        if counts.contains(&0) {
            far = ids
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let c = c as usize;
                    let dist = row(i)
                        .iter()
                        .zip(&centres[c * d..(c + 1) * d])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>();
                    (dist, i)
                })
                .collect();
            far.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        let mut next_far = far.into_iter();
        for c in 0..k {
            if counts[c] == 0 {
                let (_, r) = next_far.next().expect("more rows than codes");
                centres[c * d..(c + 1) * d].copy_from_slice(row(r));
            } else {
                for j in 0..d {
                    centres[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
        previous = ids;
    }
    Ok(centres)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        umae_api::burn::DispatchDevice::Flex(Default::default())
    }

    /// `per` noisy points around each of `centres` (rows of `d`), interleaved.
    fn clusters(centres: &[Vec<f32>], per: usize, noise: f64, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let (mut x, mut label) = (Vec::new(), Vec::new());
        for _ in 0..per {
            for (c, centre) in centres.iter().enumerate() {
                x.extend(centre.iter().map(|v| v + (rng.normal() * noise) as f32));
                label.push(c);
            }
        }
        (x, label)
    }

    fn ids(book: &Codebook, x: &[f32], d: usize) -> Vec<i64> {
        let t = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [x.len() / d, d]), &device());
        book.assign(t)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .unwrap()
    }

    /// Every cluster maps to one token and different clusters to different tokens.
    fn pure(labels: &[usize], tokens: &[i64], k: usize) -> bool {
        let mut of = vec![None; k];
        for (&l, &t) in labels.iter().zip(tokens) {
            if *of[l].get_or_insert(t) != t {
                return false;
            }
        }
        let mut seen: Vec<i64> = of.into_iter().map(|t| t.unwrap()).collect();
        seen.sort();
        seen.dedup();
        seen.len() == k
    }

    fn centres() -> Vec<Vec<f32>> {
        // Four well separated 6-d centres.
        vec![
            vec![3.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            vec![0.0, 3.0, 0.0, 0.0, 1.0, 0.0],
            vec![0.0, 0.0, 3.0, 1.0, 0.0, 0.0],
            vec![-3.0, -3.0, 0.0, 0.0, 0.0, 0.0],
        ]
    }

    #[test]
    fn kmeans_recovers_known_clusters_and_is_deterministic() {
        let (x, labels) = clusters(&centres(), 200, 0.1, 1);
        let codes = kmeans(&x, 6, 4, 20, 7, &device()).unwrap();
        assert_eq!(codes, kmeans(&x, 6, 4, 20, 7, &device()).unwrap());
        let mut book = Codebook::new(None, codes.clone(), 6, 6, false).unwrap();
        book.to_device(&device());
        let t = ids(&book, &x, 6);
        // With 4 codes for 4 separated clusters, each code is a cluster mean: within 0.05.
        if !pure(&labels, &t, 4) {
            // k-means with random starts can merge two clusters; a different seed must not be
            // needed for this well separated data.
            panic!("clusters not recovered: {codes:?}");
        }
        for c in centres() {
            let best = codes
                .chunks(6)
                .map(|code| {
                    code.iter()
                        .zip(&c)
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f32>()
                })
                .fold(f32::INFINITY, f32::min);
            assert!(best < 0.05, "no code near {c:?}: {codes:?}");
        }
        assert!(kmeans(&x[..6 * 3], 6, 4, 5, 0, &device())
            .unwrap_err()
            .contains("3 patches for 4 codes"));
    }

    #[test]
    fn random_projection_is_deterministic_and_keeps_clusters_apart() {
        let a = random_projection(6, 16, 512, 3);
        let b = random_projection(6, 16, 512, 3);
        assert_eq!(
            (a.projection.clone(), a.codes.clone()),
            (b.projection, b.codes)
        );
        assert_ne!(a.codes, random_projection(6, 16, 512, 4).codes);
        let mut book = a;
        book.to_device(&device());
        // Tiny noise: every member of a cluster gets the cluster's token, and the four
        // clusters get four different tokens.
        let (x, labels) = clusters(&centres(), 50, 1e-3, 2);
        assert!(pure(&labels, &ids(&book, &x, 6), 4));
    }

    #[test]
    fn codebook_files_round_trip_and_bad_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.safetensors");
        let mut book = random_projection(6, 4, 32, 0);
        book.save(&path, &[("key", "k")]).unwrap();
        let (mut back, meta) = Codebook::load(&path, 6).unwrap();
        assert_eq!(meta.get("key").map(String::as_str), Some("k"));
        assert_eq!(
            (back.codes.clone(), back.cosine),
            (book.codes.clone(), true)
        );
        book.to_device(&device());
        back.to_device(&device());
        let (x, _) = clusters(&centres(), 20, 0.5, 3);
        assert_eq!(ids(&book, &x, 6), ids(&back, &x, 6));
        // Patches of another size.
        let e = Codebook::load(&path, 12).unwrap_err();
        assert!(
            e.contains("`projection` has shape [6, 4]") && e.contains("[12, 4]"),
            "{e}"
        );
        // Not a safetensors file.
        std::fs::write(&path, b"not a tensor file").unwrap();
        assert!(Codebook::load(&path, 6)
            .unwrap_err()
            .contains("not a valid safetensors"));
        // Missing file.
        let e = Codebook::load(&dir.path().join("none.safetensors"), 6).unwrap_err();
        assert!(e.contains("none.safetensors"), "{e}");
    }
}
