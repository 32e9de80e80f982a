//! Evaluation: the kNN monitor, the linear probe, fine-tuning, the alignment maps.

pub mod align;
pub mod finetune;
pub mod knn;
pub mod linear;
