//! lumen: label-free neural semantic image synthesis (LUMEN, ECCV 2024) as an
//! inference service.
//!
//! Imports point one way: `server` → `pipeline` → `models` → `model_folder`.
//!
//! - [`model_folder`]: a model set's files (disk or embedded), diffusers
//!   configs, safetensors checkpoints.
//! - [`models`]: pure model code (DINOv2, PCA, CLIP text, UNet, ControlNet,
//!   VAE, schedulers): tensors in, tensors out.
//! - [`config`]: lumen's own settings (`lumen.json`, device, dtype).
//! - [`guide`]: guide-image decoding, resizing, normalization, previews.
//! - [`pipeline`]: the request model, guide image → neural layout, PCA
//!   fitting, layout-conditioned synthesis, encoded outputs.
//! - [`fetch`]: `lumen fetch`, a model folder from Hugging Face Hub repositories.
//! - [`server`]: `lumen serve`, the HTTP service (queue, batching, inference thread).

pub mod bench;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod error;
pub mod fetch;
pub mod guide;
pub mod jobs;
pub mod model_folder;
pub mod models;
pub mod pipeline;
pub mod png_text;
pub mod server;

pub use error::{Error, Result};
