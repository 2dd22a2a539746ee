//! The umae engine, one folder per concern:
//!
//! - [`train`]: the run loop in named phases, resume, faults, metrics;
//! - [`step`]: the objective of Eq. (10) and the online probe;
//! - [`exec`]: where steps run: one device, local replicas, nodes;
//! - [`data`]: datasets, augmentation and the loader;
//! - [`eval`]: frozen features, linear probe, kNN, fine-tuning;
//! - [`analysis`]: effective rank, the mask-ratio study, t-SNE, figures;
//! - [`checkpoint`]: crash-proof checkpoints and where evaluations read an encoder from;
//! - [`interop`]: timm / MAE checkpoints;
//!
//! and beside them model assembly ([`model`]), the optimizer ([`optim`]), dynamic plugins
//! ([`plugins`]), benchmarks ([`bench`]) and the runtime's error type ([`error`]). Plugins never
//! depend on this crate.

pub mod analysis;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod exec;
pub mod interop;
pub mod memory;
pub mod model;
pub mod optim;
pub mod plugins;
pub mod progress;
pub mod step;
pub mod sweep;
pub mod train;

pub use error::{Error, InputKind, Result};
pub use exec::device::{parse_device, parse_devices};
pub use model::{Model, Report};
pub use train::{run, RunOptions, Summary};
