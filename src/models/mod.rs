//! Pure model code: tensors in, tensors out; checkpoint key paths in plain sight.

pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_norm;
pub mod dinov2;
pub mod interpolate;
pub mod nn;
pub mod pca;
pub mod resnet;
pub mod schedulers;
#[cfg(test)]
mod test_tensors;
pub mod transformer2d;
pub mod unet;
pub mod unet_blocks;
pub mod unet_layout;
pub mod vae;
