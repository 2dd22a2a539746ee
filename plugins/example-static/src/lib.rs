//! An example of static plugins: an ordinary crate that depends on `umae-api`, registers its
//! components with one `register!` line each, and is linked into a binary of its own that runs
//! the umae command line (`src/main.rs`). Nothing is loaded at run time: the components are
//! part of the binary, like the built-ins.
//!
//! It adds a masker (`center`, hides a square of patches in the middle of every image, an
//! inpainting task) and a regularizer (`batch-std`, keeps every feature dimension spread over
//! the batch: the variance term of VICReg, Bardes et al. 2022).

use umae_api::burn::tensor::Tensor;
use umae_api::{
    BuildContext, EncoderOutput, MaskPlan, Masker, PatchGeometry, PluginError, Regularizer, Rng, B,
};

/// Call from `main` before [`umae::cli::main`]: it makes sure the linker keeps this crate, and
/// with it the registrations.
pub fn link() {
    std::hint::black_box((Center { side: 0 }.side, BatchStd { floor: 0.0 }.floor));
}

umae_api::params! {
    /// Parameters of the `center` masker.
    pub struct CenterParams {
        /// Side of the hidden square, in patches (0: half the grid's shorter side).
        pub side: usize = 0,
    }
}

/// Hides the same central square of `side` x `side` patches in every image.
pub struct Center {
    pub side: usize,
}

impl Masker for Center {
    fn sample(&self, g: &PatchGeometry, batch: usize, _rng: &mut Rng) -> MaskPlan {
        let (gh, gw) = g.grid();
        let (top, left) = ((gh - self.side) / 2, (gw - self.side) / 2);
        let flags: Vec<bool> = (0..gh * gw)
            .map(|p| {
                let (r, c) = (p / gw, p % gw);
                (top..top + self.side).contains(&r) && (left..left + self.side).contains(&c)
            })
            .collect();
        MaskPlan::from_flags(&vec![flags; batch]).expect("the same square in every image")
    }
}

fn build_center(p: &CenterParams, ctx: &BuildContext) -> Result<Center, PluginError> {
    let (gh, gw) = ctx.geometry()?.grid();
    let side = if p.side == 0 { gh.min(gw) / 2 } else { p.side };
    if side == 0 || side > gh.min(gw) || side * side >= gh * gw {
        return Err(PluginError::Invalid(format!(
            "side {side} does not fit the {gh}x{gw} patch grid with a patch left visible"
        )));
    }
    Ok(Center { side })
}

umae_api::register!(
    Masker,
    "center",
    CenterParams,
    build_center,
    "Example static plugin: hides a central square of patches (inpainting)"
);

umae_api::params! {
    /// Parameters of the `batch-std` regularizer.
    pub struct BatchStdParams {
        /// Standard deviation below which a feature dimension is penalised.
        pub floor: f64 = 1.0,
    }
}

/// `mean_j relu(floor - std_j)`, the standard deviation of each dimension of the pooled
/// features over the batch (VICReg's variance term).
pub struct BatchStd {
    pub floor: f64,
}

impl Regularizer for BatchStd {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        let f = encoded.pooled.clone();
        let centered = f.clone() - f.mean_dim(0);
        let std = (centered.powf_scalar(2.0).mean_dim(0) + 1e-4).sqrt();
        (std.neg() + self.floor).clamp_min(0.0).mean()
    }
}

fn build_batch_std(p: &BatchStdParams, _ctx: &BuildContext) -> Result<BatchStd, PluginError> {
    if !(p.floor.is_finite() && p.floor > 0.0) {
        return Err(PluginError::Invalid(format!(
            "floor must be > 0, found {}",
            p.floor
        )));
    }
    Ok(BatchStd { floor: p.floor })
}

umae_api::register!(
    Regularizer,
    "batch-std",
    BatchStdParams,
    build_batch_std,
    "Example static plugin: per-dimension standard deviation floor (VICReg variance term, Bardes et al. 2022)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::tensor::TensorData;

    #[test]
    fn center_hides_the_middle_square() {
        let g = PatchGeometry::new(1, 28, 28, 4).unwrap();
        let plan = Center { side: 3 }.sample(&g, 2, &mut Rng::new(0));
        assert_eq!(plan.num_visible, 49 - 9);
        let hidden = &plan.hidden()[1];
        let rows: Vec<usize> = (0..49).filter(|&p| hidden[p]).collect();
        assert_eq!(rows, [16, 17, 18, 23, 24, 25, 30, 31, 32]);
    }

    #[test]
    fn batch_std_is_the_hinge_of_the_per_dimension_std() {
        let d = umae_api::burn::DispatchDevice::Flex(Default::default());
        // Dimension 0 takes 0 and 2 (std 1: no penalty), dimension 1 is constant (std 0.01).
        let pooled =
            Tensor::<B, 2>::from_data(TensorData::new(vec![0.0f32, 5., 2., 5.], [2, 2]), &d);
        let out = EncoderOutput {
            tokens: Tensor::zeros([2, 1, 2], &d),
            pooled,
            prefix: 0,
        };
        let l: f32 = BatchStd { floor: 1.0 }.loss(&out).into_scalar();
        let expected = ((1.0f64 - (1.0f64 + 1e-4).sqrt()).max(0.0) + (1.0 - 0.01)) / 2.0;
        assert!((l as f64 - expected).abs() < 1e-5, "{l} vs {expected}");
    }
}
