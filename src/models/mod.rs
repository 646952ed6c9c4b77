//! Pure model code: tensors in, tensors out; checkpoint key paths in plain sight.

pub mod attention;
pub mod cpu_attention;
pub mod dinov2;
pub mod interpolate;
pub mod nn;
pub mod pca;
pub mod safetensors_io;
