//! The umae plugin contract.
//!
//! Five plugin kinds — [`Masker`], [`Encoder`], [`Decoder`], [`Target`], [`Regularizer`] — the
//! data passed between them, a registry filled with [`register!`], typed parameters declared
//! with [`params!`], and the recipe schema. No training logic lives here.
//!
//! The whole program uses one backend type, [`B`]: burn's runtime-dispatch backend under
//! autodiff, so that the device (CPU, CUDA, libtorch) is chosen at run time while plugins stay
//! ordinary burn modules.

pub mod components;
pub mod de;
pub mod fast;
pub mod geometry;
pub mod mask;
pub mod params;
pub mod precision;
pub mod recipe;
pub mod registry;
pub mod rng;
pub mod store;
pub mod suggest;
pub mod trainable;
pub mod value;

pub use burn;
pub use inventory;
pub use serde;

pub use components::{
    Constant, Decoder, DecoderModule, Encoder, EncoderModule, EncoderOutput, MaskMode, Masker,
    PixelTarget, Preparation, Regularizer, Target, TimmLayout, TimmParam,
};
pub use geometry::PatchGeometry;
pub use mask::{Mask, MaskPlan};
pub use params::{FieldDoc, Params};
pub use registry::{BuildContext, BuildResult, Builder, Plugin, PluginError, PluginKind};
pub use rng::Rng;
pub use trainable::{Grads, Inner, ParamInfo, Trainable};

/// The training backend: burn's runtime-dispatch backend with autodiff.
pub type B = burn::backend::Autodiff<burn::Dispatch>;
/// A device of [`B`].
pub type Device = burn::DispatchDevice;

/// Version of this crate; dynamic plugins must match it.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
