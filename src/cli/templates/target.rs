use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, Mask, PatchGeometry, PluginError, Target, B};

umae_api::params! {
    /// Parameters of the `my-plugin` target.
    pub struct MyPluginParams {
        /// Weight of the loss.
        pub scale: f64 = 1.0,
    }
}

/// A target: what the decoder predicts for each patch and how it is scored. This one predicts
/// each patch's mean intensity per channel with a squared error on hidden patches; replace
/// `target` and `loss` with yours.
pub struct MyPlugin {
    pub geometry: PatchGeometry,
    pub scale: f64,
}

impl Target for MyPlugin {
    fn pred_dim(&self) -> usize {
        self.geometry.channels
    }

    fn target(&self, images: &Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = images.dims();
        let p = self.geometry.patch;
        let (gh, gw) = (h / p, w / p);
        images
            .clone()
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c, p * p])
            .mean_dim(3)
            .reshape([b, gh * gw, c])
    }

    fn loss(&self, images: &Tensor<B, 4>, pred: Tensor<B, 3>, mask: &Mask) -> Tensor<B, 1> {
        let target = self.target(images).detach();
        let [b, n, _] = pred.dims();
        let per_patch = (pred - target).powf_scalar(2.0).mean_dim(2).reshape([b, n]);
        let hidden = mask.hidden.clone();
        (per_patch * hidden.clone()).sum() / hidden.sum().clamp_min(1.0) * self.scale
    }
}

fn build(p: &MyPluginParams, ctx: &BuildContext) -> Result<MyPlugin, PluginError> {
    Ok(MyPlugin {
        geometry: ctx.geometry()?,
        scale: p.scale,
    })
}

umae_api::register!(
    Target,
    "my-plugin",
    MyPluginParams,
    build,
    "What the target is (and where it comes from)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::TensorData;
    use umae_api::MaskPlan;

    #[test]
    fn scores_hidden_patches_only() {
        let d = umae_api::burn::DispatchDevice::Flex(Default::default());
        let t = MyPlugin {
            geometry: PatchGeometry::new(1, 2, 4, 2).unwrap(),
            scale: 1.0,
        };
        // Patch means 1 and 3; predictions 0 and 0; only patch 1 hidden: loss 9.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![1.0f32, 1., 3., 3., 1., 1., 3., 3.], [1, 1, 2, 4]),
            &d,
        );
        let mask = MaskPlan::from_flags(&[vec![false, true]]).unwrap().to_device(&d);
        let l: f32 = t.loss(&x, Tensor::zeros([1, 2, 1], &d), &mask).into_scalar().elem();
        assert!((l - 9.0).abs() < 1e-5, "{l}");
    }
}
