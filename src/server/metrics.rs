//! Prometheus metrics: what a dashboard and an autoscaler need. Names are
//! `lumen_<subsystem>_<what>`; durations are histograms in seconds.
//!
//! - `lumen_queue_depth` (gauge): jobs waiting for the inference thread.
//! - `lumen_queue_in_flight` (gauge): jobs in the batch being run.
//! - `lumen_queue_batch_size` (histogram, label `kind` = layout|synthesis):
//!   jobs per batch; `lumen_queue_batch_images` images per synthesis batch.
//! - `lumen_queue_dropped_total` (counter, label `reason` =
//!   disconnected|cancelled|deadline): jobs stopped before they finished
//!   (queued or running).
//! - `lumen_engine_active_images` (gauge): images being denoised;
//!   `lumen_engine_step_images` (histogram): images per ControlNet + UNet
//!   call (step-level batch occupancy);
//!   `lumen_engine_cancel_free_seconds` (histogram): from a cancel (or a
//!   deadline) to the engine having dropped the job.
//! - `lumen_admission_refused_total` (counter, label `reason` =
//!   overloaded|over_time_budget|shutting_down): requests refused up front.
//! - `lumen_jobs_total` (counter, label `status` = succeeded|failed|cancelled):
//!   finished jobs; `lumen_jobs` (gauge, label `status` = queued|running):
//!   jobs by status.
//! - `lumen_stage_duration_seconds` (histogram, label `stage` = queue, layout,
//!   denoise, decode, encode_output).
//! - `lumen_http_requests_total` (counter, labels `endpoint`, `status`) and
//!   `lumen_http_request_duration_seconds` (histogram, label `endpoint`).
//! - `lumen_http_connections_open` (gauge), `lumen_http_connections_total`
//!   (counter): TCP connections; `lumen_http_header_timeouts_total`
//!   (counter): connections closed because headers did not arrive in time.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const QUEUE_DEPTH: &str = "lumen_queue_depth";
pub const IN_FLIGHT: &str = "lumen_queue_in_flight";
pub const BATCH_SIZE: &str = "lumen_queue_batch_size";
pub const BATCH_IMAGES: &str = "lumen_queue_batch_images";
pub const DROPPED: &str = "lumen_queue_dropped_total";
pub const ACTIVE_IMAGES: &str = "lumen_engine_active_images";
pub const STEP_IMAGES: &str = "lumen_engine_step_images";
pub const CANCEL_FREE_SECONDS: &str = "lumen_engine_cancel_free_seconds";
pub const REFUSED: &str = "lumen_admission_refused_total";
pub const JOBS_FINISHED: &str = "lumen_jobs_total";
pub const JOBS: &str = "lumen_jobs";
pub const STAGE_SECONDS: &str = "lumen_stage_duration_seconds";
pub const REQUESTS: &str = "lumen_http_requests_total";
pub const REQUEST_SECONDS: &str = "lumen_http_request_duration_seconds";
pub const CONNECTIONS_OPEN: &str = "lumen_http_connections_open";
pub const CONNECTIONS: &str = "lumen_http_connections_total";
pub const HEADER_TIMEOUTS: &str = "lumen_http_header_timeouts_total";

/// The process-wide recorder (installed on first use) and its renderer.
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0,
            ];
            let sizes = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_IMAGES.into()), &sizes))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STEP_IMAGES.into()), &sizes));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder is installed; ours then stays empty.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(QUEUE_DEPTH, "Jobs waiting for the inference thread");
    metrics::describe_gauge!(IN_FLIGHT, "Jobs in the batch being run");
    metrics::describe_histogram!(BATCH_SIZE, "Jobs per batch");
    metrics::describe_histogram!(BATCH_IMAGES, "Images per synthesis batch");
    metrics::describe_counter!(DROPPED, "Jobs stopped before they finished, by reason");
    metrics::describe_gauge!(ACTIVE_IMAGES, "Images being denoised");
    metrics::describe_histogram!(STEP_IMAGES, "Images per ControlNet + UNet call");
    metrics::describe_histogram!(
        CANCEL_FREE_SECONDS,
        metrics::Unit::Seconds,
        "From a cancel or deadline to the engine dropping the job"
    );
    metrics::describe_counter!(REFUSED, "Requests refused before admission, by reason");
    metrics::describe_counter!(JOBS_FINISHED, "Finished jobs by status");
    metrics::describe_gauge!(JOBS, "Jobs by status (queued, running)");
    metrics::describe_histogram!(
        STAGE_SECONDS,
        metrics::Unit::Seconds,
        "Duration of each pipeline stage"
    );
    metrics::describe_counter!(REQUESTS, "HTTP requests by endpoint and status");
    metrics::describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request duration by endpoint"
    );
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Open TCP connections");
    metrics::describe_counter!(CONNECTIONS, "TCP connections accepted");
    metrics::describe_counter!(
        HEADER_TIMEOUTS,
        "Connections closed because a request's headers did not arrive in time"
    );
    metrics::gauge!(QUEUE_DEPTH).set(0.0);
    metrics::gauge!(IN_FLIGHT).set(0.0);
    metrics::gauge!(ACTIVE_IMAGES).set(0.0);
    metrics::gauge!(CONNECTIONS_OPEN).set(0.0);
    metrics::counter!(CONNECTIONS).absolute(0);
    metrics::counter!(HEADER_TIMEOUTS).absolute(0);
}

/// One open connection, counted in `lumen_http_connections_open` until dropped.
pub struct OpenConnection(());

impl OpenConnection {
    /// Count a connection just accepted.
    pub fn accepted() -> Self {
        metrics::counter!(CONNECTIONS).increment(1);
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        Self(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

pub fn header_timeout() {
    metrics::counter!(HEADER_TIMEOUTS).increment(1);
}

/// Record one stage duration.
pub fn stage(stage: &'static str, seconds: f64) {
    metrics::histogram!(STAGE_SECONDS, "stage" => stage).record(seconds);
}

pub fn gauge_queue_depth(n: usize) {
    metrics::gauge!(QUEUE_DEPTH).set(n as f64);
}

pub fn dropped(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

pub fn cancel_freed(seconds: f64) {
    metrics::histogram!(CANCEL_FREE_SECONDS).record(seconds);
}

pub fn refused(reason: &'static str) {
    metrics::counter!(REFUSED, "reason" => reason).increment(1);
}

pub fn job_finished(status: &'static str) {
    metrics::counter!(JOBS_FINISHED, "status" => status).increment(1);
}

/// Move one job from status gauge `from` to `to` (None: not counted).
pub fn job_moved(from: Option<&'static str>, to: Option<&'static str>) {
    if let Some(f) = from {
        metrics::gauge!(JOBS, "status" => f).decrement(1.0);
    }
    if let Some(t) = to {
        metrics::gauge!(JOBS, "status" => t).increment(1.0);
    }
}

/// Middleware: count every request by route template and status.
pub async fn track(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(REQUESTS, "endpoint" => endpoint.clone(), "status" => status).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "endpoint" => endpoint)
        .record(start.elapsed().as_secs_f64());
    res
}
