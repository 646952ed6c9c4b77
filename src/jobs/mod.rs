//! Batch jobs over many images: long, resumable, with progress and a summary.
//! They build their work through the request model and the pipeline, as the
//! CLI and the server do.
//!
//! - [`layouts`]: `lumen layouts`, the training-data export.

pub mod layouts;
