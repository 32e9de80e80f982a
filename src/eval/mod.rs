//! Evaluation: the kNN monitor now; linear probe and fine-tuning later.

pub mod align;
pub mod knn;
pub mod linear;
