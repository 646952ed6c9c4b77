//! The options of `lumen serve` (every flag is also an environment variable).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::pipeline::request::{Limits, DEFAULT_LIMITS};
use crate::server::engine::Scheduling;

/// Options of `lumen serve` (every flag is also an environment variable).
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Model folder (see models/README.md); the embedded shapes model if omitted.
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
    /// Decode with the VAE in f32 when the weights are f16 or bf16 (SD1.5's VAE can
    /// overflow f16 at large sizes). Default: the VAE config's force_upcast (true
    /// unless the config says otherwise); --vae-upcast=false decodes in the weights'
    /// dtype, saving the VAE's f32 memory.
    #[arg(long, env = "LUMEN_VAE_UPCAST", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub vae_upcast: Option<bool>,
    /// Most images in flight on the inference thread (step scheduling) or in
    /// one batch (request scheduling); a larger request runs alone.
    #[arg(long, env = "LUMEN_MAX_BATCH", default_value_t = 4)]
    pub max_batch: usize,
    /// Request scheduling: how long the oldest queued job waits for a batch to
    /// fill, in milliseconds.
    #[arg(long, env = "LUMEN_MAX_WAIT_MS", default_value_t = 20)]
    pub max_wait_ms: u64,
    /// Most requests waiting or running; more are answered 429.
    #[arg(long, env = "LUMEN_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// A request must finish within this many seconds: one estimated (from
    /// the warm-up's measurements) to take longer is refused up front with
    /// 422 over_time_budget, and one still running then is stopped at its
    /// next step (503 timeout).
    #[arg(long, env = "LUMEN_REQUEST_TIMEOUT_S", default_value_t = 300)]
    pub request_timeout_s: u64,
    /// A connection that has not sent a request's headers within this many
    /// seconds is closed (slow clients, and idle keep-alive connections).
    #[arg(long, env = "LUMEN_HEADER_TIMEOUT_S", default_value_t = 30)]
    pub header_timeout_s: u64,
    /// A request whose body has not fully arrived within this many seconds
    /// gets 408 and its connection is closed.
    #[arg(long, env = "LUMEN_BODY_TIMEOUT_S", default_value_t = 60)]
    pub body_timeout_s: u64,
    /// On SIGTERM, answer 503 on /ready but keep serving this many seconds
    /// before closing the listener, so load balancers stop routing here first
    /// (Kubernetes: a preStop sleep does the same). A second signal ends it.
    #[arg(long, env = "LUMEN_SHUTDOWN_DELAY_S", default_value_t = 0)]
    pub shutdown_delay_s: u64,
    /// Largest request body, in MiB.
    #[arg(long, env = "LUMEN_BODY_LIMIT_MB", default_value_t = 20)]
    pub body_limit_mb: usize,
    /// Most denoising steps a request may ask for.
    #[arg(long, env = "LUMEN_MAX_STEPS", default_value_t = DEFAULT_LIMITS.max_steps)]
    pub max_steps: usize,
    /// Longest output side a request may ask for, in pixels.
    #[arg(long, env = "LUMEN_MAX_SIDE", default_value_t = DEFAULT_LIMITS.max_side)]
    pub max_side: u32,
    /// Most images one request may ask for.
    #[arg(long, env = "LUMEN_MAX_IMAGES", default_value_t = DEFAULT_LIMITS.max_images)]
    pub max_images: usize,
    /// Longest encoder input side (layout_size) a request may ask for, in pixels.
    #[arg(long, env = "LUMEN_MAX_LAYOUT_SIZE", default_value_t = DEFAULT_LIMITS.max_layout_size)]
    pub max_layout_size: u32,
    /// Require this key on /layout, /synthesize and /jobs (`Authorization: Bearer KEY` or `X-API-Key: KEY`).
    #[arg(long, env = "LUMEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also require the key on /metrics, /docs and /openapi.json (/health and
    /// /ready stay open for probes). Needs --api-key.
    #[arg(long, env = "LUMEN_PROTECT_ALL")]
    pub protect_all: bool,
    /// Allowed CORS origins, comma-separated, or `*`; no CORS headers if omitted.
    #[arg(long, env = "LUMEN_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Log format: text or json.
    #[arg(long, env = "LUMEN_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Layouts kept for `layout_id` (LRU).
    #[arg(long, env = "LUMEN_LAYOUT_CACHE", default_value_t = 256)]
    pub layout_cache: usize,
    /// How the inference thread batches: `step` advances the running
    /// generations a denoising step at a time and admits new requests between
    /// steps (a short request never waits for a long one to end); `request`
    /// runs one batch of compatible requests to its end before taking more.
    #[arg(long, env = "LUMEN_SCHEDULING", value_enum, default_value = "step")]
    pub scheduling: Scheduling,
    /// On SIGTERM, after the shutdown delay, the work in flight gets this many
    /// seconds to finish; then it is stopped (its requests answer 503) and the
    /// process exits 0. Keep shutdown delay + drain timeout below Kubernetes'
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "LUMEN_DRAIN_TIMEOUT_S", default_value_t = 60)]
    pub drain_timeout_s: u64,
    /// Finished jobs (POST /jobs) are kept this many seconds, then 404.
    #[arg(long, env = "LUMEN_JOB_TTL_S", default_value_t = 3600)]
    pub job_ttl_s: u64,
    /// Most jobs kept (the oldest finished are forgotten first).
    #[arg(long, env = "LUMEN_MAX_JOBS", default_value_t = 1000)]
    pub max_jobs: usize,
    /// Most MiB of finished jobs' results kept.
    #[arg(long, env = "LUMEN_JOB_STORE_MB", default_value_t = 256)]
    pub job_store_mb: usize,
    /// Hosts (`host` or `host:port`, comma-separated) a job's `callback_url`
    /// may name; none by default, so the server never calls out.
    #[arg(long, env = "LUMEN_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,
}

impl ServeArgs {
    /// Options that can be checked before anything starts.
    pub fn check(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch as u64),
            ("max_queue", self.max_queue as u64),
            ("request_timeout_s", self.request_timeout_s),
            ("header_timeout_s", self.header_timeout_s),
            ("body_timeout_s", self.body_timeout_s),
            ("body_limit_mb", self.body_limit_mb as u64),
            ("layout_cache", self.layout_cache as u64),
            ("max_jobs", self.max_jobs as u64),
            ("job_ttl_s", self.job_ttl_s),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::param(name, "must be at least 1"));
            }
        }
        self.limits().check()?;
        crate::server::jobs::WebhookAllow::parse(&self.webhook_allow)?;
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
        if self.protect_all && self.api_key.is_none() {
            return Err(Error::param(
                "protect_all",
                "needs --api-key (LUMEN_API_KEY)",
            ));
        }
        Ok(())
    }

    /// What a request may ask for on this deployment.
    pub fn limits(&self) -> Limits {
        Limits {
            max_steps: self.max_steps,
            max_side: self.max_side,
            max_images: self.max_images,
            max_layout_size: self.max_layout_size,
        }
    }
}
