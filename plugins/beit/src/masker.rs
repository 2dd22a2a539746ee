use umae_api::{BuildContext, MaskPlan, Masker, PatchGeometry, PluginError, Rng};

umae_api::params! {
    /// Parameters of the `blockwise` masker.
    pub struct BlockwiseParams {
        /// Patches hidden per image, exactly (BEiT: 75 of 196).
        pub count: usize = 75,
        /// Smallest block in patches (BEiT: 16); only the block that completes the count may be
        /// smaller.
        pub min_block: usize = 16,
        /// Largest block in patches (default: `count`).
        pub max_block: Option<usize> = None,
        /// Smallest height/width ratio of a block (BEiT: 0.3).
        pub min_aspect: f64 = 0.3,
        /// Largest height/width ratio (default: 1 / min_aspect).
        pub max_aspect: Option<f64> = None,
    }
}

/// BEiT's blockwise masking: rectangles of random area and aspect ratio are hidden one after the
/// other until exactly `count` patches are hidden.
#[derive(Debug, Clone)]
pub struct BlockwiseMasker {
    pub count: usize,
    pub min_block: usize,
    pub max_block: usize,
    /// ln of the aspect-ratio bounds.
    pub log_aspect: (f64, f64),
}

/// Restarts of a whole mask before the remaining patches are filled one at a time.
const RESTARTS: usize = 50;
/// Placement attempts per block, as in BEiT.
const ATTEMPTS: usize = 10;

/// A rectangle on the patch grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl BlockwiseMasker {
    /// Draw a rectangle of area about `[min(min_block, budget), budget]` and an aspect ratio
    /// within the bounds that fits the grid, or `None`.
    pub fn draw_rect(&self, gh: usize, gw: usize, budget: usize, rng: &mut Rng) -> Option<Rect> {
        let lo = self.min_block.min(budget) as f64;
        let area = rng.range(lo, budget as f64);
        let aspect = rng.range(self.log_aspect.0, self.log_aspect.1).exp();
        let height = (area * aspect).sqrt().round() as usize;
        let width = (area / aspect).sqrt().round() as usize;
        if height == 0 || width == 0 || height > gh || width > gw {
            return None;
        }
        Some(Rect {
            top: rng.below(gh - height + 1),
            left: rng.below(gw - width + 1),
            height,
            width,
        })
    }

    /// Hide one more block adding at most `budget` patches; returns how many it added.
    fn add_block(&self, hidden: &mut [bool], gw: usize, budget: usize, rng: &mut Rng) -> usize {
        let gh = hidden.len() / gw;
        for _ in 0..ATTEMPTS {
            let Some(r) = self.draw_rect(gh, gw, budget, rng) else {
                continue;
            };
            let cells = (r.top..r.top + r.height)
                .flat_map(|i| (r.left..r.left + r.width).map(move |j| i * gw + j));
            let new = cells.clone().filter(|&p| !hidden[p]).count();
            if new > 0 && new <= budget {
                cells.for_each(|p| hidden[p] = true);
                return new;
            }
        }
        0
    }

    /// One image's hidden flags, with exactly `count` hidden patches.
    pub fn sample_one(&self, gh: usize, gw: usize, rng: &mut Rng) -> Vec<bool> {
        let mut hidden = vec![false; gh * gw];
        for _ in 0..RESTARTS {
            hidden.iter_mut().for_each(|h| *h = false);
            let mut done = 0;
            while done < self.count {
                let budget = (self.count - done).min(self.max_block);
                let added = self.add_block(&mut hidden, gw, budget, rng);
                if added == 0 {
                    break;
                }
                done += added;
            }
            if done == self.count {
                return hidden;
            }
        }
        // Could not land on the count with blocks (tiny grids): finish with single patches.
        let mut free: Vec<usize> = (0..hidden.len()).filter(|&p| !hidden[p]).collect();
        let missing = self.count - hidden.iter().filter(|h| **h).count();
        for _ in 0..missing {
            let p = free.swap_remove(rng.below(free.len()));
            hidden[p] = true;
        }
        hidden
    }
}

impl Masker for BlockwiseMasker {
    fn sample(&self, g: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan {
        let (gh, gw) = g.grid();
        let flags: Vec<Vec<bool>> = (0..batch).map(|_| self.sample_one(gh, gw, rng)).collect();
        MaskPlan::from_flags(&flags).expect("every sample hides exactly `count` patches")
    }
}

fn build(p: &BlockwiseParams, ctx: &BuildContext) -> Result<BlockwiseMasker, PluginError> {
    let n = ctx.geometry()?.num_patches();
    let bad = |m: String| Err(PluginError::Invalid(m));
    if p.count == 0 || p.count >= n {
        return bad(format!(
            "count must be between 1 and {} (the encoder has {n} patches), found {}",
            n - 1,
            p.count
        ));
    }
    let max_block = p.max_block.unwrap_or(p.count);
    if p.min_block == 0 || max_block < p.min_block {
        return bad(format!(
            "min_block ({}) must be positive and at most max_block ({max_block})",
            p.min_block
        ));
    }
    let max_aspect = p.max_aspect.unwrap_or(1.0 / p.min_aspect);
    if !(p.min_aspect > 0.0 && p.min_aspect <= max_aspect && max_aspect.is_finite()) {
        return bad(format!(
            "aspect ratios must satisfy 0 < min_aspect ({}) <= max_aspect ({max_aspect})",
            p.min_aspect
        ));
    }
    Ok(BlockwiseMasker {
        count: p.count,
        min_block: p.min_block,
        max_block,
        log_aspect: (p.min_aspect.ln(), max_aspect.ln()),
    })
}

umae_api::register!(
    Masker,
    "blockwise",
    BlockwiseParams,
    build,
    "BEiT blockwise masking: random rectangles (>= 16 patches, aspect 0.3..3.3) until exactly `count` are hidden (Bao et al. 2022)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use umae_api::Rng;

    fn beit() -> BlockwiseMasker {
        BlockwiseMasker {
            count: 75,
            min_block: 16,
            max_block: 75,
            log_aspect: (0.3f64.ln(), (1.0f64 / 0.3).ln()),
        }
    }

    /// Number of 4-connected groups of hidden patches.
    fn components(h: &[bool], gw: usize) -> usize {
        let mut seen = vec![false; h.len()];
        let mut count = 0;
        for s in 0..h.len() {
            if !h[s] || seen[s] {
                continue;
            }
            count += 1;
            let mut stack = vec![s];
            seen[s] = true;
            while let Some(p) = stack.pop() {
                let (r, c) = (p / gw, p % gw);
                let mut next = vec![];
                if r > 0 {
                    next.push(p - gw);
                }
                if p + gw < h.len() {
                    next.push(p + gw);
                }
                if c > 0 {
                    next.push(p - 1);
                }
                if c + 1 < gw {
                    next.push(p + 1);
                }
                for q in next {
                    if h[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        count
    }

    proptest! {
        #[test]
        fn hides_exactly_count(gh in 2usize..16, gw in 2usize..16, frac in 0.01f64..0.99,
                               min_block in 1usize..20, seed: u64, batch in 1usize..4) {
            let n = gh * gw;
            let count = ((n as f64 * frac) as usize).clamp(1, n - 1);
            let m = BlockwiseMasker {
                count,
                min_block: min_block.min(count),
                max_block: count,
                log_aspect: (0.3f64.ln(), (1.0f64 / 0.3).ln()),
            };
            let g = PatchGeometry::new(1, gh * 2, gw * 2, 2).unwrap();
            let plan = m.sample(&g, batch, &mut Rng::new(seed));
            prop_assert_eq!(plan.num_visible, n - count);
            for h in plan.hidden() {
                prop_assert_eq!(h.iter().filter(|x| **x).count(), count);
            }
            prop_assert_eq!(plan, m.sample(&g, batch, &mut Rng::new(seed)));
        }

        #[test]
        fn rectangles_respect_area_and_aspect(budget in 1usize..100, seed: u64) {
            let m = beit();
            let mut rng = Rng::new(seed);
            if let Some(r) = m.draw_rect(14, 14, budget, &mut rng) {
                prop_assert!(r.top + r.height <= 14 && r.left + r.width <= 14);
                // Rounding each side by at most 0.5 bounds the area and the aspect ratio.
                let lo = m.min_block.min(budget) as f64;
                let (h, w) = (r.height as f64, r.width as f64);
                prop_assert!((h + 0.5) * (w + 0.5) >= lo, "{r:?} below {lo}");
                prop_assert!((h - 0.5).max(0.0) * (w - 0.5).max(0.0) <= budget as f64, "{r:?}");
                prop_assert!((h + 0.5) / (w - 0.5).max(0.5) >= 0.3, "{r:?}");
                prop_assert!((h - 0.5).max(0.0) / (w + 0.5) <= 1.0 / 0.3, "{r:?}");
            }
        }
    }

    #[test]
    fn beit_masks_are_made_of_large_blocks() {
        // 75 of 196 as in BEiT: a handful of blocks, far fewer groups than random masking.
        let m = beit();
        let mut rng = Rng::new(1);
        let masks: Vec<Vec<bool>> = (0..200).map(|_| m.sample_one(14, 14, &mut rng)).collect();
        let mean = masks.iter().map(|h| components(h, 14)).sum::<usize>() as f64 / 200.0;
        let mut random = vec![vec![false; 196]; 200];
        for h in &mut random {
            for &p in &rng.permutation(196)[..75] {
                h[p] = true;
            }
        }
        let mean_random = random.iter().map(|h| components(h, 14)).sum::<usize>() as f64 / 200.0;
        assert!(mean <= 5.0, "blockwise groups {mean}");
        assert!(mean_random >= 15.0, "random groups {mean_random}");
        // Every position gets hidden sometimes.
        let cover: Vec<usize> = (0..196)
            .map(|p| masks.iter().filter(|h| h[p]).count())
            .collect();
        assert!(cover.iter().all(|&c| c > 0), "{cover:?}");
    }
}
