//! BEiT-style masked image modeling (Bao et al. 2022) without a downloaded tokenizer: the
//! `blockwise` masker, the `token-head` decoder and the `tokens` target, whose discrete visual
//! tokens come from a codebook fitted here (k-means), drawn at random (BEST-RQ) or loaded from a
//! file.

mod head;
mod masker;
pub mod tokenizer;
mod tokens;

pub use head::{TokenHead, TokenHeadParams};
pub use masker::{BlockwiseMasker, BlockwiseParams};
pub use tokens::{Tokenizer, Tokens, TokensParams};
