//! Assembling a model from a recipe: plugins resolved by name, built in dependency order
//! (encoder -> masker, target -> decoder -> regularizers), shapes checked between them.

use umae_api::burn::module::Module;
use umae_api::burn::nn::Linear;
use umae_api::burn::prelude::Backend;
use umae_api::burn::tensor::Tensor;
use umae_api::recipe::{ComponentSpec, Recipe, RecipeError};
use umae_api::registry::{self, Builder, PluginKind};
use umae_api::{
    burn, BuildContext, Decoder, Device, Encoder, MaskMode, Masker, PatchGeometry, PluginError,
    Regularizer, Target, Trainable, B,
};

/// A regularizer with its weight (lambda).
pub struct WeightedRegularizer {
    pub name: String,
    pub weight: f64,
    pub term: Box<dyn Regularizer>,
}

/// The online linear probe (Appendix B.5 of the paper): BatchNorm without affine parameters
/// followed by a linear classifier, trained on detached pooled features.
#[derive(Module, Debug)]
pub struct Probe<B: Backend> {
    pub head: Linear<B>,
}

/// The assembled components.
pub struct Model {
    pub masker: Box<dyn Masker>,
    pub encoder: Box<dyn Encoder>,
    pub decoder: Box<dyn Decoder>,
    pub target: Box<dyn Target>,
    pub regularizers: Vec<WeightedRegularizer>,
    pub probe: Option<Probe<B>>,
    pub geometry: PatchGeometry,
    pub names: [String; 4],
    /// Precision of the matrix products in a training step (the recipe's `precision`).
    pub precision: umae_api::precision::Precision,
}

fn plugin(
    kind: PluginKind,
    spec: &ComponentSpec,
    slot: &str,
) -> Result<&'static registry::Plugin, RecipeError> {
    registry::find(kind, &spec.plugin).ok_or_else(|| {
        let names = registry::names(kind);
        RecipeError {
            span: Some(spec.span.clone()),
            message: format!(
                "{slot}: no {kind} plugin named `{}` (available: {})",
                spec.plugin,
                names.join(", ")
            ),
            suggestion: umae_api::suggest::nearest(&spec.plugin, names),
        }
    })
}

fn plugin_error(slot: &str, spec: &ComponentSpec, e: PluginError) -> RecipeError {
    let context = format!("{slot} `{}`: params", spec.plugin);
    match e {
        PluginError::Params(de) => RecipeError::from_de(&context, de),
        PluginError::Invalid(m) | PluginError::Failed(m) => RecipeError::new(
            Some(spec.params.span.clone()),
            format!("{slot} `{}`: {m}", spec.plugin),
        ),
    }
}

impl Model {
    /// Build every component of `recipe` on `device` (seeded).
    pub fn build(recipe: &Recipe, device: &Device) -> Result<Model, RecipeError> {
        crate::plugins::load_all(&recipe.plugins, recipe.path.parent())
            .map_err(|e| RecipeError::new(None, e))?;
        B::seed(device, recipe.seed);
        let d = &recipe.data;
        let mut ctx = BuildContext {
            channels: d.channels,
            height: d.image_size,
            width: d.image_size,
            geometry: None,
            device: device.clone(),
            encoder_dim: 0,
            target_dim: 0,
            seed: recipe.seed,
        };
        let enc_spec = &recipe.encoder;
        let Builder::Encoder(build_enc) = plugin(PluginKind::Encoder, enc_spec, "encoder")?.build
        else {
            unreachable!()
        };
        let encoder =
            build_enc(&enc_spec.params, &ctx).map_err(|e| plugin_error("encoder", enc_spec, e))?;
        ctx.geometry = Some(encoder.geometry());
        ctx.encoder_dim = encoder.dim();

        let m = &recipe.masker;
        let Builder::Masker(build_m) = plugin(PluginKind::Masker, m, "masker")?.build else {
            unreachable!()
        };
        let masker = build_m(&m.params, &ctx).map_err(|e| plugin_error("masker", m, e))?;

        let t = &recipe.target;
        let Builder::Target(build_t) = plugin(PluginKind::Target, t, "target")?.build else {
            unreachable!()
        };
        let target = build_t(&t.params, &ctx).map_err(|e| plugin_error("target", t, e))?;
        ctx.target_dim = target.pred_dim();

        let dspec = &recipe.decoder;
        let Builder::Decoder(build_d) = plugin(PluginKind::Decoder, dspec, "decoder")?.build else {
            unreachable!()
        };
        let decoder =
            build_d(&dspec.params, &ctx).map_err(|e| plugin_error("decoder", dspec, e))?;
        if decoder.out_dim() != target.pred_dim() {
            return Err(RecipeError::new(
                Some(dspec.span.clone()),
                format!(
                    "decoder `{}` predicts {} values per patch but target `{}` needs {}",
                    dspec.plugin,
                    decoder.out_dim(),
                    t.plugin,
                    target.pred_dim()
                ),
            ));
        }
        if !decoder.accepts(encoder.mask_mode()) {
            return Err(RecipeError::new(
                Some(dspec.span.clone()),
                match encoder.mask_mode() {
                    MaskMode::Drop => format!(
                        "decoder `{}` predicts from every patch's token, but encoder `{}` drops hidden patches (Drop mode): set the encoder's `mask_mode: MaskToken`, or use a decoder that restores hidden patches itself (such as `mae`)",
                        dspec.plugin, enc_spec.plugin
                    ),
                    MaskMode::MaskToken => format!(
                        "decoder `{}` cannot read the output of encoder `{}` in MaskToken mode: set the encoder's `mask_mode: Drop`",
                        dspec.plugin, enc_spec.plugin
                    ),
                },
            ));
        }
        let mut regularizers = Vec::new();
        for (i, r) in recipe.regularizers.iter().enumerate() {
            let slot = format!("regularizers[{i}]");
            let spec = &r.component;
            let Builder::Regularizer(build_r) = plugin(PluginKind::Regularizer, spec, &slot)?.build
            else {
                unreachable!()
            };
            let term = build_r(&spec.params, &ctx).map_err(|e| plugin_error(&slot, spec, e))?;
            regularizers.push(WeightedRegularizer {
                name: spec.plugin.clone(),
                weight: r.weight,
                term,
            });
        }
        let probe = recipe.eval.online_probe.then(|| Probe {
            head: burn::nn::LinearConfig::new(encoder.dim(), d.num_classes).init(device),
        });
        Ok(Model {
            geometry: encoder.geometry(),
            masker,
            encoder,
            decoder,
            target,
            regularizers,
            probe,
            names: [
                m.plugin.clone(),
                enc_spec.plugin.clone(),
                dspec.plugin.clone(),
                t.plugin.clone(),
            ],
            precision: recipe.precision,
        })
    }

    /// The pretraining components (encoder, decoder) and the online probe, separately.
    #[allow(clippy::type_complexity)]
    pub fn groups_mut(
        &mut self,
    ) -> (
        Vec<(&'static str, &mut dyn Trainable)>,
        Vec<(&'static str, &mut dyn Trainable)>,
    ) {
        let main: Vec<(&'static str, &mut dyn Trainable)> = vec![
            ("encoder", self.encoder.as_mut() as &mut dyn Trainable),
            ("decoder", self.decoder.as_mut() as &mut dyn Trainable),
        ];
        let probe: Vec<(&'static str, &mut dyn Trainable)> = match &mut self.probe {
            Some(p) => vec![("probe", p as &mut dyn Trainable)],
            None => Vec::new(),
        };
        (main, probe)
    }

    /// The trainable components with their checkpoint prefixes.
    pub fn trainables(&self) -> Vec<(&'static str, &dyn Trainable)> {
        let mut v: Vec<(&'static str, &dyn Trainable)> = vec![
            ("encoder", self.encoder.as_ref() as &dyn Trainable),
            ("decoder", self.decoder.as_ref() as &dyn Trainable),
        ];
        if let Some(p) = &self.probe {
            v.push(("probe", p as &dyn Trainable));
        }
        v
    }

    pub fn trainables_mut(&mut self) -> Vec<(&'static str, &mut dyn Trainable)> {
        let (mut main, probe) = self.groups_mut();
        main.extend(probe);
        main
    }

    /// A summary of the model: components, parameter counts and totals.
    pub fn report(&self) -> Report {
        Report {
            geometry: self.geometry,
            encoder: (
                self.names[1].clone(),
                self.encoder.num_params(),
                self.encoder.fixed_params(),
            ),
            decoder: (
                self.names[2].clone(),
                self.decoder.num_params(),
                self.decoder.fixed_params(),
            ),
            masker: self.names[0].clone(),
            target: (self.names[3].clone(), self.target.pred_dim()),
            regularizers: self
                .regularizers
                .iter()
                .map(|r| (r.name.clone(), r.weight))
                .collect(),
            probe: self.probe.as_ref().map(Trainable::num_params),
        }
    }
}

/// What `umae check` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub geometry: PatchGeometry,
    /// (plugin, trainable parameters, fixed parameters)
    pub encoder: (String, usize, usize),
    pub decoder: (String, usize, usize),
    pub masker: String,
    /// (plugin, prediction width per patch)
    pub target: (String, usize),
    pub regularizers: Vec<(String, f64)>,
    pub probe: Option<usize>,
}

impl Report {
    /// Trainable parameters of encoder + decoder (the MIM model, without the online probe).
    pub fn trainable(&self) -> usize {
        self.encoder.1 + self.decoder.1
    }

    pub fn fixed(&self) -> usize {
        self.encoder.2 + self.decoder.2
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.geometry;
        let (gh, gw) = g.grid();
        let n = |v: usize| group(v);
        writeln!(
            f,
            "input    {}x{}x{} in {gh}x{gw} patches of {}px ({} values each)",
            g.channels,
            g.height,
            g.width,
            g.patch,
            g.patch_dim()
        )?;
        writeln!(f, "masker   {}", self.masker)?;
        writeln!(
            f,
            "encoder  {:<12} {:>14} trainable  {:>12} fixed",
            self.encoder.0,
            n(self.encoder.1),
            n(self.encoder.2)
        )?;
        writeln!(
            f,
            "decoder  {:<12} {:>14} trainable  {:>12} fixed",
            self.decoder.0,
            n(self.decoder.1),
            n(self.decoder.2)
        )?;
        writeln!(
            f,
            "target   {:<12} {} values per patch",
            self.target.0, self.target.1
        )?;
        for (name, w) in &self.regularizers {
            writeln!(f, "regular. {name:<12} weight {w:e}")?;
        }
        if let Some(p) = self.probe {
            writeln!(
                f,
                "probe    linear       {:>14} trainable (online, on detached features)",
                n(p)
            )?;
        }
        writeln!(
            f,
            "total    {:>27} trainable  {:>12} fixed  ({} with fixed)",
            n(self.trainable()),
            n(self.fixed()),
            n(self.trainable() + self.fixed())
        )
    }
}

/// 1234567 -> "1,234,567".
pub fn group(v: usize) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Images `[n, C, S, S]` from host values.
pub fn images_tensor(
    values: Vec<f32>,
    n: usize,
    g: &PatchGeometry,
    device: &Device,
) -> Tensor<B, 4> {
    Tensor::from_data(
        burn::tensor::TensorData::new(values, [n, g.channels, g.height, g.width]),
        device,
    )
}
