//! `POST /synthesize`: a guide image (or a cached layout's id) and the
//! parameters in; images out (JSON with base64 images, or one raw image).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use tokio::sync::oneshot;

use super::{answer, blocking, missing_image, raw_image, resolve_guide, submit, GuideLayout};
use crate::error::{Error, Result};
use crate::pipeline::layout_id;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::request::SynthesisParameters;
use crate::pipeline::request::{GuideInfo, SynthesisRequest};
use crate::server::api::ErrorDetail;
use crate::server::api::{ErrorBody, ImageOut, SynthesizeResponse, Timings};
use crate::server::body::{b64, cached_field_types, FieldType, Fields};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::{send_callback, JobAccepted, JobRecord};
use crate::server::metrics;
use crate::server::negotiate::{Accept, ImageAccept};
use crate::server::queue::{
    JobTimings, JobWatch, LayoutInput, Output, SynthesisWork, Unwatched, Work,
};
use crate::server::state::{AppState, CachedLayout, Ready};

static TYPES: OnceLock<HashMap<String, FieldType>> = OnceLock::new();

/// Generate images with the layout of a guide image (or of a cached layout).
#[utoipa::path(
    post,
    path = "/synthesize",
    tag = "lumen",
    request_body(
        description = "JSON: a base64 guide `image` or a `layout_id`, and the generation parameters. Multipart: a guide image file `image` and the parameters as text parts.",
        content(
            (SynthesisRequest = "application/json"),
            (SynthesisRequest = "multipart/form-data"),
        )
    ),
    params(("prefer" = Option<String>, Header, description = "`respond-async` (RFC 7240): answer 202 at once with a job, as POST /jobs does")),
    responses(
        (status = 202, description = "With `Prefer: respond-async`: queued as a job (`Preference-Applied: respond-async`; follow `Location`)", body = crate::server::jobs::JobAccepted),
        (status = 200, description = "The images (seeds seed, seed+1, …). JSON by default; with `Accept: image/png` (or image/jpeg, image/webp) and one image, the raw image (seed in `x-lumen-seed`, with `score: true` the score in `x-lumen-score`). PNGs carry their parameters in an iTXt chunk `parameters`.",
            content(
                (SynthesizeResponse = "application/json"),
                (String = "image/png"),
                (String = "image/jpeg"),
                (String = "image/webp"),
            )),
        (status = 400, description = "Invalid request or parameter (the message names the field)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown layout_id", body = ErrorBody),
        (status = 406, description = "No acceptable response type", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body timeout", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Body neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Image cannot be decoded or is over the pixel limit; or the request would not finish within the request timeout (over_time_budget: the message names the fields to lower and the estimate)", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready, timed out (stopped at its deadline), cancelled or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn synthesize(State(state): State<Arc<AppState>>, req: Request) -> ApiResult<Response> {
    if prefers_async(req.headers()) {
        let sub = Submission::read(&state, req, true).await?;
        let mut res = sub.spawn(state)?;
        res.headers_mut().insert(
            "preference-applied",
            axum::http::HeaderValue::from_static("respond-async"),
        );
        return Ok(res);
    }
    let sub = Submission::read(&state, req, false).await?;
    if sub.callback_url.is_some() {
        return Err(Error::param(
            "callback_url",
            "applies to an asynchronous job: POST /jobs, or send `Prefer: respond-async`",
        )
        .into());
    }
    let accept = sub.accept;
    let answer = sub.run(&state, Arc::new(Unwatched)).await?;
    answer.into_response(accept)
}

/// Whether the request carries `Prefer: respond-async` (RFC 7240).
fn prefers_async(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// A `/synthesize` body read, checked, resolved and admitted (its estimated
/// run time fits the request timeout): ready to queue.
pub(crate) struct Submission {
    accept: ImageAccept,
    pub(crate) work: Work,
    parameters: SynthesisParameters,
    format: OutputFormat,
    guide_key: String,
    source_size: (u32, u32),
    /// Where an asynchronous job's final status goes (checked).
    pub(crate) callback_url: Option<url::Url>,
    pub(crate) estimate_s: f64,
    pub(crate) steps: usize,
    start: Instant,
}

/// A finished synthesis, encoded.
pub(crate) struct Answer {
    encoded: Vec<(u64, Vec<u8>)>,
    scores: Vec<f32>,
    parameters: SynthesisParameters,
    format: OutputFormat,
    timings: JobTimings,
    encode_s: f64,
    start: Instant,
}

impl Submission {
    /// Read the body (JSON or multipart), check every parameter before the
    /// guide is decoded, resolve the guide (cache or decode) and the plan,
    /// and refuse what cannot finish in time. `is_job`: an asynchronous job
    /// (its answer is JSON whatever `Accept` says).
    pub(crate) async fn read(state: &Arc<AppState>, req: Request, is_job: bool) -> ApiResult<Self> {
        let start = Instant::now();
        let ready = state.ready()?;
        let prefs = Accept::parse(req.headers());
        let types = cached_field_types::<SynthesisRequest>(&TYPES);
        let mut fields = Fields::read(state, req, types).await?;
        let image = fields.take_image()?;
        let layout_id = fields.take_str("layout_id")?;
        let callback = fields.take_str("callback_url")?;
        if layout_id.is_some() && fields.is_multipart() {
            // A multipart request uploads its guide; the document says so too.
            return Err(Error::request(
                "layout_id",
                "a multipart request uploads its guide image; send a layout_id in a JSON body",
            )
            .into());
        }
        let callback_url = callback
            .map(|c| state.webhook_allow.check(&c))
            .transpose()?;
        let mut request: SynthesisRequest = fields.parse()?;
        // Every parameter is checked before the guide is decoded.
        request.validate(&ready.bounds)?;
        let accept = if is_job {
            // An asynchronous job's answer is its JSON status.
            ImageAccept::Json
        } else {
            let named = request
                .format
                .is_some()
                .then(|| request.format())
                .transpose()?;
            ImageAccept::negotiate(&prefs, request.num_images(), named)?
        };
        if request.format.is_none() {
            request.format = Some(accept.default_format().name().into());
        }

        let guide = Guide::resolve(state, &ready, &request, image, layout_id).await?;
        let plan = request.resolve(&ready.bounds, &guide.info)?;
        let encodes = matches!(guide.input, LayoutInput::Guide(_));
        let estimate = ready
            .costs
            .admit(
                &ready.specs,
                &plan,
                encodes,
                state.request_timeout.as_secs_f64(),
                &ready.device,
            )
            .inspect_err(|_| metrics::refused("over_time_budget"))?;
        let parameters = plan.parameters(
            layout_id::layout_id(&guide.key, plan.components),
            &ready.specs.model,
        );
        Ok(Self {
            accept,
            format: plan.format,
            steps: plan.settings.steps,
            work: Work::Synthesis(SynthesisWork {
                plan,
                layout: guide.input,
            }),
            parameters,
            guide_key: guide.key,
            source_size: guide.info.source_size,
            callback_url,
            estimate_s: estimate.total_s,
            start,
        })
    }

    /// Queue it as an asynchronous job (429 when full), run it in the
    /// background, and answer 202 with its id and links.
    pub(crate) fn spawn(self, state: Arc<AppState>) -> ApiResult<Response> {
        spawn_job(state, self)
    }

    /// Queue it, wait for the images, encode them.
    pub(crate) async fn run(self, state: &AppState, watch: Arc<dyn JobWatch>) -> ApiResult<Answer> {
        let (rx, pending) = self.queue(state, watch)?;
        pending.finish(state, rx).await
    }

    /// Queue it now (429 when full); [`Pending::finish`] waits for the answer.
    pub(crate) fn queue(
        self,
        state: &AppState,
        watch: Arc<dyn JobWatch>,
    ) -> ApiResult<(oneshot::Receiver<Result<Output>>, Pending)> {
        let rx = submit(state, self.work, watch)?;
        Ok((
            rx,
            Pending {
                parameters: self.parameters,
                format: self.format,
                guide_key: self.guide_key,
                source_size: self.source_size,
                start: self.start,
            },
        ))
    }
}

/// A queued synthesis: what its answer needs besides the images.
pub(crate) struct Pending {
    parameters: SynthesisParameters,
    format: OutputFormat,
    guide_key: String,
    source_size: (u32, u32),
    start: Instant,
}

impl Pending {
    /// Wait for the images, keep a newly computed layout, encode the images.
    pub(crate) async fn finish(
        self,
        state: &AppState,
        rx: oneshot::Receiver<Result<Output>>,
    ) -> ApiResult<Answer> {
        let Output::Synthesis {
            images,
            computed_layout,
            scores,
            timings,
        } = answer(state, rx).await?
        else {
            return Err(Error::Internal("unexpected answer to a synthesis job".into()).into());
        };
        if let Some(layout) = computed_layout {
            state.cache_put(
                self.guide_key.clone(),
                CachedLayout {
                    layout,
                    source_size: self.source_size,
                    layout_size: self.parameters.layout_size,
                },
            );
        }
        let encode_start = Instant::now();
        let record = self.parameters.clone();
        let format = self.format;
        let encoded: Vec<(u64, Vec<u8>)> = blocking(move || {
            images
                .iter()
                .enumerate()
                .map(|(i, img)| {
                    let r = record.for_image(i);
                    Ok((r.seed, format.encode(img, &r)?))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let encode_s = encode_start.elapsed().as_secs_f64();
        metrics::stage("encode_output", encode_s);
        metrics::stage("request_synthesize", self.start.elapsed().as_secs_f64());
        Ok(Answer {
            encoded,
            scores,
            parameters: self.parameters,
            format,
            timings,
            encode_s,
            start: self.start,
        })
    }
}

impl Answer {
    /// The JSON answer.
    pub(crate) fn json(self) -> SynthesizeResponse {
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        let t = self.timings;
        SynthesizeResponse {
            images: self
                .encoded
                .into_iter()
                .enumerate()
                .map(|(i, (seed, bytes))| ImageOut {
                    seed,
                    data: b64(&bytes),
                    score: self.scores.get(i).copied(),
                })
                .collect(),
            parameters: self.parameters,
            timings: Timings {
                queue_ms: ms(t.queue),
                layout_ms: ms(t.layout),
                denoise_ms: ms(t.denoise),
                decode_ms: ms(t.decode),
                score_ms: ms(t.score),
                encode_ms: ms(self.encode_s),
                total_ms: ms(self.start.elapsed().as_secs_f64()),
                batch_images: t.batch_images,
            },
        }
    }

    /// The answer as `accept` asks: JSON, or the one raw image.
    fn into_response(self, accept: ImageAccept) -> ApiResult<Response> {
        if let ImageAccept::Raw(_) = accept {
            let mime = self.format.mime();
            let score = self.scores.first().copied();
            let (seed, bytes) = self
                .encoded
                .into_iter()
                .next()
                .ok_or_else(|| Error::Internal("no image was generated".into()))?;
            return Ok(raw_image(mime, bytes, seed, score));
        }
        Ok(Json(self.json()).into_response())
    }
}

/// [`Submission::spawn`].
fn spawn_job(state: Arc<AppState>, sub: Submission) -> ApiResult<Response> {
    let rec = JobRecord::new(sub.callback_url.clone());
    rec.planned(sub.steps, sub.estimate_s);
    state.jobs.insert(rec.clone())?;
    let (rx, pending) = match sub.queue(&state, rec.clone()) {
        Ok(x) => x,
        Err(e) => {
            rec.finish(Err(detail(&e)));
            return Err(e);
        }
    };
    let status = rec.status();
    {
        let rec = rec.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let outcome = match pending.finish(&state, rx).await {
                Ok(answer) => serde_json::to_value(answer.json())
                    .map_err(|e| detail(&Error::Internal(e.to_string()).into())),
                Err(e) => Err(detail(&e)),
            };
            rec.finish(outcome);
            tracing::info!(job = %rec.id, status = rec.state().name(), "job finished");
            send_callback(&rec);
        });
    }
    let body = JobAccepted {
        id: status.id.clone(),
        status: status.status,
        queue_position: status.queue_position,
        links: status.links.clone(),
    };
    let mut res = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&status.links.this) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

fn detail(e: &ApiError) -> ErrorDetail {
    let (_, code) = e.status_and_code();
    ErrorDetail {
        code: code.to_string(),
        message: e.to_string(),
    }
}

/// Where a synthesis' layout comes from.
struct Guide {
    /// The guide's cache key.
    key: String,
    info: GuideInfo,
    input: LayoutInput,
}

impl Guide {
    /// A cached layout (`layout_id`, or an image seen before), else the
    /// image decoded and prepared for the encoder.
    async fn resolve(
        state: &AppState,
        ready: &Arc<Ready>,
        request: &SynthesisRequest,
        image: Option<Bytes>,
        layout_id: Option<String>,
    ) -> ApiResult<Self> {
        match (image, layout_id) {
            (Some(_), Some(_)) => Err(Error::param(
                "layout_id",
                "give either an image or a layout_id, not both",
            )
            .into()),
            (None, None) => Err(missing_image(", or a layout_id")),
            (None, Some(id)) => {
                let (key, k) = layout_id::parse(&id)?;
                let c = state
                    .cache_get(key)
                    .ok_or_else(|| ApiError::UnknownLayout(id.clone()))?;
                Ok(Self {
                    key: key.to_string(),
                    info: GuideInfo {
                        source_size: c.source_size,
                        layout_size: Some(c.layout_size),
                        components: Some(k),
                    },
                    input: LayoutInput::Ready(c.layout),
                })
            }
            (Some(bytes), None) => {
                let layout_size = request.layout_size(&ready.bounds)?;
                let (key, guide) = resolve_guide(state, ready, bytes, layout_size).await?;
                let (input, source_size) = match guide {
                    GuideLayout::Cached(c) => (LayoutInput::Ready(c.layout), c.source_size),
                    GuideLayout::Prepared(g) => {
                        let size = g.source_size;
                        (LayoutInput::Guide(g), size)
                    }
                };
                Ok(Self {
                    key,
                    info: GuideInfo::image(source_size),
                    input,
                })
            }
        }
    }
}
