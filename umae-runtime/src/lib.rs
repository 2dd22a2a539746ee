//! The umae engine: devices, data pipeline, model assembly, optimizer and schedule, trainer,
//! checkpoints, analyses and benchmarks. Plugins never depend on this crate.

pub mod analysis;
pub mod analyze;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod features;
pub mod finetune;
pub mod interop;
pub mod maskratio;
pub mod memory;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod plugins;
pub mod probe;
pub mod progress;
pub mod source;
pub mod step;
pub mod train;
pub mod tsne;

pub use device::{parse_device, parse_devices};
pub use model::{Model, Report};
pub use train::{run, RunOptions, Summary};
