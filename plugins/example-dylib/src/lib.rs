//! An example third-party plugin, built as a shared library and loaded by `umae` at run time:
//!
//!     cargo build --release -p umae-example-dylib
//!     umae --plugin target/release/libumae_example_dylib.so plugins
//!
//! It adds a masker (`stripes`) and a regularizer (`dyn-uniformity`, the paper's uniformity
//! term written again here, so that a run with it can be compared step by step with the
//! built-in `uniformity`).

use umae_api::burn::tensor::Tensor;
use umae_api::{
    BuildContext, EncoderOutput, MaskPlan, Masker, PatchGeometry, PluginError, Regularizer, Rng, B,
};

umae_sdk::declare_plugin!();

umae_api::params! {
    /// Parameters of the `stripes` masker.
    pub struct StripesParams {
        /// Fraction of patch columns hidden (rounded down, at least one column stays visible).
        pub ratio: f64 = 0.5,
    }
}

/// Hides whole columns of patches, chosen at random for each image.
pub struct Stripes {
    pub ratio: f64,
}

impl Masker for Stripes {
    fn sample(&self, g: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan {
        let (gh, gw) = g.grid();
        let hide = ((gw as f64 * self.ratio) as usize).min(gw - 1);
        let flags: Vec<Vec<bool>> = (0..batch)
            .map(|_| {
                let cols = rng.permutation(gw);
                let hidden: Vec<bool> = (0..gw).map(|c| cols[..hide].contains(&c)).collect();
                (0..gh * gw).map(|p| hidden[p % gw]).collect()
            })
            .collect();
        MaskPlan::from_flags(&flags).expect("the same number of columns in every image")
    }
}

fn build_stripes(p: &StripesParams, _ctx: &BuildContext) -> Result<Stripes, PluginError> {
    if !(0.0..1.0).contains(&p.ratio) {
        return Err(PluginError::Invalid(format!(
            "ratio must be in [0, 1), found {}",
            p.ratio
        )));
    }
    Ok(Stripes { ratio: p.ratio })
}

umae_api::register!(
    Masker,
    "stripes",
    StripesParams,
    build_stripes,
    "Example plugin: hides random whole columns of patches"
);

umae_api::params! {
    /// Parameters of the `dyn-uniformity` regularizer.
    pub struct DynUniformityParams {
        /// Temperature.
        pub tau: f64 = 0.1,
    }
}

/// `mean((F F^T / tau)^2)` of the L2-normalised class tokens (Zhang et al. 2022, Eq. 11).
pub struct DynUniformity {
    pub tau: f64,
}

impl Regularizer for DynUniformity {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        let [b, _, d] = encoded.tokens.dims();
        let f = if encoded.prefix > 0 {
            encoded.tokens.clone().slice([0..b, 0..1]).reshape([b, d])
        } else {
            encoded.pooled.clone()
        };
        let norm = f
            .clone()
            .powf_scalar(2.0)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        let f = f / norm;
        (f.clone().matmul(f.transpose()) / self.tau)
            .powf_scalar(2.0)
            .mean()
    }
}

fn build_uniformity(
    p: &DynUniformityParams,
    _ctx: &BuildContext,
) -> Result<DynUniformity, PluginError> {
    if !(p.tau > 0.0 && p.tau.is_finite()) {
        return Err(PluginError::Invalid(format!(
            "tau must be > 0, found {}",
            p.tau
        )));
    }
    Ok(DynUniformity { tau: p.tau })
}

umae_api::register!(
    Regularizer,
    "dyn-uniformity",
    DynUniformityParams,
    build_uniformity,
    "Example plugin: the U-MAE uniformity term, loaded from a shared library (Zhang et al. 2022)"
);
