//! Evaluation of a frozen or fine-tuned encoder: cached features, the linear probe, kNN and
//! full fine-tuning.

pub mod features;
pub mod finetune;
pub mod lbfgs;
pub mod linear;
