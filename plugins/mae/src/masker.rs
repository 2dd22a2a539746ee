use umae_api::{BuildContext, MaskPlan, Masker, PatchGeometry, PluginError, Rng};

umae_api::params! {
    /// Parameters of the `random` masker.
    pub struct RandomParams {
        /// Fraction of patches hidden; floor(N * (1 - ratio)) stay visible, as in MAE.
        pub ratio: f64 = 0.75,
    }
}

/// MAE's per-sample uniform random masking.
#[derive(Debug, Clone)]
pub struct RandomMasker {
    pub ratio: f64,
}

impl RandomMasker {
    /// Visible patches out of `n`: floor(n * (1 - ratio)), at least one.
    pub fn num_visible(&self, n: usize) -> usize {
        ((n as f64 * (1.0 - self.ratio)) as usize).max(1)
    }
}

impl Masker for RandomMasker {
    fn sample(&self, geometry: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan {
        let n = geometry.num_patches();
        MaskPlan {
            num_patches: n,
            num_visible: self.num_visible(n),
            order: (0..batch).map(|_| rng.permutation(n)).collect(),
        }
    }
}

fn build(p: &RandomParams, _ctx: &BuildContext) -> Result<RandomMasker, PluginError> {
    if !(0.0..1.0).contains(&p.ratio) {
        return Err(PluginError::Invalid(format!(
            "ratio must be in [0, 1), found {}",
            p.ratio
        )));
    }
    Ok(RandomMasker { ratio: p.ratio })
}

umae_api::register!(
    Masker,
    "random",
    RandomParams,
    build,
    "MAE per-sample random masking: a fixed fraction of patches, uniformly at random (He et al. 2022)"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use umae_api::Rng;

    proptest! {
        #[test]
        fn plans_are_exact_permutations(ratio in 0.0f64..0.99, grid in 1usize..16, batch in 1usize..8, seed: u64) {
            let g = PatchGeometry::new(1, grid * 2, grid * 2, 2).unwrap();
            let m = RandomMasker { ratio };
            let plan = m.sample(&g, batch, &mut Rng::new(seed));
            let n = g.num_patches();
            let visible = ((n as f64 * (1.0 - ratio)) as usize).max(1);
            prop_assert_eq!(plan.num_visible, visible);
            prop_assert_eq!(plan.batch(), batch);
            let restore = plan.restore();
            for (o, r) in plan.order.iter().zip(&restore) {
                let mut s = o.clone();
                s.sort();
                prop_assert_eq!(s, (0..n).collect::<Vec<_>>());
                for i in 0..n {
                    prop_assert_eq!(o[r[i]], i);
                    prop_assert_eq!(r[o[i]], i);
                }
            }
            for h in plan.hidden() {
                prop_assert_eq!(h.iter().filter(|x| !**x).count(), visible);
            }
            // Determinism for a seed.
            prop_assert_eq!(plan, m.sample(&g, batch, &mut Rng::new(seed)));
        }
    }

    #[test]
    fn samples_are_independent() {
        let g = PatchGeometry::new(3, 32, 32, 4).unwrap();
        let m = RandomMasker { ratio: 0.75 };
        let plan = m.sample(&g, 64, &mut Rng::new(3));
        // Distinct masks within a batch, and each patch hidden about 75% of the time.
        let hidden = plan.hidden();
        let distinct: std::collections::HashSet<_> = hidden.iter().collect();
        assert_eq!(distinct.len(), 64);
        let mut r = Rng::new(4);
        let trials = 2000;
        let mut count = vec![0usize; 64];
        for _ in 0..trials {
            for (i, h) in m.sample(&g, 1, &mut r).hidden()[0].iter().enumerate() {
                count[i] += *h as usize;
            }
        }
        for c in count {
            let f = c as f64 / trials as f64;
            assert!((f - 0.75).abs() < 0.05, "{f}");
        }
    }
}
