//! The `pixels` target: predict each hidden patch's pixels (MAE, SimMIM).

use umae_api::burn;
use umae_api::burn::module::Module;
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::Tensor;
use umae_api::serde::{Deserialize, Serialize};
use umae_api::{BuildContext, Mask, PatchGeometry, PixelTarget, PluginError, Target, B};

/// Per-element loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "umae_api::serde")]
pub enum Loss {
    /// Squared error (MAE).
    Mse,
    /// Absolute error (SimMIM).
    L1,
}

umae_api::params! {
    /// Parameters of the `pixels` target.
    pub struct PixelsParams {
        /// Normalise each target patch by its own mean and variance (MAE's norm_pix_loss).
        pub norm_pix: bool = true,
        /// Mse or L1.
        pub loss: Loss = Loss::Mse,
    }
}

/// Pixel reconstruction target over hidden patches.
#[derive(Debug, Clone)]
pub struct Pixels {
    pub geometry: PatchGeometry,
    pub norm_pix: bool,
    pub loss: Loss,
}

/// `[B, C, H, W]` -> `[B, N, p*p*C]`, each patch flattened in (row, column, channel) order
/// as MAE's `patchify`.
pub fn patchify_hwc(images: Tensor<B, 4>, p: usize) -> Tensor<B, 3> {
    let [b, c, h, w] = images.dims();
    let (gh, gw) = (h / p, w / p);
    images
        .reshape([b, c, gh, p, gw, p])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([b, gh * gw, p * p * c])
}

/// Standardise each patch `[B, N, P]` by its own mean and unbiased variance (MAE's
/// norm_pix_loss, with its epsilon 1e-6).
pub fn normalize_patches(t: Tensor<B, 3>) -> Tensor<B, 3> {
    let n = t.dims()[2] as f64;
    let centered = t.clone() - t.mean_dim(2);
    let var = centered.clone().powf_scalar(2.0).sum_dim(2) / (n - 1.0).max(1.0);
    centered / (var + 1e-6).sqrt()
}

/// Inverse of [`patchify_hwc`].
pub fn unpatchify_hwc(patches: Tensor<B, 3>, g: &PatchGeometry) -> Tensor<B, 4> {
    let b = patches.dims()[0];
    let (gh, gw) = g.grid();
    let (p, c) = (g.patch, g.channels);
    patches
        .reshape([b, gh, gw, p, p, c])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([b, c, gh * p, gw * p])
}

impl Target for Pixels {
    fn pred_dim(&self) -> usize {
        self.geometry.patch_dim()
    }

    fn predicts_pixels(&self) -> Option<PixelTarget> {
        Some(match self.norm_pix {
            true => PixelTarget::PerPatchNormalized,
            false => PixelTarget::Raw,
        })
    }

    fn target(&self, images: &Tensor<B, 4>) -> Tensor<B, 3> {
        let t = patchify_hwc(images.clone(), self.geometry.patch);
        if self.norm_pix {
            normalize_patches(t)
        } else {
            t
        }
    }

    fn loss(&self, images: &Tensor<B, 4>, pred: Tensor<B, 3>, mask: &Mask) -> Tensor<B, 1> {
        let target = self.target(images).detach();
        let diff = pred - target;
        let per_elem = match self.loss {
            Loss::Mse => diff.powf_scalar(2.0),
            Loss::L1 => diff.abs(),
        };
        let [b, n, _] = per_elem.dims();
        let per_patch = per_elem.mean_dim(2).reshape([b, n]);
        let hidden = mask.hidden.clone();
        (per_patch * hidden.clone()).sum() / hidden.sum().clamp_min(1.0)
    }
}

fn build(p: &PixelsParams, ctx: &BuildContext) -> Result<Pixels, PluginError> {
    Ok(Pixels {
        geometry: ctx.geometry()?,
        norm_pix: p.norm_pix,
        loss: p.loss,
    })
}

umae_api::register!(
    Target,
    "pixels",
    PixelsParams,
    build,
    "Pixels of hidden patches, optionally normalised per patch; MSE (MAE) or L1 (SimMIM)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::{Distribution, TensorData};
    use umae_api::{Device, MaskPlan};

    fn device() -> Device {
        umae_api::burn::DispatchDevice::Flex(Default::default())
    }

    #[test]
    fn patchify_round_trips_and_orders_channels_last() {
        let d = device();
        let g = PatchGeometry::new(2, 4, 4, 2).unwrap();
        let x = Tensor::<B, 4>::random([3, 2, 4, 4], Distribution::Default, &d);
        let p = patchify_hwc(x.clone(), 2);
        assert_eq!(p.dims(), [3, 4, 8]);
        let back = unpatchify_hwc(p.clone(), &g);
        back.into_data()
            .assert_approx_eq::<f32>(&x.clone().into_data(), Default::default());
        // patch 1 (row 0, col 1), element (r=1, c=0, ch=1) = x[0, 1, 1, 2]
        let v: Vec<f32> = p.slice([0..1, 1..2]).into_data().to_vec().unwrap();
        let want: Vec<f32> = x
            .slice([0..1, 1..2, 1..2, 2..3])
            .into_data()
            .to_vec()
            .unwrap();
        // index = (r * p + c) * C + ch = (1 * 2 + 0) * 2 + 1
        assert_eq!(v[5], want[0]);
    }

    #[test]
    fn loss_averages_hidden_patches_only() {
        let d = device();
        let g = PatchGeometry::new(1, 2, 4, 2).unwrap();
        let t = Pixels {
            geometry: g,
            norm_pix: false,
            loss: Loss::Mse,
        };
        let images = Tensor::<B, 4>::zeros([1, 1, 2, 4], &d);
        // Patch 0 predicted 1 everywhere (error 1), patch 1 predicted 3 (error 9).
        let pred = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.0f32, 1., 1., 1., 3., 3., 3., 3.], [1, 2, 4]),
            &d,
        );
        let only_second = MaskPlan::from_flags(&[vec![false, true]])
            .unwrap()
            .to_device(&d);
        let l: f32 = t
            .loss(&images, pred.clone(), &only_second)
            .into_scalar()
            .elem();
        assert!((l - 9.0).abs() < 1e-6, "{l}");
        let both = MaskPlan::from_flags(&[vec![true, true]])
            .unwrap()
            .to_device(&d);
        let l: f32 = t.loss(&images, pred.clone(), &both).into_scalar().elem();
        assert!((l - 5.0).abs() < 1e-6, "{l}");
        let l1 = Pixels {
            loss: Loss::L1,
            ..t
        };
        let l: f32 = l1.loss(&images, pred, &both).into_scalar().elem();
        assert!((l - 2.0).abs() < 1e-6, "{l}");
    }

    #[test]
    fn norm_pix_standardises_each_patch() {
        let d = device();
        let g = PatchGeometry::new(1, 2, 2, 2).unwrap();
        let t = Pixels {
            geometry: g,
            norm_pix: true,
            loss: Loss::Mse,
        };
        let x =
            Tensor::<B, 4>::from_data(TensorData::new(vec![1.0f32, 2., 3., 4.], [1, 1, 2, 2]), &d);
        let v: Vec<f32> = t.target(&x).into_data().to_vec().unwrap();
        // mean 2.5, unbiased var 5/3
        let s = (5.0f32 / 3.0 + 1e-6).sqrt();
        for (a, b) in v.iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }
}

umae_api::params! {
    /// Parameters of the `identity` encoder.
    pub struct IdentityParams {
        /// Patch side in pixels (only for masking; the features are all pixels).
        pub patch: usize = 4,
    }
}

/// The `identity` encoder: the feature of an image is its normalised pixels, flattened. It has
/// no parameters and cannot be pretrained; it is the raw-pixel baseline of `umae eval`.
#[derive(Module, Clone, Debug)]
pub struct Identity<Bk: Backend> {
    #[module(skip)]
    pub geometry: PatchGeometry,
    #[module(skip)]
    _backend: std::marker::PhantomData<Bk>,
}

impl umae_api::EncoderModule for Identity<B> {
    fn forward(&self, images: Tensor<B, 4>, mask: Option<&Mask>) -> umae_api::EncoderOutput {
        let b = images.dims()[0];
        let g = &self.geometry;
        let mut patches = patchify_hwc(images, g.patch);
        if let Some(m) = mask {
            let w = m.hidden.clone().reshape([b, g.num_patches(), 1]);
            patches = patches * (w.neg() + 1.0);
        }
        let d = g.num_patches() * g.patch_dim();
        let pooled = patches.reshape([b, d]);
        umae_api::EncoderOutput {
            tokens: pooled.clone().reshape([b, 1, d]),
            pooled,
            prefix: 0,
        }
    }

    fn dim(&self) -> usize {
        self.geometry.num_patches() * self.geometry.patch_dim()
    }

    fn mask_mode(&self) -> umae_api::MaskMode {
        umae_api::MaskMode::MaskToken
    }

    fn geometry(&self) -> PatchGeometry {
        self.geometry
    }
}

fn build_identity(p: &IdentityParams, ctx: &BuildContext) -> Result<Identity<B>, PluginError> {
    Ok(Identity {
        geometry: PatchGeometry::new(ctx.channels, ctx.height, ctx.width, p.patch)
            .map_err(PluginError::Invalid)?,
        _backend: std::marker::PhantomData,
    })
}

umae_api::register!(
    Encoder,
    "identity",
    IdentityParams,
    build_identity,
    "Raw pixels as features (no parameters): the baseline for linear probes and kNN"
);
