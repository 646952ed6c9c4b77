//! Pure model code: tensors in, tensors out; checkpoint key paths in plain sight.

pub mod attention;
pub mod dinov2;
pub mod interpolate;
pub mod pca;
