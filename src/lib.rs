//! lumen: label-free neural semantic image synthesis (LUMEN, ECCV 2024) as an
//! inference service.
//!
//! - [`models`]: pure model code (DINOv2, PCA, CLIP text, UNet, ControlNet,
//!   VAE, schedulers).
//! - [`pipeline`]: orchestration (guide image → neural layout, PCA fitting,
//!   layout-conditioned synthesis).
//! - [`guide`]: guide-image decoding, resizing, normalization, previews.
//! - [`config`]: model folders and lumen's own settings.
//! - [`fetch`]: `lumen fetch`, a model folder from Hugging Face Hub repositories.
//! - [`server`]: `lumen serve`, the HTTP service (queue, batching, inference thread).

pub mod bench;
pub mod config;
pub mod embedded;
pub mod error;
pub mod fetch;
pub mod guide;
pub mod models;
pub mod pipeline;
pub mod png_text;
pub mod server;

pub use error::{Error, Result};
