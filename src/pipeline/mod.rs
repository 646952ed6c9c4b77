//! Orchestration over the pure model code: batching, K selection, PCA fitting.

pub mod fit_pca;
pub mod layout;
pub mod synthesis;
