use umae_api::{BuildContext, MaskPlan, Masker, PatchGeometry, PluginError, Rng};

umae_api::params! {
    /// Parameters of the `my-plugin` masker.
    pub struct MyPluginParams {
        /// Patches hidden per image.
        pub count: usize = 10,
    }
}

/// A masker: chooses which patches each image hides. This one hides `count` patches drawn
/// uniformly; replace `sample` with your rule. Every image must hide the same number.
pub struct MyPlugin {
    pub count: usize,
}

impl Masker for MyPlugin {
    fn sample(&self, g: &PatchGeometry, batch: usize, rng: &mut Rng) -> MaskPlan {
        let n = g.num_patches();
        let flags: Vec<Vec<bool>> = (0..batch)
            .map(|_| {
                let mut hidden = vec![false; n];
                for &p in &rng.permutation(n)[..self.count] {
                    hidden[p] = true;
                }
                hidden
            })
            .collect();
        MaskPlan::from_flags(&flags).expect("every image hides `count` patches")
    }
}

fn build(p: &MyPluginParams, ctx: &BuildContext) -> Result<MyPlugin, PluginError> {
    let n = ctx.geometry()?.num_patches();
    if p.count == 0 || p.count >= n {
        return Err(PluginError::Invalid(format!(
            "count must be between 1 and {} (the encoder has {n} patches), found {}",
            n - 1,
            p.count
        )));
    }
    Ok(MyPlugin { count: p.count })
}

umae_api::register!(
    Masker,
    "my-plugin",
    MyPluginParams,
    build,
    "What the masking is (and where it comes from)"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_exactly_count_and_is_deterministic() {
        let g = PatchGeometry::new(1, 28, 28, 4).unwrap();
        let m = MyPlugin { count: 20 };
        let plan = m.sample(&g, 8, &mut Rng::new(1));
        assert_eq!(plan.num_visible, 49 - 20);
        for h in plan.hidden() {
            assert_eq!(h.iter().filter(|x| **x).count(), 20);
        }
        assert_eq!(plan, m.sample(&g, 8, &mut Rng::new(1)));
    }
}
