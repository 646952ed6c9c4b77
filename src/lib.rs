//! lumen: label-free neural semantic image synthesis (LUMEN, ECCV 2024) as an
//! inference service.
//!
//! - [`models`]: pure model code (DINOv2 encoder, PCA basis, resampling).
//! - [`pipeline`]: orchestration (guide image → neural layout, PCA fitting).
//! - [`guide`]: guide-image decoding, resizing, normalization, previews.
//! - [`config`]: model folders and lumen's own settings.

pub mod bench;
pub mod config;
pub mod embedded;
pub mod error;
pub mod guide;
pub mod models;
pub mod pipeline;

pub use error::{Error, Result};
