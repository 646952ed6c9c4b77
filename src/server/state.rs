//! What every handler shares: the loaded model's bounds (once ready), the
//! queue, the layout cache and the service options.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::pipeline::layout::Layout;
use crate::pipeline::request::Bounds;
use crate::pipeline::spec::ModelSpecs;
use crate::server::error::ApiError;
use crate::server::queue::Queue;

/// The loaded models, as request handling sees them.
#[derive(Debug)]
pub struct Ready {
    pub specs: ModelSpecs,
    /// The bounds of every request (model specs under the service limits).
    pub bounds: Bounds,
    pub device: String,
    pub dtype: String,
    /// `/openapi.json`: the document with this deployment's bounds.
    pub openapi: String,
}

/// A layout kept for `layout_id`: at Kmax, with the guide's size.
#[derive(Clone)]
pub struct CachedLayout {
    pub layout: Arc<Layout>,
    pub source_size: (u32, u32),
    pub layout_size: u32,
}

/// Shared by all handlers.
pub struct AppState {
    pub ready: OnceLock<Arc<Ready>>,
    pub queue: Arc<Queue>,
    pub cache: Mutex<lru::LruCache<String, CachedLayout>>,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    pub shutting_down: AtomicBool,
    pub model_identity: String,
    /// The OpenAPI document before the models are loaded (no model bounds).
    pub openapi_generic: String,
}

impl AppState {
    /// The loaded models, or 503 while loading / shutting down.
    pub fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Lumen(crate::Error::ShuttingDown));
        }
        self.ready.get().cloned().ok_or(ApiError::NotReady)
    }

    pub fn cache_get(&self, key: &str) -> Option<CachedLayout> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    pub fn cache_put(&self, key: String, value: CachedLayout) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, value);
    }
}
