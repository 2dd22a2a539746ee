//! The `hog` target of MaskFeat (Wei et al. 2022): predict each hidden patch's histograms of
//! oriented gradients.
//!
//! Per channel, gradients are central differences (`[-1, 0, 1]`, edges repeated); each pixel
//! votes its gradient magnitude into one of `bins` unsigned orientation bins over [0, pi); votes
//! are summed over square cells of `cell` pixels; a patch's cell histograms are concatenated and
//! L2-normalised per channel. The loss is the mean squared error on hidden patches.

use std::f64::consts::PI;

use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, Mask, PatchGeometry, PluginError, Target, B};

umae_api::params! {
    /// Parameters of the `hog` target.
    pub struct HogParams {
        /// Orientation bins over [0, pi) (MaskFeat: 9).
        pub bins: usize = 9,
        /// Cell side in pixels (MaskFeat: 8); must divide the patch size.
        pub cell: usize = 8,
    }
}

#[derive(Debug, Clone)]
pub struct Hog {
    pub geometry: PatchGeometry,
    pub bins: usize,
    pub cell: usize,
}

impl Hog {
    /// Cells per patch side.
    fn side(&self) -> usize {
        self.geometry.patch / self.cell
    }

    /// Central differences along `dim` (2: rows, 3: columns), edge pixels repeated outside the
    /// image (so the border adds no false edges).
    fn gradient(x: &Tensor<B, 4>, dim: usize) -> Tensor<B, 4> {
        let len = x.dims()[dim];
        let first = x.clone().narrow(dim, 0, 1);
        let last = x.clone().narrow(dim, len - 1, 1);
        let padded = Tensor::cat(vec![first, x.clone(), last], dim);
        padded.clone().narrow(dim, 2, len) - padded.narrow(dim, 0, len)
    }
}

impl Target for Hog {
    fn pred_dim(&self) -> usize {
        self.geometry.channels * self.side() * self.side() * self.bins
    }

    fn target(&self, images: &Tensor<B, 4>) -> Tensor<B, 3> {
        let x = images.clone().detach();
        let [b, c, h, w] = x.dims();
        let gx = Self::gradient(&x, 3);
        let gy = Self::gradient(&x, 2);
        let magnitude = (gx.clone().powf_scalar(2.0) + gy.clone().powf_scalar(2.0)).sqrt();
        // Unsigned orientation in [0, pi).
        let angle = gy.atan2(gx);
        let angle = angle.clone() + angle.lower_elem(0.0).float() * PI;
        let bin = (angle / (PI / self.bins as f64)).floor();
        // An angle of exactly pi is the orientation of 0.
        let wrapped = bin.clone().greater_equal_elem(self.bins as f64).float() * self.bins as f64;
        let bin = (bin - wrapped).clamp(0.0, (self.bins - 1) as f64);
        let (k, hc, wc) = (self.cell, h / self.cell, w / self.cell);
        let hist: Vec<Tensor<B, 4>> = (0..self.bins)
            .map(|i| {
                (magnitude.clone() * bin.clone().equal_elem(i as f64).float())
                    .reshape([b * c * hc, k, wc, k])
                    .sum_dim(3)
                    .sum_dim(1)
                    .reshape([b, c, hc, wc])
            })
            .collect();
        let s = self.side();
        let (gh, gw) = self.geometry.grid();
        let n = gh * gw;
        let per_channel = Tensor::stack::<5>(hist, 4) // [b, c, hc, wc, bins]
            .reshape([b * c, gh, s, gw, s * self.bins])
            .permute([0, 1, 3, 2, 4]) // [b*c, gh, gw, s, s*bins]
            .reshape([b, c, n, s * s * self.bins])
            .swap_dims(1, 2); // [b, n, c, cells*bins]
        let norm = per_channel
            .clone()
            .powf_scalar(2.0)
            .sum_dim(3)
            .sqrt()
            .clamp_min(1e-6);
        (per_channel / norm).reshape([b, n, self.pred_dim()])
    }

    fn loss(&self, images: &Tensor<B, 4>, pred: Tensor<B, 3>, mask: &Mask) -> Tensor<B, 1> {
        let target = self.target(images);
        let [b, n, _] = pred.dims();
        let per_patch = (pred - target).powf_scalar(2.0).mean_dim(2).reshape([b, n]);
        let hidden = mask.hidden.clone();
        (per_patch * hidden.clone()).sum() / hidden.sum().clamp_min(1.0)
    }
}

fn build(p: &HogParams, ctx: &BuildContext) -> Result<Hog, PluginError> {
    let geometry = ctx.geometry()?;
    if p.bins < 2 {
        return Err(PluginError::Invalid(format!(
            "bins must be at least 2, found {}",
            p.bins
        )));
    }
    if p.cell == 0 || !geometry.patch.is_multiple_of(p.cell) {
        return Err(PluginError::Invalid(format!(
            "cell {} must divide the encoder's patch size {}",
            p.cell, geometry.patch
        )));
    }
    Ok(Hog {
        geometry,
        bins: p.bins,
        cell: p.cell,
    })
}

umae_api::register!(
    Target,
    "hog",
    HogParams,
    build,
    "MaskFeat target: per-channel histograms of oriented gradients of hidden patches, MSE (Wei et al. 2022)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::tensor::TensorData;

    fn hog_of(pixels: Vec<f32>, size: usize, patch: usize, cell: usize) -> Vec<Vec<f32>> {
        let d = umae_api::burn::DispatchDevice::Flex(Default::default());
        let g = PatchGeometry::new(1, size, size, patch).unwrap();
        let h = Hog {
            geometry: g,
            bins: 9,
            cell,
        };
        let x = Tensor::<B, 4>::from_data(TensorData::new(pixels, [1, 1, size, size]), &d);
        let t = h.target(&x);
        assert_eq!(t.dims(), [1, g.num_patches(), h.pred_dim()]);
        let v: Vec<f32> = t.into_data().to_vec().unwrap();
        v.chunks(h.pred_dim()).map(|c| c.to_vec()).collect()
    }

    #[test]
    fn edges_vote_into_their_orientation_bin() {
        // 8x8 image, 4x4 patches with one cell each. A vertical edge between columns 3 and 4
        // (horizontal gradient, angle 0) lands in bin 0; a horizontal edge (angle pi/2) in bin 4.
        let vertical: Vec<f32> = (0..64)
            .map(|i| if i % 8 >= 4 { 1.0 } else { 0.0 })
            .collect();
        for patch in hog_of(vertical, 8, 4, 4) {
            assert!((patch[0] - 1.0).abs() < 1e-5, "{patch:?}");
            assert!(patch[1..].iter().all(|v| v.abs() < 1e-6), "{patch:?}");
        }
        let horizontal: Vec<f32> = (0..64)
            .map(|i| if i / 8 >= 4 { 1.0 } else { 0.0 })
            .collect();
        for patch in hog_of(horizontal, 8, 4, 4) {
            assert!((patch[4] - 1.0).abs() < 1e-5, "{patch:?}");
            let rest: f32 = patch
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 4)
                .map(|(_, v)| v.abs())
                .sum();
            assert!(rest < 1e-5, "{patch:?}");
        }
    }

    #[test]
    fn diagonal_gradient_and_cells_per_patch() {
        // Intensity rising along the anti-diagonal: gradient (1, 1), angle pi/4 = 45 degrees,
        // bin floor(45 / 20) = 2. Two cells per patch side.
        let ramp: Vec<f32> = (0..64).map(|i| ((i / 8) + (i % 8)) as f32).collect();
        let patches = hog_of(ramp, 8, 8, 4);
        assert_eq!(patches.len(), 1);
        let p = &patches[0];
        assert_eq!(p.len(), 4 * 9);
        let norm: f32 = p.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        // In every cell, bin 2 holds the largest vote.
        for cell in p.chunks(9) {
            let best = (0..9).max_by(|&a, &b| cell[a].total_cmp(&cell[b])).unwrap();
            assert_eq!(best, 2, "{cell:?}");
        }
    }

    #[test]
    fn flat_patches_give_zero_histograms() {
        for p in hog_of(vec![0.5; 64], 8, 4, 4) {
            assert!(p.iter().all(|v| *v == 0.0), "{p:?}");
        }
    }
}
