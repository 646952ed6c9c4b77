//! `lumen serve`: the HTTP service. The server translates HTTP to jobs and
//! back; the models live on one inference thread.
//!
//! - [`api`]: wire types and the OpenAPI document.
//! - [`handlers`]: request parsing, validation, response encoding.
//! - [`queue`]: admission (429), batching, dropping abandoned jobs.
//! - [`engine`]: the inference thread.
//! - [`error`]: the one error → status map.
//! - [`metrics`]: Prometheus metrics.

pub mod api;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod queue;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candle_core::DType;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::{parse_device, ModelSource};
use crate::error::{Error, Result};
use crate::server::engine::{EngineOptions, ModelSpecs};
use crate::server::error::ApiError;
use crate::server::queue::{BatchOptions, Queue};

/// Options of `lumen serve` (every flag is also an environment variable).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Model folder (see models/README.md); the embedded tiny model if omitted.
    #[arg(long, env = "LUMEN_MODELS")]
    pub models: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "LUMEN_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port; the bound address is logged).
    #[arg(long, env = "LUMEN_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "LUMEN_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Diffusion weights' dtype: auto (f16 on CUDA, f32 on CPU), f32, f16 or bf16.
    /// The DINOv2 encoder and PCA always run in f32.
    #[arg(long, env = "LUMEN_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Most images (or guides) one model call runs.
    #[arg(long, env = "LUMEN_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// How long the oldest queued job waits for a batch to fill, in milliseconds.
    #[arg(long, env = "LUMEN_MAX_WAIT_MS", default_value_t = 20)]
    pub max_wait_ms: u64,
    /// Most requests waiting or running; more are answered 429.
    #[arg(long, env = "LUMEN_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// A request not answered within this many seconds gets 503.
    #[arg(long, env = "LUMEN_REQUEST_TIMEOUT_S", default_value_t = 300)]
    pub request_timeout_s: u64,
    /// Largest request body, in MiB.
    #[arg(long, env = "LUMEN_BODY_LIMIT_MB", default_value_t = 20)]
    pub body_limit_mb: usize,
    /// Require this key on /layout and /synthesize (`Authorization: Bearer KEY` or `X-API-Key: KEY`).
    #[arg(long, env = "LUMEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allowed CORS origins, comma-separated, or `*`; no CORS headers if omitted.
    #[arg(long, env = "LUMEN_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Log format: text or json.
    #[arg(long, env = "LUMEN_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Layouts kept for `layout_id` (LRU).
    #[arg(long, env = "LUMEN_LAYOUT_CACHE", default_value_t = 256)]
    pub layout_cache: usize,
}

impl ServeArgs {
    fn check(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch as u64),
            ("max_queue", self.max_queue as u64),
            ("request_timeout_s", self.request_timeout_s),
            ("body_limit_mb", self.body_limit_mb as u64),
            ("layout_cache", self.layout_cache as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::param(name, "must be at least 1"));
            }
        }
        if self.body_limit_mb > 4096 {
            return Err(Error::param("body_limit_mb", "must be at most 4096"));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::param(
                "log_format",
                format!("`{}` is not text or json", self.log_format),
            ));
        }
        if self.api_key.as_deref() == Some("") {
            return Err(Error::param("api_key", "must not be empty"));
        }
        Ok(())
    }

    /// The dtype the diffusion weights load in.
    pub fn resolve_dtype(&self, device: &candle_core::Device) -> Result<DType> {
        match self.dtype.as_str() {
            "auto" if device.is_cuda() => Ok(DType::F16),
            "auto" | "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(Error::param(
                "dtype",
                format!("`{other}` is not auto, f32, f16 or bf16"),
            )),
        }
    }
}

/// A layout kept for `layout_id`: at Kmax, with the guide's size.
#[derive(Clone)]
pub struct CachedLayout {
    pub layout: Arc<crate::pipeline::layout::Layout>,
    pub source_size: (u32, u32),
    pub layout_size: u32,
}

/// Shared by all handlers.
pub struct AppState {
    pub specs: OnceLock<Arc<ModelSpecs>>,
    pub queue: Arc<Queue>,
    pub cache: Mutex<lru::LruCache<String, CachedLayout>>,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub api_key: Option<String>,
    pub shutting_down: AtomicBool,
    pub model_identity: String,
}

impl AppState {
    /// The loaded models' specs, or 503 while loading / shutting down.
    pub fn specs(&self) -> std::result::Result<Arc<ModelSpecs>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::ShuttingDown);
        }
        self.specs.get().cloned().ok_or(ApiError::NotReady)
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

/// Set up logging for `lumen serve` (text or JSON lines on stderr).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Build the router (exposed for tests and embedding).
pub fn router(state: Arc<AppState>, cors_origins: &[String]) -> Result<Router> {
    use utoipa_swagger_ui::SwaggerUi;
    let protected = Router::new()
        .route("/layout", post(handlers::layout))
        .route("/synthesize", post(handlers::synthesize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let mut app = Router::new()
        .merge(protected)
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")))
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn(metrics::track))
        .with_state(state);
    if !cors_origins.is_empty() {
        app = app.layer(cors_layer(cors_origins)?);
    }
    let request_id = HeaderName::from_static("x-request-id");
    Ok(app
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid)))
}

fn cors_layer(origins: &[String]) -> Result<CorsLayer> {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim()).map_err(|_| {
                    Error::param("cors_origin", format!("`{o}` is not a valid origin"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(Any)
        .expose_headers([HeaderName::from_static("x-request-id")]))
}

/// Middleware: the API key, when one is set.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    match given {
        Some(g) if constant_time_eq(g.trim().as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Run the service until SIGTERM or Ctrl-C, then drain: stop accepting,
/// finish the requests in flight, stop the inference thread, return.
pub async fn serve(args: ServeArgs) -> Result<()> {
    args.check()?;
    let device = parse_device(&args.device)?;
    let dtype = args.resolve_dtype(&device)?;
    let source = ModelSource::from_arg(args.models.clone());
    let _ = metrics::handle();

    let queue = Arc::new(Queue::new(args.max_queue));
    let state = Arc::new(AppState {
        specs: OnceLock::new(),
        queue: queue.clone(),
        cache: Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(args.layout_cache).unwrap_or(NonZeroUsize::MIN),
        )),
        body_limit: args.body_limit_mb * 1024 * 1024,
        request_timeout: Duration::from_secs(args.request_timeout_s),
        api_key: args.api_key.clone(),
        shutting_down: AtomicBool::new(false),
        model_identity: source.identity(),
    });
    let app = router(state.clone(), &args.cors_origin)?;

    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::param("host/port", format!("cannot listen on {addr}: {e}")))?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(address = %local, "listening");

    let (engine, ready, thread) = engine::start(EngineOptions {
        source,
        device,
        dtype,
        max_batch: args.max_batch,
    })?;
    let batcher = tokio::spawn(queue::run_batcher(
        queue.clone(),
        engine,
        BatchOptions {
            max_batch: args.max_batch,
            max_wait: Duration::from_millis(args.max_wait_ms),
        },
    ));

    // Readiness: flips once the models are loaded and warmed up. A load
    // failure stops the server with that error.
    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<Error>();
    {
        let state = state.clone();
        tokio::spawn(async move {
            match ready.await {
                Ok(Ok(specs)) => {
                    let _ = state.specs.set(Arc::new(specs));
                    tracing::info!("ready");
                }
                Ok(Err(e)) => {
                    let _ = load_failed_tx.send(e);
                }
                Err(_) => {
                    let _ = load_failed_tx.send(Error::Internal(
                        "the inference thread stopped while loading".into(),
                    ));
                }
            }
        });
    }

    let load_error: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let shutdown = {
        let state = state.clone();
        let load_error = load_error.clone();
        async move {
            tokio::select! {
                _ = shutdown_signal() => tracing::info!("shutdown signal: draining"),
                Ok(e) = load_failed_rx => {
                    tracing::error!(error = %e, "cannot load the models");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            state.shutting_down.store(true, Ordering::SeqCst);
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Internal(format!("server error: {e}")))?;

    // Every connection is closed: no handler can enqueue any more.
    queue.close();
    let _ = batcher.await;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
