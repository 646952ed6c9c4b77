//! What every handler shares: the loaded model's bounds (once ready), the
//! queue, the layout cache and the service options.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::pipeline::cost::CostModel;
use crate::pipeline::layout::Layout;
use crate::pipeline::request::Bounds;
use crate::pipeline::spec::ModelSpecs;
use crate::server::error::ApiError;
use crate::server::jobs::{JobStore, WebhookAllow};
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
    /// What each stage costs on this device (admission).
    pub costs: CostModel,
}

/// A layout kept for `layout_id`: at Kmax, with the guide's size.
#[derive(Clone)]
pub struct CachedLayout {
    pub layout: Arc<Layout>,
    pub source_size: (u32, u32),
    pub layout_size: u32,
}

/// The API key as its SHA-256 digest: the key itself is neither kept nor
/// printable, and a guess is compared digest to digest in constant time, so
/// neither its bytes nor its length show in the timing.
pub struct ApiKey([u8; 32]);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(Self::digest(key))
    }

    fn digest(s: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(s.as_bytes()).into()
    }

    /// Whether `given` is the key (constant time in its content).
    pub fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        Self::digest(given).ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

/// Shared by all handlers.
pub struct AppState {
    pub ready: OnceLock<Arc<Ready>>,
    pub queue: Arc<Queue>,
    pub cache: Mutex<lru::LruCache<String, CachedLayout>>,
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// How long a request's whole body may take to arrive.
    pub body_timeout: Duration,
    /// The API key, if one is required (only its digest is kept).
    pub api_key: Option<ApiKey>,
    /// The key also guards /metrics, /docs and /openapi.json.
    pub protect_all: bool,
    pub shutting_down: AtomicBool,
    /// The models did not load or the device failed: the process is exiting.
    pub failed: AtomicBool,
    pub model_identity: String,
    /// Where the model folder is (its path, or `embedded:models/shapes`).
    pub model_path: String,
    /// The OpenAPI document before the models are loaded (no model bounds).
    pub openapi_generic: String,
    /// Asynchronous jobs.
    pub jobs: JobStore,
    pub webhook_allow: WebhookAllow,
}

impl AppState {
    /// The loaded models, or 503 while loading. A draining server still
    /// answers the requests that reached it (`/ready` already says
    /// `shutting_down`, so no new ones are routed here); the queue refuses
    /// work only once it is closed.
    pub fn ready(&self) -> Result<Arc<Ready>, ApiError> {
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
