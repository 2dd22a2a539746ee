//! The `uniformity` regularizer of U-MAE (Zhang, Wang & Wang, "How Mask Matters", NeurIPS 2022,
//! Eq. 11): with L2-normalised features F (one row per image) and temperature tau,
//! `L = mean((F F^T / tau)^2)` over the whole B x B matrix, diagonal included, as the authors
//! compute it. Minimising it spreads features over more dimensions and prevents the
//! dimensional collapse of MAE.

use umae_api::burn::tensor::Tensor;
use umae_api::serde::{Deserialize, Serialize};
use umae_api::{BuildContext, EncoderOutput, PluginError, Regularizer, B};

/// Which feature the term acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(crate = "umae_api::serde")]
pub enum Feature {
    /// The first class token (the encoder's pooled feature if it has none).
    Cls,
    /// The mean of the patch tokens.
    Mean,
}

umae_api::params! {
    /// Parameters of the `uniformity` regularizer.
    pub struct UniformityParams {
        /// Temperature of the similarity matrix.
        pub tau: f64 = 0.1,
        /// Cls or Mean.
        pub feature: Feature = Feature::Cls,
    }
}

#[derive(Debug, Clone)]
pub struct Uniformity {
    pub tau: f64,
    pub feature: Feature,
}

/// The feature rows a regularizer reads: `[B, D]`.
pub fn features(encoded: &EncoderOutput, feature: Feature) -> Tensor<B, 2> {
    let [b, t, d] = encoded.tokens.dims();
    let p = encoded.prefix;
    match feature {
        Feature::Cls if p > 0 => encoded.tokens.clone().slice([0..b, 0..1]).reshape([b, d]),
        Feature::Cls => encoded.pooled.clone(),
        Feature::Mean => encoded
            .tokens
            .clone()
            .slice([0..b, p..t])
            .mean_dim(1)
            .reshape([b, d]),
    }
}

/// Row-wise L2 normalisation (with PyTorch's `F.normalize` epsilon 1e-12).
pub fn l2_normalize(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x
        .clone()
        .powf_scalar(2.0)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    x / norm
}

impl Uniformity {
    pub fn loss_of(&self, f: Tensor<B, 2>) -> Tensor<B, 1> {
        let f = l2_normalize(f);
        let s = f.clone().matmul(f.transpose()) / self.tau;
        s.powf_scalar(2.0).mean()
    }
}

impl Regularizer for Uniformity {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        self.loss_of(features(encoded, self.feature))
    }
}

fn build(p: &UniformityParams, _ctx: &BuildContext) -> Result<Uniformity, PluginError> {
    if !(p.tau > 0.0 && p.tau.is_finite()) {
        return Err(PluginError::Invalid(format!(
            "tau must be > 0, found {}",
            p.tau
        )));
    }
    Ok(Uniformity {
        tau: p.tau,
        feature: p.feature,
    })
}

umae_api::register!(
    Regularizer,
    "uniformity",
    UniformityParams,
    build,
    "U-MAE uniformity: mean((F F^T / tau)^2) of L2-normalised features (Zhang et al. 2022, Eq. 11)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::{Distribution, TensorData};
    use umae_api::burn::DispatchDevice;

    #[test]
    fn matches_hand_computation() {
        let d = DispatchDevice::Flex(Default::default());
        // Rows (3, 4) and (1, 0): normalised (0.6, 0.8) and (1, 0); S = [[1, .6], [.6, 1]] / 0.5.
        let f = Tensor::<B, 2>::from_data(TensorData::new(vec![3.0f32, 4., 1., 0.], [2, 2]), &d);
        let u = Uniformity {
            tau: 0.5,
            feature: Feature::Cls,
        };
        let l: f32 = u.loss_of(f).into_scalar().elem();
        let want = (4.0 + 4.0 + 2.0 * 1.2f32.powi(2)) / 4.0;
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let d = DispatchDevice::Flex(Default::default());
        let u = Uniformity {
            tau: 0.1,
            feature: Feature::Cls,
        };
        let x0 = Tensor::<B, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &d);
        let vals: Vec<f32> = x0.to_data().to_vec().unwrap();
        let x = x0.clone().require_grad();
        let grads = u.loss_of(x.clone()).backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let f = |v: &[f32]| -> f64 {
            let t = Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [4, 3]), &d);
            u.loss_of(t).into_scalar().elem::<f64>()
        };
        let h = 1e-2f32;
        for i in 0..vals.len() {
            let mut p = vals.clone();
            p[i] += h;
            let mut m = vals.clone();
            m[i] -= h;
            let num = (f(&p) - f(&m)) / (2.0 * h as f64);
            assert!(
                (num - g[i] as f64).abs() < 2e-2 * (1.0 + num.abs()),
                "coord {i}: numeric {num} vs autodiff {}",
                g[i]
            );
        }
    }
}
