use umae_api::burn::tensor::Tensor;
use umae_api::{BuildContext, EncoderOutput, PluginError, Regularizer, B};

umae_api::params! {
    /// Parameters of the `my-plugin` regularizer.
    pub struct MyPluginParams {
        /// Target squared norm of the pooled features.
        pub radius: f64 = 1.0,
    }
}

/// A regularizer on the encoder's features. This one pulls the mean squared norm of the pooled
/// features towards `radius`; replace `loss` with your term.
pub struct MyPlugin {
    pub radius: f64,
}

impl Regularizer for MyPlugin {
    fn loss(&self, encoded: &EncoderOutput) -> Tensor<B, 1> {
        let sq = encoded.pooled.clone().powf_scalar(2.0).sum_dim(1).mean();
        (sq - self.radius).powf_scalar(2.0)
    }
}

fn build(p: &MyPluginParams, _ctx: &BuildContext) -> Result<MyPlugin, PluginError> {
    if !(p.radius > 0.0 && p.radius.is_finite()) {
        return Err(PluginError::Invalid(format!(
            "radius must be > 0, found {}",
            p.radius
        )));
    }
    Ok(MyPlugin { radius: p.radius })
}

umae_api::register!(
    Regularizer,
    "my-plugin",
    MyPluginParams,
    build,
    "What the term is (and where it comes from)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use umae_api::burn::prelude::ElementConversion;
    use umae_api::burn::tensor::TensorData;

    #[test]
    fn loss_matches_a_hand_computation() {
        let device = umae_api::burn::DispatchDevice::Flex(Default::default());
        // Two features with squared norms 25 and 1: mean 13, (13 - 1)^2 = 144.
        let pooled =
            Tensor::<B, 2>::from_data(TensorData::new(vec![3.0f32, 4.0, 1.0, 0.0], [2, 2]), &device);
        let encoded = EncoderOutput {
            tokens: pooled.clone().reshape([2, 1, 2]),
            pooled,
            prefix: 0,
        };
        let term = MyPlugin { radius: 1.0 };
        let l: f32 = term.loss(&encoded).into_scalar().elem();
        assert!((l - 144.0).abs() < 1e-3, "{l}");
    }
}
