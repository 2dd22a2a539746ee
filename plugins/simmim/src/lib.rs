//! SimMIM (Xie et al. 2022): the `block` masker and the `linear` decoder.

mod decoder;
mod masker;

pub use decoder::{LinearDecoder, LinearParams};
pub use masker::{BlockMasker, BlockParams};
