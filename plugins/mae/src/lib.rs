//! MAE (He et al. 2022): the `random` masker and the `mae` transformer decoder.

mod decoder;
mod masker;

pub use decoder::{MaeDecoder, MaeDecoderParams};
pub use masker::{RandomMasker, RandomParams};
