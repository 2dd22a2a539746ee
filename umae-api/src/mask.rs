//! Which patches the encoder sees. A masker produces a [`MaskPlan`] on the host; the runtime
//! turns it into a [`Mask`] of index tensors on the device.

use burn::tensor::{Int, Tensor, TensorData};

use crate::{Device, B};

/// A per-sample ordering of patches in which the first `num_visible` are visible.
///
/// `order[b]` is a permutation of `0..num_patches` (MAE's `ids_shuffle`); every sample has the
/// same number of visible patches, so that visible tokens form a dense `[B, num_visible, D]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskPlan {
    pub num_patches: usize,
    pub num_visible: usize,
    pub order: Vec<Vec<usize>>,
}

impl MaskPlan {
    /// Builds a plan from per-sample masked flags (`true` = hidden). Visible patches come first,
    /// each group in increasing patch order. Fails when samples hide different counts.
    pub fn from_flags(flags: &[Vec<bool>]) -> Result<Self, String> {
        let num_patches = flags.first().map_or(0, |f| f.len());
        let mut order = Vec::with_capacity(flags.len());
        let mut num_visible = None;
        for (b, f) in flags.iter().enumerate() {
            let visible: Vec<usize> = (0..f.len()).filter(|&i| !f[i]).collect();
            let hidden = (0..f.len()).filter(|&i| f[i]);
            if *num_visible.get_or_insert(visible.len()) != visible.len() {
                return Err(format!(
                    "sample {b} has {} visible patches, sample 0 has {}",
                    visible.len(),
                    num_visible.unwrap()
                ));
            }
            order.push(visible.into_iter().chain(hidden).collect());
        }
        Ok(MaskPlan {
            num_patches,
            num_visible: num_visible.unwrap_or(0),
            order,
        })
    }

    pub fn batch(&self) -> usize {
        self.order.len()
    }

    /// The plan of samples `rows` only (a worker's share of a batch).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> MaskPlan {
        MaskPlan {
            num_patches: self.num_patches,
            num_visible: self.num_visible,
            order: self.order[rows].to_vec(),
        }
    }

    /// Visible patch ids per sample (MAE's `ids_keep`).
    pub fn keep(&self) -> Vec<Vec<usize>> {
        self.order
            .iter()
            .map(|o| o[..self.num_visible].to_vec())
            .collect()
    }

    /// The inverse permutation of `order` (MAE's `ids_restore`).
    pub fn restore(&self) -> Vec<Vec<usize>> {
        self.order
            .iter()
            .map(|o| {
                let mut r = vec![0; o.len()];
                for (pos, &patch) in o.iter().enumerate() {
                    r[patch] = pos;
                }
                r
            })
            .collect()
    }

    /// `true` for hidden patches, in patch order.
    pub fn hidden(&self) -> Vec<Vec<bool>> {
        self.order
            .iter()
            .map(|o| {
                let mut h = vec![true; o.len()];
                for &p in &o[..self.num_visible] {
                    h[p] = false;
                }
                h
            })
            .collect()
    }

    /// Device tensors for this plan.
    pub fn to_device(&self, device: &Device) -> Mask {
        let b = self.batch();
        let n = self.num_patches;
        let ints = |rows: Vec<Vec<usize>>, w: usize| {
            let flat: Vec<i64> = rows.into_iter().flatten().map(|v| v as i64).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, w]), device)
        };
        let hidden: Vec<f32> = self
            .hidden()
            .into_iter()
            .flatten()
            .map(|h| if h { 1.0 } else { 0.0 })
            .collect();
        Mask {
            ids_keep: ints(self.keep(), self.num_visible),
            ids_restore: ints(self.restore(), n),
            hidden: Tensor::from_data(TensorData::new(hidden, [b, n]), device),
            plan: self.clone(),
        }
    }
}

/// A mask on the device.
#[derive(Debug, Clone)]
pub struct Mask {
    /// `[B, num_visible]`: visible patch ids.
    pub ids_keep: Tensor<B, 2, Int>,
    /// `[B, N]`: position of each patch in the visible-first order.
    pub ids_restore: Tensor<B, 2, Int>,
    /// `[B, N]`: 1.0 where the patch is hidden.
    pub hidden: Tensor<B, 2>,
    pub plan: MaskPlan,
}

#[cfg(test)]
mod tests {
    use super::MaskPlan;

    #[test]
    fn from_flags_orders_visible_first() {
        let p = MaskPlan::from_flags(&[vec![true, false, true, false]]).unwrap();
        assert_eq!(p.order, vec![vec![1, 3, 0, 2]]);
        assert_eq!(p.keep(), vec![vec![1, 3]]);
        assert_eq!(p.restore(), vec![vec![2, 0, 3, 1]]);
        assert_eq!(p.hidden(), vec![vec![true, false, true, false]]);
        assert!(MaskPlan::from_flags(&[vec![true, false], vec![false, false]]).is_err());
    }
}
