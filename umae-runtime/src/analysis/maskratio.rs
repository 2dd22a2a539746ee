//! The mask-ratio study of the paper (Section 4.2, Appendix B.2, Figure 2): how random masking
//! at ratio rho changes the distance between images of the same class and of different classes.
//!
//! Each image is cut into its patch grid and masked independently at ratio rho. The distance
//! between two masked images is the largest l2 distance between a visible patch of one and a
//! visible patch of the other (the paper's "max l2 distance between the patches"; `Mean` uses
//! the average over those pairs, Section 4.2's wording). Intra-class and inter-class distances
//! are averaged over all pairs and several mask draws; the ratio intra / inter has a minimum,
//! the "sweet spot".

use serde::{Deserialize, Serialize};
use umae_api::Rng;

/// How two patch sets are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchDistance {
    Max,
    Mean,
}

/// One row of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioRow {
    pub ratio: f64,
    pub intra: f64,
    pub inter: f64,
    /// intra / inter.
    pub relative: f64,
}

/// The study's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskRatioStudy {
    pub rows: Vec<RatioRow>,
    pub distance: PatchDistance,
    pub images: usize,
    pub classes: usize,
    pub draws: usize,
    pub num_patches: usize,
    /// The ratio with the smallest relative distance.
    pub sweet_spot: f64,
}

/// `images[i]` is `num_patches x patch_dim` values; `labels[i]` its class.
pub fn study(
    images: &[Vec<f32>],
    labels: &[usize],
    num_patches: usize,
    ratios: &[f64],
    draws: usize,
    distance: PatchDistance,
    seed: u64,
) -> Result<MaskRatioStudy, String> {
    let m = images.len();
    if m < 2 || labels.len() != m {
        return Err("the mask-ratio study needs at least two images".into());
    }
    let pd = images[0].len() / num_patches.max(1);
    if num_patches == 0 || images.iter().any(|im| im.len() != num_patches * pd) {
        return Err("every image must have the same patch grid".into());
    }
    let mut classes: Vec<usize> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let same = (0..m)
        .flat_map(|i| (i + 1..m).map(move |j| (i, j)))
        .filter(|&(i, j)| labels[i] == labels[j])
        .count();
    if same == 0 || same == m * (m - 1) / 2 {
        return Err(format!(
            "the study needs pairs of the same and of different classes (got {m} images of {} class(es), {same} same-class pairs)",
            classes.len()
        ));
    }
    if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
        return Err(format!("mask ratio {r} is outside [0, 1)"));
    }
    let draws = draws.max(1);
    let mut rows = Vec::new();
    for (ri, &ratio) in ratios.iter().enumerate() {
        let keep = ((num_patches as f64 * (1.0 - ratio)).round() as usize).clamp(1, num_patches);
        let (mut intra, mut inter, mut ni, mut ne) = (0.0f64, 0.0f64, 0usize, 0usize);
        for t in 0..draws {
            let visible: Vec<Vec<usize>> = (0..m)
                .map(|i| {
                    let mut r = Rng::derive(seed, &[ri as u64, t as u64, i as u64]);
                    r.permutation(num_patches)[..keep].to_vec()
                })
                .collect();
            let pair_dists = pairwise(images, &visible, pd, distance);
            for ((i, j), d) in pair_dists {
                if labels[i] == labels[j] {
                    intra += d;
                    ni += 1;
                } else {
                    inter += d;
                    ne += 1;
                }
            }
        }
        let (intra, inter) = (intra / ni as f64, inter / ne as f64);
        rows.push(RatioRow {
            ratio,
            intra,
            inter,
            relative: intra / inter,
        });
    }
    let sweet_spot = rows
        .iter()
        .min_by(|a, b| a.relative.total_cmp(&b.relative))
        .map(|r| r.ratio)
        .unwrap_or(f64::NAN);
    Ok(MaskRatioStudy {
        rows,
        distance,
        images: m,
        classes: classes.len(),
        draws,
        num_patches,
        sweet_spot,
    })
}

/// Distances of all pairs `i < j`, on two threads.
fn pairwise(
    images: &[Vec<f32>],
    visible: &[Vec<usize>],
    pd: usize,
    distance: PatchDistance,
) -> Vec<((usize, usize), f64)> {
    let m = images.len();
    let pairs: Vec<(usize, usize)> = (0..m)
        .flat_map(|i| (i + 1..m).map(move |j| (i, j)))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = pairs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&(i, j)| {
                            (
                                (i, j),
                                set_distance(
                                    &images[i],
                                    &visible[i],
                                    &images[j],
                                    &visible[j],
                                    pd,
                                    distance,
                                ),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("distance worker"))
            .collect()
    })
}

fn set_distance(
    a: &[f32],
    va: &[usize],
    b: &[f32],
    vb: &[usize],
    pd: usize,
    distance: PatchDistance,
) -> f64 {
    let mut best = 0.0f64;
    let mut sum = 0.0f64;
    for &p in va {
        let pa = &a[p * pd..(p + 1) * pd];
        for &q in vb {
            let pb = &b[q * pd..(q + 1) * pd];
            let d2: f32 = pa.iter().zip(pb).map(|(x, y)| (x - y) * (x - y)).sum();
            let d = (d2 as f64).sqrt();
            best = best.max(d);
            sum += d;
        }
    }
    match distance {
        PatchDistance::Max => best,
        PatchDistance::Mean => sum / (va.len() * vb.len()) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_distance_by_hand() {
        // Two 1-d patches per image: a = [0, 3], b = [1, 7].
        let (a, b) = (vec![0.0, 3.0], vec![1.0, 7.0]);
        let all = [0, 1];
        assert_eq!(set_distance(&a, &all, &b, &all, 1, PatchDistance::Max), 7.0);
        let mean = (1.0 + 7.0 + 2.0 + 4.0) / 4.0;
        assert_eq!(
            set_distance(&a, &all, &b, &all, 1, PatchDistance::Mean),
            mean
        );
        assert_eq!(set_distance(&a, &[1], &b, &[0], 1, PatchDistance::Max), 2.0);
    }

    #[test]
    fn unmasked_study_matches_direct_average_and_masking_shrinks_max_distance() {
        let mut rng = Rng::new(5);
        let (np, pd) = (16, 3);
        let images: Vec<Vec<f32>> = (0..12)
            .map(|i| {
                (0..np * pd)
                    .map(|_| (rng.normal() + (i % 3) as f64) as f32)
                    .collect()
            })
            .collect();
        let labels: Vec<usize> = (0..12).map(|i| i % 3).collect();
        let s = study(
            &images,
            &labels,
            np,
            &[0.0, 0.5, 0.9],
            3,
            PatchDistance::Max,
            1,
        )
        .unwrap();
        let all: Vec<usize> = (0..np).collect();
        let (mut intra, mut n) = (0.0, 0);
        for i in 0..12 {
            for j in i + 1..12 {
                if labels[i] == labels[j] {
                    intra +=
                        set_distance(&images[i], &all, &images[j], &all, pd, PatchDistance::Max);
                    n += 1;
                }
            }
        }
        assert!((s.rows[0].intra - intra / n as f64).abs() < 1e-9);
        assert!(s.rows[1].intra < s.rows[0].intra && s.rows[2].intra < s.rows[1].intra);
        assert!(s
            .rows
            .iter()
            .all(|r| (r.relative - r.intra / r.inter).abs() < 1e-12));
        assert!(s.rows.iter().any(|r| r.ratio == s.sweet_spot));
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        let one = vec![vec![0.0; 4]; 3];
        assert!(study(&one, &[0, 0, 0], 4, &[0.5], 1, PatchDistance::Max, 0).is_err());
        assert!(study(&one, &[0, 1, 0], 4, &[1.0], 1, PatchDistance::Max, 0).is_err());
    }
}
