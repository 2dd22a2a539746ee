//! The plugin registry, filled at link time through `inventory`.

use std::fmt;

use crate::components::{Decoder, Encoder, Masker, Regularizer, Target};
use crate::de::DeError;
use crate::geometry::PatchGeometry;
use crate::params::FieldDoc;
use crate::value::Node;
use crate::Device;

/// The five plugin kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    Masker,
    Encoder,
    Decoder,
    Target,
    Regularizer,
}

impl PluginKind {
    pub const ALL: [PluginKind; 5] = [
        PluginKind::Masker,
        PluginKind::Encoder,
        PluginKind::Decoder,
        PluginKind::Target,
        PluginKind::Regularizer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Masker => "masker",
            PluginKind::Encoder => "encoder",
            PluginKind::Decoder => "decoder",
            PluginKind::Target => "target",
            PluginKind::Regularizer => "regularizer",
        }
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// What a builder knows about the model being assembled.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Input images: channels, height, width.
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// The encoder's patch geometry (`None` while the encoder itself is being built).
    pub geometry: Option<PatchGeometry>,
    pub device: Device,
    /// The encoder's feature width (0 until the encoder is built).
    pub encoder_dim: usize,
    /// The target's prediction width per patch (0 until the target is built).
    pub target_dim: usize,
    pub seed: u64,
}

/// What a plugin reports: a bad parameter or combination (the recipe must change), or a
/// failure while it worked (fitting a tokenizer, reading its cache).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A parameter could not be read (unknown field, wrong type).
    #[error("{0}")]
    Params(#[from] DeError),
    /// The parameters were read but make no sense together or with the context.
    #[error("{0}")]
    Invalid(String),
    /// Something failed while the plugin worked (I/O, a device error); not the recipe's fault.
    #[error("{0}")]
    Failed(String),
}

impl BuildContext {
    /// `(encoder_dim, target_dim)`, for decoders, which are built after both.
    pub fn decoder_dims(&self) -> Result<(usize, usize), PluginError> {
        if self.encoder_dim == 0 || self.target_dim == 0 {
            return Err(PluginError::Invalid(
                "the encoder and target must be built first".into(),
            ));
        }
        Ok((self.encoder_dim, self.target_dim))
    }

    /// The patch geometry, for plugins built after the encoder.
    pub fn geometry(&self) -> Result<PatchGeometry, PluginError> {
        self.geometry.ok_or_else(|| {
            PluginError::Invalid(
                "the patch geometry is not known before the encoder is built".into(),
            )
        })
    }
}

pub type BuildResult<T> = Result<Box<T>, PluginError>;

/// A kind-specific constructor from a parameter node.
#[derive(Clone, Copy)]
pub enum Builder {
    Masker(fn(&Node, &BuildContext) -> BuildResult<dyn Masker>),
    Encoder(fn(&Node, &BuildContext) -> BuildResult<dyn Encoder>),
    Decoder(fn(&Node, &BuildContext) -> BuildResult<dyn Decoder>),
    Target(fn(&Node, &BuildContext) -> BuildResult<dyn Target>),
    Regularizer(fn(&Node, &BuildContext) -> BuildResult<dyn Regularizer>),
}

impl Builder {
    pub fn kind(&self) -> PluginKind {
        match self {
            Builder::Masker(_) => PluginKind::Masker,
            Builder::Encoder(_) => PluginKind::Encoder,
            Builder::Decoder(_) => PluginKind::Decoder,
            Builder::Target(_) => PluginKind::Target,
            Builder::Regularizer(_) => PluginKind::Regularizer,
        }
    }
}

/// One registered plugin.
pub struct Plugin {
    pub name: &'static str,
    /// One line: what it is and where it comes from.
    pub doc: &'static str,
    pub params: fn() -> Vec<FieldDoc>,
    /// Read the parameters without building anything (for fast recipe validation).
    pub check: fn(&Node) -> Result<(), PluginError>,
    pub build: Builder,
}

impl Plugin {
    pub fn kind(&self) -> PluginKind {
        self.build.kind()
    }
}

inventory::collect!(Plugin);

/// Registrations refused when their library was loaded (a name clash), by address.
static REFUSED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// Every registration, refused ones included, in registry order.
pub fn all_registered() -> Vec<&'static Plugin> {
    inventory::iter::<Plugin>.into_iter().collect()
}

/// Ignore this registration from now on (a dynamic plugin whose name clashes with one that
/// was there first). Its library stays loaded, since the registry entry lives in it.
pub fn refuse(p: &'static Plugin) {
    REFUSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(p as *const Plugin as usize);
}

fn live() -> impl Iterator<Item = &'static Plugin> {
    let refused = REFUSED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    inventory::iter::<Plugin>
        .into_iter()
        .filter(move |p| !refused.contains(&(*p as *const Plugin as usize)))
}

/// Every plugin of this program (built in, linked or loaded), sorted by kind and name.
pub fn plugins() -> Vec<&'static Plugin> {
    let mut v: Vec<&'static Plugin> = live().collect();
    v.sort_by_key(|p| (p.kind(), p.name));
    v
}

/// The plugin of this kind and name.
pub fn find(kind: PluginKind, name: &str) -> Option<&'static Plugin> {
    live().find(|p| p.kind() == kind && p.name == name)
}

/// Names of all plugins of a kind.
pub fn names(kind: PluginKind) -> Vec<&'static str> {
    plugins()
        .into_iter()
        .filter(|p| p.kind() == kind)
        .map(|p| p.name)
        .collect()
}

/// Registers a plugin in one line:
/// `umae_api::register!(Regularizer, "uniformity", UniformityParams, build, "doc line");`
///
/// `build` is `fn(&Params, &BuildContext) -> Result<T, PluginError>` where `T` implements the
/// kind's trait (for encoders and decoders: `EncoderModule` / `DecoderModule`).
#[macro_export]
macro_rules! register {
    ($kind:ident, $name:literal, $params:ty, $build:path, $doc:literal) => {
        const _: () = {
            fn __umae_build(
                node: &$crate::value::Node,
                ctx: &$crate::BuildContext,
            ) -> $crate::BuildResult<dyn $crate::$kind> {
                let params = <$params as $crate::Params>::from_node(node)?;
                Ok(::std::boxed::Box::new($build(&params, ctx)?))
            }
            fn __umae_check(
                node: &$crate::value::Node,
            ) -> ::std::result::Result<(), $crate::PluginError> {
                <$params as $crate::Params>::from_node(node)?;
                Ok(())
            }
            $crate::inventory::submit! {
                $crate::Plugin {
                    name: $name,
                    doc: $doc,
                    params: <$params as $crate::Params>::fields,
                    check: __umae_check,
                    build: $crate::Builder::$kind(__umae_build),
                }
            }
        };
    };
}
