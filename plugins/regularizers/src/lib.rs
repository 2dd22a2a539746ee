//! Regularizers on the encoder's features beyond the paper's uniformity term. Each acts on one
//! feature row per image (`feature: Cls` or `Mean`, as `uniformity`) and returns an unweighted
//! scalar; the recipe's `weight` is its lambda.

use umae_api::burn::tensor::activation::relu;
use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, EncoderOutput, PluginError, Regularizer, B};
use umae_plugin_uniformity::{features, l2_normalize, Feature};

umae_api::params! {
    /// Parameters of the `gaussian-uniformity` regularizer.
    pub struct GaussianParams {
        /// Scale t of the Gaussian potential exp(-t |f_i - f_j|^2) (Wang & Isola: 2).
        pub t: f64 = 2.0,
        /// Cls or Mean.
        pub feature: Feature = Feature::Cls,
    }
}

/// The uniformity loss of Wang & Isola (ICML 2020): with L2-normalised features,
/// `log mean_{i != j} exp(-t |f_i - f_j|^2)`. Lowest when features spread evenly on the sphere.
#[derive(Debug, Clone)]
pub struct GaussianUniformity {
    pub t: f64,
    pub feature: Feature,
}

impl GaussianUniformity {
    pub fn loss_of(&self, f: Tensor<B, 2>) -> Tensor<B, 1> {
        let n = f.dims()[0] as f64;
        let f = l2_normalize(f);
        // |a - b|^2 = 2 - 2 a.b for unit vectors; the n diagonal terms are exp(0) = 1.
        let sq = (f.clone().matmul(f.transpose()).neg() + 1.0) * 2.0;
        let pairs = (sq.clamp_min(0.0) * -self.t).exp().sum() - n;
        (pairs / (n * (n - 1.0)).max(1.0)).clamp_min(1e-30).log()
    }
}

impl Regularizer for GaussianUniformity {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        self.loss_of(features(encoded, self.feature))
    }
}

fn positive(name: &str, v: f64) -> Result<(), PluginError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(PluginError::Invalid(format!(
            "{name} must be > 0, found {v}"
        )))
    }
}

fn non_negative(name: &str, v: f64) -> Result<(), PluginError> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(PluginError::Invalid(format!(
            "{name} must be >= 0, found {v}"
        )))
    }
}

fn build_gaussian(
    p: &GaussianParams,
    _ctx: &BuildContext,
) -> Result<GaussianUniformity, PluginError> {
    positive("t", p.t)?;
    Ok(GaussianUniformity {
        t: p.t,
        feature: p.feature,
    })
}

umae_api::register!(
    Regularizer,
    "gaussian-uniformity",
    GaussianParams,
    build_gaussian,
    "log mean exp(-t |f_i - f_j|^2) of L2-normalised features (Wang & Isola 2020)"
);

umae_api::params! {
    /// Parameters of the `variance-covariance` regularizer.
    pub struct VarCovParams {
        /// Weight of the variance term (VICReg: 25).
        pub variance: f64 = 25.0,
        /// Weight of the covariance term (VICReg: 1).
        pub covariance: f64 = 1.0,
        /// Target standard deviation of each dimension (VICReg: 1).
        pub gamma: f64 = 1.0,
        /// Cls or Mean.
        pub feature: Feature = Feature::Cls,
    }
}

/// VICReg's variance and covariance terms (Bardes, Ponce & LeCun, ICLR 2022) on one view:
/// `variance * mean_j relu(gamma - sqrt(Var f_j + 1e-4)) + covariance * sum_{i != j} C_ij^2 / D`
/// with C the covariance matrix of the batch (unbiased).
#[derive(Debug, Clone)]
pub struct VarianceCovariance {
    pub variance: f64,
    pub covariance: f64,
    pub gamma: f64,
    pub feature: Feature,
}

impl VarianceCovariance {
    pub fn loss_of(&self, f: Tensor<B, 2>) -> Tensor<B, 1> {
        let [n, d] = f.dims();
        let device = f.device();
        let centered = f.clone() - f.mean_dim(0);
        let denom = (n as f64 - 1.0).max(1.0);
        let var = centered.clone().powf_scalar(2.0).sum_dim(0) / denom;
        let std_term = relu((var + 1e-4).sqrt().neg() + self.gamma).mean();
        let cov = centered.clone().transpose().matmul(centered) / denom;
        let diag = cov
            .clone()
            .mask_fill(Tensor::<B, 2>::eye(d, &device).equal_elem(0.0), 0.0);
        let off = (cov.powf_scalar(2.0).sum() - diag.powf_scalar(2.0).sum()) / d as f64;
        std_term * self.variance + off * self.covariance
    }
}

impl Regularizer for VarianceCovariance {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        self.loss_of(features(encoded, self.feature))
    }
}

fn build_varcov(p: &VarCovParams, _ctx: &BuildContext) -> Result<VarianceCovariance, PluginError> {
    non_negative("variance", p.variance)?;
    non_negative("covariance", p.covariance)?;
    positive("gamma", p.gamma)?;
    Ok(VarianceCovariance {
        variance: p.variance,
        covariance: p.covariance,
        gamma: p.gamma,
        feature: p.feature,
    })
}

umae_api::register!(
    Regularizer,
    "variance-covariance",
    VarCovParams,
    build_varcov,
    "VICReg variance + covariance terms on one view (Bardes et al. 2022)"
);

umae_api::params! {
    /// Parameters of the `decorrelation` regularizer.
    pub struct DecorrelationParams {
        /// Cls or Mean.
        pub feature: Feature = Feature::Cls,
    }
}

/// Feature decorrelation (Hua et al., ICCV 2021, "On Feature Decorrelation in Self-Supervised
/// Learning", cited by the paper): the mean squared off-diagonal entry of the batch correlation
/// matrix, `sum_{i != j} R_ij^2 / (D (D - 1))`. 0 for uncorrelated dimensions, 1 when every
/// dimension is the same feature (complete dimensional collapse).
#[derive(Debug, Clone)]
pub struct Decorrelation {
    pub feature: Feature,
}

impl Decorrelation {
    pub fn loss_of(&self, f: Tensor<B, 2>) -> Tensor<B, 1> {
        let [n, d] = f.dims();
        let device = f.device();
        let centered = f.clone() - f.mean_dim(0);
        let std = (centered.clone().powf_scalar(2.0).mean_dim(0) + 1e-8).sqrt();
        let z = centered / std;
        let r = z.clone().transpose().matmul(z) / n as f64;
        let r2 = r.powf_scalar(2.0);
        let diag = r2
            .clone()
            .mask_fill(Tensor::<B, 2>::eye(d, &device).equal_elem(0.0), 0.0);
        (r2.sum() - diag.sum()) / ((d * d.saturating_sub(1)).max(1)) as f64
    }
}

impl Regularizer for Decorrelation {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        self.loss_of(features(encoded, self.feature))
    }
}

fn build_decorrelation(
    p: &DecorrelationParams,
    _ctx: &BuildContext,
) -> Result<Decorrelation, PluginError> {
    Ok(Decorrelation { feature: p.feature })
}

umae_api::register!(
    Regularizer,
    "decorrelation",
    DecorrelationParams,
    build_decorrelation,
    "Mean squared off-diagonal feature correlation (Hua et al. 2021, feature decorrelation)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::TensorData;
    use umae_api::burn::DispatchDevice;

    fn device() -> umae_api::Device {
        DispatchDevice::Flex(Default::default())
    }

    fn rows(v: Vec<f32>, n: usize, d: usize) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, [n, d]), &device())
    }

    fn value(t: Tensor<B, 1>) -> f64 {
        t.into_scalar().elem()
    }

    /// Autodiff gradient against central finite differences, on fixed features spread over
    /// `[-scale, scale]` (fixed, so that no run lands within a finite-difference step of a
    /// hinge such as the variance term's `relu(gamma - std)`).
    fn check_gradient_at(scale: f32, loss: impl Fn(Tensor<B, 2>) -> Tensor<B, 1>) {
        let vals: Vec<f32> = (0..24usize)
            .map(|i| scale * (((i * 7919 + 13) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        let x = rows(vals.clone(), 6, 4).require_grad();
        let grads = loss(x.clone()).backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let h = 1e-2f32;
        for i in 0..vals.len() {
            let (mut p, mut m) = (vals.clone(), vals.clone());
            p[i] += h;
            m[i] -= h;
            let num = (value(loss(rows(p, 6, 4))) - value(loss(rows(m, 6, 4)))) / (2.0 * h as f64);
            assert!(
                (num - g[i] as f64).abs() < 3e-2 * (1.0 + num.abs()),
                "coord {i}: numeric {num} vs autodiff {}",
                g[i]
            );
        }
    }

    #[test]
    fn gaussian_uniformity_by_hand() {
        let u = GaussianUniformity {
            t: 2.0,
            feature: Feature::Cls,
        };
        // Two orthogonal unit vectors: |a - b|^2 = 2, loss = log exp(-4) = -4.
        let l = value(u.loss_of(rows(vec![3.0, 0.0, 0.0, 0.5], 2, 2)));
        assert!((l + 4.0).abs() < 1e-5, "{l}");
        // Identical vectors: distance 0, loss log 1 = 0 (the maximum).
        let l = value(u.loss_of(rows(vec![1.0, 1.0, 2.0, 2.0], 2, 2)));
        assert!(l.abs() < 1e-5, "{l}");
        // Opposite vectors: |a - b|^2 = 4, loss -8.
        let l = value(u.loss_of(rows(vec![1.0, 0.0, -1.0, 0.0], 2, 2)));
        assert!((l + 8.0).abs() < 1e-4, "{l}");
        check_gradient_at(1.0, |f| u.loss_of(f));
    }

    #[test]
    fn variance_covariance_by_hand() {
        let v = VarianceCovariance {
            variance: 25.0,
            covariance: 1.0,
            gamma: 1.0,
            feature: Feature::Cls,
        };
        // Rows (1, 1), (-1, -1): each dimension has unbiased variance 2 (std ~1.414 > 1, so
        // no variance penalty); covariance 2 off the diagonal: (2^2 + 2^2) / 2 = 4.
        let l = value(v.loss_of(rows(vec![1.0, 1.0, -1.0, -1.0], 2, 2)));
        assert!((l - 4.0).abs() < 1e-4, "{l}");
        // A constant batch: std sqrt(1e-4) = 0.01 in both dimensions, penalty 25 * 0.99.
        let l = value(v.loss_of(rows(vec![3.0, 3.0, 3.0, 3.0], 2, 2)));
        assert!((l - 25.0 * 0.99).abs() < 1e-3, "{l}");
        // Column stds of about 0.6 (the variance penalty active) and about 2.4 (inactive).
        check_gradient_at(1.0, |f| v.loss_of(f));
        check_gradient_at(4.0, |f| v.loss_of(f));
    }

    #[test]
    fn decorrelation_by_hand() {
        let c = Decorrelation {
            feature: Feature::Cls,
        };
        // Perfectly correlated dimensions: R_01 = R_10 = 1, loss 1.
        let l = value(c.loss_of(rows(vec![1.0, 2.0, -1.0, -2.0, 3.0, 6.0], 3, 2)));
        assert!((l - 1.0).abs() < 1e-4, "{l}");
        // Uncorrelated: (1, 1), (1, -1), (-1, 1), (-1, -1).
        let l = value(c.loss_of(rows(vec![1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0], 4, 2)));
        assert!(l.abs() < 1e-6, "{l}");
        check_gradient_at(1.0, |f| c.loss_of(f));
    }
}
