//! Datasets. For now the built-in synthetic one; ImageFolder, packed files and the LEWEL two-view
//! augmentation join with the data issue.

pub mod augment;
pub mod synthetic;

/// ImageNet normalization (torchvision's Normalize constants), RGB.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];
