//! Orchestration over the pure model code: the request model, guide image →
//! neural layout, PCA fitting, layout-conditioned synthesis, encoded outputs.
//! No HTTP here.

pub mod cost;
pub mod denoise;
pub mod fit_pca;
pub mod generation;
pub mod layout;
pub mod layout_id;
pub mod output;
pub mod parameters;
pub mod preview;
pub mod request;
pub mod score;
pub mod spec;
pub mod synthesis;
