//! HTTP handlers, one file per concern: [`layout`] and [`synthesize`] turn a
//! request into work for the inference thread and encode the answer;
//! [`playground`] serves the page at `/`;
//! [`status`] answers health, readiness, metrics, the OpenAPI document and
//! unknown routes. Shared here: the guide (cache or decode), the queue, the
//! blocking pool. A handler never touches model weights.

pub mod jobs;
pub mod layout;
pub mod playground;
pub mod status;
pub mod synthesize;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::guide;
use crate::pipeline::layout::PreparedGuide;
use crate::pipeline::layout_id::guide_key;
use crate::server::error::{ApiError, ApiResult};
use crate::server::metrics;
use crate::server::queue::{Job, JobWatch, Output, Work};
use crate::server::state::{AppState, CachedLayout, Ready};

/// A guide's layout: already in the cache, or a guide ready for the encoder.
enum GuideLayout {
    Cached(CachedLayout),
    Prepared(PreparedGuide),
}

/// The cache key of a guide and its layout from the cache, else the guide
/// decoded (size checked from the header first) and prepared on the blocking pool.
async fn resolve_guide(
    state: &AppState,
    ready: &Arc<Ready>,
    image: Bytes,
    layout_size: u32,
) -> ApiResult<(String, GuideLayout)> {
    let key = guide_key(&state.model_identity, layout_size, &image);
    if let Some(c) = state.cache_get(&key) {
        return Ok((key, GuideLayout::Cached(c)));
    }
    let ready = ready.clone();
    let guide = blocking(move || {
        let img = guide::decode(&image, ready.bounds.layout.max_image_pixels)?.to_rgb8();
        ready.specs.layout.prepare(&img, Some(layout_size))
    })
    .await?;
    Ok((key, GuideLayout::Prepared(guide)))
}

/// The error of a request that brings no guide image.
fn missing_image(alternative: &str) -> ApiError {
    Error::param(
        "image",
        format!(
            "missing: send the guide image (base64 in JSON, or a multipart file part `image`){alternative}"
        ),
    )
    .into()
}

/// Queue a job (429 at once when the queue is full) and wait for its answer.
async fn enqueue(state: &AppState, work: Work, watch: Arc<dyn JobWatch>) -> ApiResult<Output> {
    let rx = submit(state, work, watch)?;
    answer(state, rx).await
}

/// Queue a job; its answer comes on the receiver.
fn submit(
    state: &AppState,
    work: Work,
    watch: Arc<dyn JobWatch>,
) -> ApiResult<oneshot::Receiver<Result<Output>>> {
    let permit = state
        .queue
        .try_permit()
        .inspect_err(|_| metrics::refused("overloaded"))?;
    let (tx, rx) = oneshot::channel();
    let now = Instant::now();
    state
        .queue
        .push(Job {
            work,
            reply: tx,
            enqueued: now,
            deadline: now + state.request_timeout,
            watch,
            permit,
        })
        .inspect_err(|_| metrics::refused("shutting_down"))?;
    Ok(rx)
}

/// Wait for a queued job's answer. The engine holds the job to the request
/// timeout (stopping it at its next step); this wait gives up a little
/// later, should the engine be stuck in one long call.
async fn answer(state: &AppState, rx: oneshot::Receiver<Result<Output>>) -> ApiResult<Output> {
    let backstop = state.request_timeout + std::time::Duration::from_secs(5);
    match tokio::time::timeout(backstop, rx).await {
        Err(_) => Err(ApiError::Timeout(state.request_timeout.as_secs())),
        Ok(Err(_)) => {
            Err(Error::Internal("the inference thread failed on this request".into()).into())
        }
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Ok(Ok(out))) => Ok(out),
    }
}

/// Run CPU work (decoding, resizing, encoding) off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker task failed: {e}")))?
        .map_err(ApiError::from)
}

fn binary(mime: &'static str, bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, mime)], bytes).into_response()
}

/// One generated image as a raw answer: its bytes, its seed in
/// `x-lumen-seed`, its score (when asked for) in `x-lumen-score`.
fn raw_image(mime: &'static str, bytes: Vec<u8>, seed: u64, score: Option<f32>) -> Response {
    let mut res = binary(mime, bytes);
    res.headers_mut().insert("x-lumen-seed", seed.into());
    if let Some(v) = score.and_then(|s| header::HeaderValue::from_str(&s.to_string()).ok()) {
        res.headers_mut().insert("x-lumen-score", v);
    }
    res
}
