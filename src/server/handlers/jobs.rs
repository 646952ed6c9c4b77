//! The jobs routes: `POST /jobs` (the `/synthesize` body, answered 202),
//! `GET /jobs/{id}`, `GET /jobs/{id}/events` (Server-Sent Events) and
//! `DELETE /jobs/{id}` (cancel). The records live in [`crate::server::jobs`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use futures_util::stream::{self, Stream};

use super::synthesize::Submission;
use crate::error::Error;
use crate::server::api::ErrorBody;
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::{JobAccepted, JobRecord, JobState, JobStatus};
use crate::server::state::AppState;

/// Start an asynchronous synthesis: the `/synthesize` body (JSON or
/// multipart), plus an optional `callback_url`.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    request_body(
        description = "The `/synthesize` body (JSON or multipart), with an optional `callback_url`: the final status is POSTed there (only to hosts in the server's --webhook-allow).",
        content(
            (crate::pipeline::request::SynthesisRequest = "application/json"),
            (crate::pipeline::request::SynthesisRequest = "multipart/form-data"),
        )
    ),
    responses(
        (status = 202, description = "Queued; follow `Location` (or `links`)", body = JobAccepted,
            headers(("location" = String, description = "/jobs/{id}"))),
        (status = 400, description = "Invalid request or parameter (the message names the field)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown layout_id", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Body neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Image cannot be decoded or is over the pixel limit; or the request would not finish within the request timeout (over_time_budget: the message names the fields to lower and the estimate)", body = ErrorBody),
        (status = 429, description = "Queue or job store full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn create(State(state): State<Arc<AppState>>, req: Request) -> ApiResult<Response> {
    let sub = Submission::read(&state, req, true).await?;
    sub.spawn(state)
}

fn find(state: &AppState, id: &str) -> ApiResult<Arc<JobRecord>> {
    state
        .jobs
        .get(id)
        .ok_or_else(|| ApiError::UnknownJob(id.to_string()))
}

/// A job's status, with its result once succeeded.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown (or expired) job", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobStatus>> {
    Ok(Json(find(&state, &id)?.status()))
}

/// Cancel a job: a queued one leaves the queue, a running one its batch at
/// the next step. Answers the final status; idempotent on finished jobs.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job's status after the cancel (cancelled, or how it had already ended; still running only if its current step outlasted 10 s)", body = JobStatus),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown (or expired) job", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobStatus>> {
    let rec = find(&state, &id)?;
    if rec.cancel() {
        // The engine drops it at its next step (or the queue at its next look).
        let wait = async {
            let mut last = 0;
            while !rec.state().is_final() {
                rec.changed(last).await;
                last = rec.last_event_id();
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
    }
    Ok(Json(rec.status()))
}

/// One image of a succeeded job, raw: the bytes of `result.images[index]`
/// (its format is the request's), for clients that want a file rather than
/// base64 in JSON.
#[utoipa::path(
    get,
    path = "/jobs/{id}/images/{index}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id"),
        ("index" = usize, Path, description = "The image's index in the result, from 0")),
    responses(
        (status = 200, description = "The image (PNGs carry their parameters in an iTXt chunk `parameters`); its seed in `x-lumen-seed`, its score (when asked for) in `x-lumen-score`",
            content(("image/png"), ("image/jpeg"), ("image/webp")),
            headers(("x-lumen-seed" = u64, description = "The image's seed"),
                ("x-lumen-score" = f32, description = "Its fidelity score, when the job asked for scores"))),
        (status = 400, description = "`index` is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown (or expired) job, or no image with that index", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet)", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn image(
    State(state): State<Arc<AppState>>,
    Path((id, index)): Path<(String, String)>,
) -> ApiResult<Response> {
    // An integer of any size is an index (one past the images is 404); what
    // is not an integer is a bad request, answered in JSON.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::param(
            "index",
            format!("`{index}` is not an image index (an integer from 0)"),
        )
        .into());
    }
    let position: usize = index.parse().unwrap_or(usize::MAX);
    let rec = find(&state, &id)?;
    let status = rec.status();
    let Some(result) = status
        .result
        .filter(|_| status.status == JobState::Succeeded)
    else {
        return Err(ApiError::JobNotSucceeded {
            id,
            state: status.status.name(),
        });
    };
    let images = result["images"].as_array().map_or(&[][..], Vec::as_slice);
    let Some(img) = images.get(position) else {
        return Err(ApiError::UnknownImage {
            id,
            index,
            count: images.len(),
        });
    };
    let format = result["parameters"]["format"].as_str().unwrap_or("png");
    let format = crate::pipeline::output::OutputFormat::parse(format)?;
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        img["data"].as_str().unwrap_or_default(),
    )
    .map_err(|e| Error::Internal(format!("a stored image is not base64: {e}")))?;
    let seed = img["seed"].as_u64().unwrap_or_default();
    let score = img["score"].as_f64().map(|s| s as f32);
    Ok(super::raw_image(format.mime(), bytes, seed, score))
}

#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Send a `preview` event (a small PNG of image 0, base64) every N steps
    /// (at most 100000; 0 or absent: none).
    #[param(maximum = 100_000)]
    pub preview: Option<usize>,
}

impl EventsQuery {
    /// The query string's fields (others are ignored), with the service's
    /// JSON errors rather than the extractor's text ones.
    fn parse(query: Option<&str>) -> ApiResult<Self> {
        let mut q = Self::default();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            if k == "preview" {
                let n = Some(&*v)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|n| *n <= 100_000)
                    .ok_or_else(|| {
                        Error::param(
                            "preview",
                            format!("`{v}` is not a step count in 0..=100000"),
                        )
                    })?;
                q.preview = Some(n);
            }
        }
        Ok(q)
    }
}

/// The job's events as Server-Sent Events: `queued` (`position`),
/// `progress` (`step`, `steps`, `eta_s`), `preview` (with `?preview=N`:
/// `step`, `image`, a base64 PNG at latent resolution), and at the end
/// `succeeded` (the result), `failed` or `cancelled` (`error`). Every event
/// has an id; reconnecting with `Last-Event-ID` resumes after it.
#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id"), EventsQuery,
        ("last-event-id" = Option<u64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad `preview` or `Last-Event-ID`", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown (or expired) job", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let rec = find(&state, &id)?;
    let last = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|id| *id <= MAX_EVENT_ID)
            .ok_or_else(|| {
                Error::request(
                    "Last-Event-ID",
                    format!("must be an event id (an integer in 0..={MAX_EVENT_ID})"),
                )
            })?,
    };
    let preview = EventsQuery::parse(query.as_deref())?.preview.unwrap_or(0);
    let guard = PreviewGuard::new(rec.clone(), preview);
    let stream = stream::unfold(
        (guard, last, Vec::new().into_iter(), false),
        |(guard, mut last, mut pending, mut ended)| async move {
            loop {
                if let Some(e) = pending.next() {
                    let e: crate::server::jobs::StoredEvent = e;
                    last = e.id;
                    let event = Event::default()
                        .id(e.id.to_string())
                        .event(e.name)
                        .data(e.data.as_str());
                    return Some((Ok(event), (guard, last, pending, ended)));
                }
                if ended {
                    return None;
                }
                let (events, fin) = guard.rec.events_after(last, guard.every);
                if events.is_empty() {
                    if fin {
                        return None;
                    }
                    guard.rec.changed(last).await;
                    continue;
                }
                // The final event is the last one a finished job has.
                ended = fin;
                pending = events.into_iter();
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The largest `Last-Event-ID` taken (ids count events from 1; this keeps
/// them exact in JavaScript).
const MAX_EVENT_ID: u64 = crate::pipeline::request::MAX_SEED;

/// Registers a stream's preview interval with its job while it is open.
struct PreviewGuard {
    rec: Arc<JobRecord>,
    every: usize,
}

impl PreviewGuard {
    fn new(rec: Arc<JobRecord>, every: usize) -> Self {
        if every > 0 {
            rec.watch_previews(every, true);
        }
        Self { rec, every }
    }
}

impl Drop for PreviewGuard {
    fn drop(&mut self) {
        if self.every > 0 {
            self.rec.watch_previews(self.every, false);
        }
    }
}
