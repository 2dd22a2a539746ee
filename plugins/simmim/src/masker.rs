use umae_api::{BuildContext, MaskPlan, Masker, PatchGeometry, PluginError, Rng};

umae_api::params! {
    /// Parameters of the `block` masker.
    pub struct BlockParams {
        /// Fraction of mask cells hidden; ceil(cells * ratio) of them, exactly, as in SimMIM.
        pub ratio: f64 = 0.6,
        /// Side of a mask cell in pixels (SimMIM: 32); a multiple of the encoder's patch that
        /// divides the image.
        pub mask_patch_size: usize = 32,
    }
}

/// SimMIM's masking: the image is cut into square cells of `mask_patch_size` pixels, a fixed
/// number of cells is hidden uniformly at random, and every model patch inside a hidden cell is
/// hidden.
#[derive(Debug, Clone)]
pub struct BlockMasker {
    pub ratio: f64,
    pub mask_patch_size: usize,
}

impl BlockMasker {
    /// `(cells per row, cells per column, model patches per cell side)` for this geometry.
    pub fn cells(&self, g: &PatchGeometry) -> Result<(usize, usize, usize), String> {
        let s = self.mask_patch_size;
        if s == 0 || !s.is_multiple_of(g.patch) {
            return Err(format!(
                "mask_patch_size {s} must be a positive multiple of the encoder's patch size {}",
                g.patch
            ));
        }
        if !g.height.is_multiple_of(s) || !g.width.is_multiple_of(s) {
            return Err(format!(
                "mask_patch_size {s} does not divide the image size {}x{}",
                g.height, g.width
            ));
        }
        Ok((g.height / s, g.width / s, s / g.patch))
    }

    /// Hidden cells out of `cells`: ceil(cells * ratio), at most `cells - 1` so that something
    /// stays visible.
    pub fn num_hidden_cells(&self, cells: usize) -> usize {
        ((cells as f64 * self.ratio).ceil() as usize).min(cells.saturating_sub(1))
    }
}

impl Masker for BlockMasker {
    fn sample(&self, g: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan {
        let (ch, cw, scale) = self.cells(g).expect("checked when the masker was built");
        let (_, gw) = g.grid();
        let cells = ch * cw;
        let hide = self.num_hidden_cells(cells);
        let flags: Vec<Vec<bool>> = (0..batch)
            .map(|_| {
                let mut hidden_cell = vec![false; cells];
                for &c in &rng.permutation(cells)[..hide] {
                    hidden_cell[c] = true;
                }
                (0..g.num_patches())
                    .map(|p| {
                        let (row, col) = (p / gw, p % gw);
                        hidden_cell[(row / scale) * cw + col / scale]
                    })
                    .collect()
            })
            .collect();
        MaskPlan::from_flags(&flags).expect("every sample hides the same number of cells")
    }
}

fn build(p: &BlockParams, ctx: &BuildContext) -> Result<BlockMasker, PluginError> {
    if !(p.ratio > 0.0 && p.ratio < 1.0) {
        return Err(PluginError::Invalid(format!(
            "ratio must be in (0, 1), found {}",
            p.ratio
        )));
    }
    let m = BlockMasker {
        ratio: p.ratio,
        mask_patch_size: p.mask_patch_size,
    };
    let (ch, cw, _) = m.cells(&ctx.geometry()?).map_err(PluginError::Invalid)?;
    if ch * cw < 2 {
        return Err(PluginError::Invalid(format!(
            "mask_patch_size {} leaves a single mask cell: nothing could stay visible",
            p.mask_patch_size
        )));
    }
    Ok(m)
}

umae_api::register!(
    Masker,
    "block",
    BlockParams,
    build,
    "SimMIM random masking of large square cells (32 px, ratio 0.6), mapped to model patches (Xie et al. 2022)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use umae_api::Rng;

    proptest! {
        #[test]
        fn hides_whole_cells_in_exact_numbers(
            patch in 1usize..5, scale in 1usize..4, ch in 1usize..6, cw in 1usize..6,
            ratio in 0.05f64..0.95, batch in 1usize..6, seed: u64,
        ) {
            prop_assume!(ch * cw >= 2);
            let s = patch * scale;
            let g = PatchGeometry::new(3, ch * s, cw * s, patch).unwrap();
            let m = BlockMasker { ratio, mask_patch_size: s };
            let plan = m.sample(&g, batch, &mut Rng::new(seed));
            let cells = ch * cw;
            let hidden_cells = m.num_hidden_cells(cells);
            prop_assert!(hidden_cells >= 1 && hidden_cells < cells);
            prop_assert_eq!(hidden_cells, ((cells as f64 * ratio).ceil() as usize).min(cells - 1));
            prop_assert_eq!(plan.num_visible, g.num_patches() - hidden_cells * scale * scale);
            let (_, gw) = g.grid();
            for h in plan.hidden() {
                prop_assert_eq!(h.iter().filter(|x| **x).count(), hidden_cells * scale * scale);
                // Every model patch shares the state of the first patch of its cell.
                for p in 0..g.num_patches() {
                    let (r, c) = (p / gw, p % gw);
                    let corner = (r / scale * scale) * gw + c / scale * scale;
                    prop_assert_eq!(h[p], h[corner]);
                }
            }
            prop_assert_eq!(plan, m.sample(&g, batch, &mut Rng::new(seed)));
        }
    }

    #[test]
    fn simmim_defaults_on_192px_vit_b() {
        // SimMIM's setting: 192x192 images, patch 16, 32-px cells: 36 cells, 22 hidden, 88 of
        // 144 patches hidden.
        let g = PatchGeometry::new(3, 192, 192, 16).unwrap();
        let m = BlockMasker {
            ratio: 0.6,
            mask_patch_size: 32,
        };
        let plan = m.sample(&g, 4, &mut Rng::new(0));
        assert_eq!(plan.num_visible, 144 - 88);
    }

    #[test]
    fn incompatible_sizes_are_explained() {
        let g = PatchGeometry::new(1, 28, 28, 4).unwrap();
        let m = BlockMasker {
            ratio: 0.6,
            mask_patch_size: 6,
        };
        assert!(m
            .cells(&g)
            .unwrap_err()
            .contains("multiple of the encoder's patch size 4"));
        let m = BlockMasker {
            ratio: 0.6,
            mask_patch_size: 8,
        };
        assert!(m
            .cells(&g)
            .unwrap_err()
            .contains("does not divide the image size 28x28"));
    }
}
