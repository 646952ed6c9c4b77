//! `lumen serve`: the HTTP service. The server translates HTTP to jobs and
//! back; the models live on one inference thread.
//!
//! - [`args`]: the options (flags and environment variables).
//! - [`router`]: routes and middleware (API key, CORS, request ids, metrics).
//! - [`handlers`]: one file per endpoint group; [`body`] reads JSON and
//!   multipart bodies into the request model; [`negotiate`] picks the
//!   answer's media type.
//! - [`api`]: the answers' wire types; [`openapi`]: the document.
//! - [`conn`]: the accept loop (header timeout, graceful drain).
//! - [`queue`]: admission (429) and the jobs waiting; dropping cancelled,
//!   abandoned and late ones.
//! - [`engine`]: the inference thread and its step-level scheduling.
//! - [`jobs`]: asynchronous jobs (status, events, cancel, callbacks).
//! - [`error`]: the one error → status map.
//! - [`metrics`]: Prometheus metrics.
//! - [`state`]: what the handlers share.

pub mod api;
pub mod args;
pub mod body;
pub mod conn;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod jobs;
pub mod metrics;
pub mod negotiate;
pub mod openapi;
pub mod queue;
pub mod router;
pub mod state;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use tokio::sync::mpsc;

use crate::config::{device_name, dtype_name, parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::pipeline::request::Bounds;
use crate::pipeline::synthesis::Precision;
use crate::server::engine::EngineOptions;
use crate::server::jobs::{JobStore, StoreLimits, WebhookAllow};
use crate::server::queue::Queue;
use crate::server::state::{AppState, Ready};

pub use args::ServeArgs;

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

/// A started service: the router over its state, the batcher, the inference
/// thread (loading, then serving). Must be started inside a tokio runtime;
/// the router can be served over TCP ([`serve`]) or called in-process.
pub struct Service {
    pub router: Router,
    pub state: Arc<AppState>,
    queue: Arc<Queue>,
    /// Why the service cannot serve: the models did not load, or the
    /// device failed later (see [`engine`]).
    failed: Option<mpsc::UnboundedReceiver<Error>>,
    thread: std::thread::JoinHandle<()>,
}

impl Service {
    /// Check the options, build the state and the router, start the
    /// inference thread (it loads the models and warms up) and the batcher.
    pub fn start(args: &ServeArgs) -> Result<Self> {
        args.check()?;
        let device = parse_device(&args.device)?;
        let precision = Precision::new(parse_dtype(&args.dtype, &device)?, args.vae_upcast);
        let dtype = precision.weights;
        let source = ModelSource::from_arg(args.models.clone());
        let limits = args.limits();
        let _ = metrics::handle();

        let request_timeout = Duration::from_secs(args.request_timeout_s);
        let queue = Arc::new(Queue::new(args.max_queue, request_timeout));
        let state = Arc::new(AppState {
            ready: OnceLock::new(),
            queue: queue.clone(),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(args.layout_cache).unwrap_or(NonZeroUsize::MIN),
            )),
            body_limit: args.body_limit_mb * 1024 * 1024,
            request_timeout,
            body_timeout: Duration::from_secs(args.body_timeout_s),
            api_key: args.api_key.as_deref().map(state::ApiKey::new),
            protect_all: args.protect_all,
            shutting_down: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            model_identity: source.identity()?,
            model_path: source.location(),
            openapi_generic: openapi::to_pretty(&openapi::document_with(
                &limits,
                None,
                openapi::Deployment {
                    callbacks: None,
                    keyed: args.api_key.is_some(),
                    protect_all: args.protect_all,
                },
            )),
            jobs: JobStore::new(StoreLimits {
                ttl: Duration::from_secs(args.job_ttl_s),
                max_jobs: args.max_jobs,
                max_bytes: args.job_store_mb.saturating_mul(1024 * 1024),
            }),
            webhook_allow: WebhookAllow::parse(&args.webhook_allow)?,
        });
        let router = router::router(state.clone(), &args.cors_origin)?;
        let (failed_tx, failed_rx) = mpsc::unbounded_channel::<Error>();
        let (ready, thread) = engine::start(
            EngineOptions {
                source,
                device: device.clone(),
                precision,
                max_batch: args.max_batch,
                scheduling: args.scheduling,
                max_wait: Duration::from_millis(args.max_wait_ms),
                failed: failed_tx.clone(),
            },
            queue.clone(),
        )?;

        // Readiness flips once the models are loaded and warmed up and their
        // bounds under the limits are known; a failure stops the service.
        {
            let state = state.clone();
            let (device, dtype) = (device_name(&device), dtype_name(dtype));
            tokio::spawn(async move {
                let engine = match ready.await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => return drop(failed_tx.send(e)),
                    Err(_) => {
                        let e =
                            Error::Internal("the inference thread stopped while loading".into());
                        return drop(failed_tx.send(e));
                    }
                };
                let specs = engine.specs;
                // The largest layout_size whose encoder pass fits the request
                // timeout on this device becomes the limit (and the served
                // document's maximum), so that a valid value is one served.
                let mut limits = limits;
                let fits = |s: u32| {
                    engine
                        .costs
                        .admit_layout(&specs, s, request_timeout.as_secs_f64(), &device)
                        .is_ok()
                };
                if !fits(limits.max_layout_size) {
                    let (mut lo, mut hi) = (specs.layout.patch_size as u32, limits.max_layout_size);
                    while lo + 1 < hi {
                        let mid = lo + (hi - lo) / 2;
                        if fits(mid) {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                    tracing::info!(
                        max_layout_size = lo,
                        "layout sizes above this would not finish within the request timeout"
                    );
                    limits.max_layout_size = lo;
                }
                match Bounds::new(&specs, limits) {
                    Ok(bounds) => {
                        let openapi = openapi::to_pretty(&openapi::document_with(
                            &limits,
                            Some(&bounds),
                            openapi::Deployment {
                                callbacks: Some(&state.webhook_allow),
                                keyed: state.api_key.is_some(),
                                protect_all: state.protect_all,
                            },
                        ));
                        let _ = state.ready.set(Arc::new(Ready {
                            specs,
                            bounds,
                            device,
                            dtype,
                            openapi,
                            costs: engine.costs,
                        }));
                        tracing::info!("ready");
                    }
                    Err(e) => drop(failed_tx.send(e)),
                }
            });
        }
        Ok(Self {
            router,
            state,
            queue,
            failed: Some(failed_rx),
            thread,
        })
    }

    /// Wait until the service is ready, or return why it cannot be.
    pub async fn wait_ready(&mut self) -> Result<()> {
        loop {
            if self.state.ready.get().is_some() {
                return Ok(());
            }
            if let Some(rx) = &mut self.failed {
                if let Ok(e) = rx.try_recv() {
                    return Err(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop taking work, let the inference thread finish what it has, stop it.
    pub async fn stop(self) {
        self.state.shutting_down.store(true, Ordering::SeqCst);
        self.queue.close();
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Run the service until SIGTERM or Ctrl-C, then drain: stop accepting,
/// finish the requests in flight, stop the inference thread, return.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let mut service = Service::start(&args)?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::param("host/port", format!("cannot listen on {addr}: {e}")))?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(address = %local, "listening");

    let failed = service.failed.take();
    let load_error: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let shutdown = {
        let state = service.state.clone();
        let load_error = load_error.clone();
        let delay = Duration::from_secs(args.shutdown_delay_s);
        let drain = Duration::from_secs(args.drain_timeout_s);
        let queue = service.queue.clone();
        async move {
            let failed = async {
                match failed {
                    Some(mut rx) => rx.recv().await,
                    None => None,
                }
            };
            let signalled = tokio::select! {
                _ = shutdown_signal() => true,
                Some(e) = failed => {
                    // The models did not load, or the device failed: exit
                    // non-zero (after the drain) so that the replica is replaced.
                    tracing::error!(error = %e, "the service cannot serve; stopping");
                    state.failed.store(true, Ordering::SeqCst);
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    false
                }
            };
            // /ready answers 503 from here on.
            state.shutting_down.store(true, Ordering::SeqCst);
            if signalled && !delay.is_zero() {
                // Keep serving until load balancers have seen /ready fail and
                // route elsewhere; a second signal ends the wait.
                tracing::info!(
                    seconds = delay.as_secs(),
                    "shutdown signal: not ready, still serving"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown_signal() => {}
                }
            }
            tracing::info!(
                seconds = drain.as_secs(),
                "draining: no new connections, finishing the requests in flight"
            );
            // In-flight work gets the drain timeout, then is stopped: its
            // requests answer 503 and their connections close.
            let queue = queue.clone();
            tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                if !queue.is_empty() || !queue.is_closed() {
                    tracing::warn!("drain timeout: stopping the work still in flight");
                }
                queue.abort();
            });
        }
    };
    conn::serve_connections(
        listener,
        service.router.clone(),
        Duration::from_secs(args.header_timeout_s),
        shutdown,
    )
    .await;

    // Every connection is closed: no handler can enqueue any more.
    service.stop().await;
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
