//! HTTP handlers: read the body (JSON or multipart), validate every field,
//! decode and prepare the guide off the async runtime, enqueue, and encode
//! the answer. A handler never touches model weights.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use image::RgbImage;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::models::schedulers::SchedulerKind;
use crate::pipeline::layout::{Layout, PreparedGuide};
use crate::pipeline::synthesis::{SynthesisSettings, MAX_SIDE};
use crate::server::api::{
    ErrorBody, ImageOut, LayoutRequest, LayoutResponse, Status, SynthesisParameters,
    SynthesizeRequest, SynthesizeResponse, Timings,
};
use crate::server::engine::ModelSpecs;
use crate::server::error::{ApiError, ApiResult};
use crate::server::queue::{Job, LayoutInput, Output, SynthesisWork, Work};
use crate::server::{metrics, AppState, CachedLayout};
use crate::{guide, png_text};

/// Most images one request may ask for.
pub const MAX_IMAGES: usize = 8;
/// Default denoising steps.
pub const DEFAULT_STEPS: usize = 30;
/// Bodies over the limit but at most this large are read and discarded
/// before the 413, so the client sees the answer.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// Longer side of the layout preview in responses.
pub const PREVIEW_MAX_SIDE: u32 = 1024;

type AppStateRef = State<Arc<AppState>>;

// ---------------------------------------------------------------- endpoints

/// Compute the neural layout of a guide image.
#[utoipa::path(
    post,
    path = "/layout",
    tag = "lumen",
    request_body(
        description = "The guide image and the layout parameters",
        content(
            (LayoutRequest = "application/json"),
            (crate::server::api::LayoutForm = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "The layout. JSON by default; `Accept: image/png` gives the preview, `Accept: application/octet-stream` a safetensors file with tensor `layout` (f32 [K, h, w]).",
            content(
                (LayoutResponse = "application/json"),
                (Vec<u8> = "image/png"),
                (Vec<u8> = "application/octet-stream"),
            )),
        (status = 400, description = "Invalid parameter or malformed body", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 406, description = "No acceptable response type", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Body neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Image cannot be decoded or is over the pixel limit", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready, timed out or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn layout(State(state): AppStateRef, req: Request) -> ApiResult<Response> {
    let start = Instant::now();
    let specs = state.specs()?;
    let accept = LayoutAccept::parse(req.headers())?;
    let body = read_body(&state, req, &["components", "layout_size"], &[]).await?;
    let p: LayoutRequest = body.deserialize()?;
    let image = body.image_bytes(Some(&p.image))?;
    let k = p.components.unwrap_or(specs.layout.default_components);
    specs.layout.check_components(k)?;
    let layout_size = resolve_layout_size(&specs, p.layout_size)?;
    let (key, guide) = resolve_guide(&state, &specs, image, layout_size).await?;
    let cached = match guide {
        GuideLayout::Cached(c) => c,
        GuideLayout::Prepared(guide) => {
            let source_size = guide.source_size;
            let (out, _) = enqueue(&state, Work::Layout(guide)).await?;
            let Output::Layout { layout, .. } = out else {
                return Err(Error::Internal("unexpected answer to a layout job".into()).into());
            };
            let c = CachedLayout {
                layout,
                source_size,
                layout_size,
            };
            state.cache_put(key.clone(), c.clone());
            c
        }
    };
    let layout_id = format!("{key}-{k}");
    let response = blocking(move || -> Result<Response> {
        let layout = cached.layout.truncate(k)?;
        let (w, h) = preview_size(cached.source_size);
        Ok(match accept {
            LayoutAccept::Png => binary("image/png", encode_preview(&layout, w, h)?),
            LayoutAccept::Safetensors => {
                binary("application/octet-stream", layout.to_safetensors()?)
            }
            LayoutAccept::Json => Json(LayoutResponse {
                layout_id,
                components: k,
                grid: [layout.grid.0, layout.grid.1],
                preview_png: b64(&encode_preview(&layout, w, h)?),
                data: b64(&layout.to_le_bytes()?),
            })
            .into_response(),
        })
    })
    .await?;
    metrics::stage("request_layout", start.elapsed().as_secs_f64());
    Ok(response)
}

/// Generate images with the layout of a guide image (or of a cached layout).
#[utoipa::path(
    post,
    path = "/synthesize",
    tag = "lumen",
    request_body(
        description = "A guide image or a layout_id, and the generation parameters",
        content(
            (SynthesizeRequest = "application/json"),
            (crate::server::api::SynthesizeForm = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "The images (seeds seed, seed+1, …). JSON by default; with `Accept: image/png` (or image/jpeg, image/webp) and one image, the raw image. PNGs carry their parameters in an iTXt chunk `parameters`.",
            content(
                (SynthesizeResponse = "application/json"),
                (Vec<u8> = "image/png"),
                (Vec<u8> = "image/jpeg"),
                (Vec<u8> = "image/webp"),
            )),
        (status = 400, description = "Invalid parameter or malformed body", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown layout_id", body = ErrorBody),
        (status = 406, description = "No acceptable response type", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Body neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Image cannot be decoded or is over the pixel limit", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready, timed out or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn synthesize(State(state): AppStateRef, req: Request) -> ApiResult<Response> {
    let start = Instant::now();
    let specs = state.specs()?;
    let accept = ImageAccept::parse(req.headers())?;
    let body = read_body(
        &state,
        req,
        &[
            "components",
            "layout_size",
            "steps",
            "guidance_scale",
            "control_scale",
            "seed",
            "num_images",
            "width",
            "height",
        ],
        &[
            "layout_id",
            "prompt",
            "negative_prompt",
            "scheduler",
            "format",
        ],
    )
    .await?;
    let p: SynthesizeRequest = body.deserialize()?;

    // Scalar parameters first: a bad one is reported before any decoding.
    let num_images = p.num_images.unwrap_or(1);
    if num_images == 0 || num_images > MAX_IMAGES {
        return Err(Error::param(
            "num_images",
            format!("{num_images} is out of range 1..={MAX_IMAGES}"),
        )
        .into());
    }
    let format = match p.format.as_deref() {
        Some(f) => OutFormat::parse(f)?,
        None => accept.default_format(),
    };
    if let ImageAccept::Raw(want) = accept {
        if num_images != 1 {
            return Err(ApiError::NotAcceptable {
                accept: want.mime().into(),
                message:
                    "a raw image response holds one image; ask for application/json to get several"
                        .into(),
            });
        }
        if want != format {
            return Err(ApiError::NotAcceptable {
                accept: want.mime().into(),
                message: format!("the request asks for format `{}`", format.name()),
            });
        }
    }
    let scheduler = match p.scheduler.as_deref() {
        Some(s) => SchedulerKind::parse(s)?,
        None => specs.synthesis.default_scheduler(),
    };
    let steps = p.steps.unwrap_or(DEFAULT_STEPS);
    let guidance = p.guidance_scale.unwrap_or(7.5);
    let control_scale = p.control_scale.unwrap_or(1.0);
    for (name, v) in [
        ("guidance_scale", guidance),
        ("control_scale", control_scale),
    ] {
        if !v.is_finite() || v.abs() > 1000.0 {
            return Err(
                Error::param(name, format!("{v} must be a finite number within ±1000")).into(),
            );
        }
    }
    let seed = p.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let prompt = p.prompt.clone().unwrap_or_default();
    let negative_prompt = p.negative_prompt.clone().unwrap_or_default();

    // The layout: from the cache, or a guide to encode.
    let (input, source_size, layout_size, guide_key_hex, default_k) =
        match (&p.layout_id, &p.image, body.has_file_image()) {
            (Some(_), Some(_), _) | (Some(_), None, true) => {
                return Err(ApiError::bad_request(
                    "layout_id",
                    "give either an image or a layout_id, not both",
                ))
            }
            (Some(id), None, false) => {
                if p.layout_size.is_some() {
                    return Err(ApiError::bad_request(
                        "layout_size",
                        "applies to a guide image; a layout_id already has its size",
                    ));
                }
                let (key, k) = parse_layout_id(id)?;
                let c = state
                    .cache_get(key)
                    .ok_or_else(|| ApiError::UnknownLayout(id.clone()))?;
                (
                    LayoutInput::Ready(c.layout.clone()),
                    c.source_size,
                    c.layout_size,
                    key.to_string(),
                    k,
                )
            }
            (None, image, _) => {
                let bytes = body.image_bytes(image.as_deref())?;
                let layout_size = resolve_layout_size(&specs, p.layout_size)?;
                let (key, guide) = resolve_guide(&state, &specs, bytes, layout_size).await?;
                let (input, size) = match guide {
                    GuideLayout::Cached(c) => (LayoutInput::Ready(c.layout), c.source_size),
                    GuideLayout::Prepared(g) => {
                        let size = g.source_size;
                        (LayoutInput::Guide(g), size)
                    }
                };
                (
                    input,
                    size,
                    layout_size,
                    key,
                    specs.layout.default_components,
                )
            }
        };
    let components = p.components.unwrap_or(default_k);
    specs.layout.check_components(components)?;
    let (width, height) = match (p.width, p.height) {
        (Some(w), Some(h)) => (w, h),
        (None, None) => specs.synthesis.default_size(source_size.0, source_size.1),
        (Some(_), None) => {
            return Err(Error::param("height", "give width and height together").into())
        }
        (None, Some(_)) => {
            return Err(Error::param("width", "give width and height together").into())
        }
    };
    let settings = SynthesisSettings {
        width,
        height,
        steps,
        scheduler,
    };
    specs.synthesis.check_settings(&settings)?;
    check_pixel_budget(width, height, num_images)?;

    let parameters = SynthesisParameters {
        prompt: prompt.clone(),
        negative_prompt: negative_prompt.clone(),
        components,
        layout_size,
        layout_id: format!("{guide_key_hex}-{components}"),
        steps,
        guidance_scale: guidance,
        control_scale,
        scheduler: scheduler.name().to_string(),
        seed,
        num_images,
        width,
        height,
        format: format.name().to_string(),
        model: specs.model.clone(),
        lumen_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let work = Work::Synthesis(SynthesisWork {
        settings,
        layout: input,
        components,
        prompt,
        negative_prompt,
        guidance,
        control_scale,
        seed,
        num_images,
    });
    let (out, _) = enqueue(&state, work).await?;
    let Output::Synthesis {
        images,
        computed_layout,
        timings,
    } = out
    else {
        return Err(Error::Internal("unexpected answer to a synthesis job".into()).into());
    };
    if let Some(layout) = computed_layout {
        state.cache_put(
            guide_key_hex.clone(),
            CachedLayout {
                layout,
                source_size,
                layout_size,
            },
        );
    }

    let encode_start = Instant::now();
    let raw = matches!(accept, ImageAccept::Raw(_));
    let params = parameters.clone();
    let encoded: Vec<(u64, Vec<u8>)> = blocking(move || {
        images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let seed = params.seed.wrapping_add(i as u64);
                Ok((seed, format.encode(img, &params, seed)?))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await?;
    let encode_s = encode_start.elapsed().as_secs_f64();
    metrics::stage("encode_output", encode_s);
    metrics::stage("request_synthesize", start.elapsed().as_secs_f64());
    if raw {
        let (seed, bytes) = encoded
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("no image was generated".into()))?;
        let mut res = binary(format.mime(), bytes);
        if let Ok(v) = seed.to_string().parse() {
            res.headers_mut().insert("x-lumen-seed", v);
        }
        return Ok(res);
    }
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    Ok(Json(SynthesizeResponse {
        images: encoded
            .into_iter()
            .map(|(seed, bytes)| ImageOut {
                seed,
                data: b64(&bytes),
            })
            .collect(),
        parameters,
        timings: Timings {
            queue_ms: ms(timings.queue),
            layout_ms: ms(timings.layout),
            denoise_ms: ms(timings.denoise),
            decode_ms: ms(timings.decode),
            encode_ms: ms(encode_s),
            total_ms: ms(start.elapsed().as_secs_f64()),
            batch_images: timings.batch_images,
        },
    })
    .into_response())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "lumen",
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn health(State(state): AppStateRef) -> Json<Status> {
    Json(status(&state))
}

/// Readiness: models loaded and warmed up, not shutting down.
#[utoipa::path(get, path = "/ready", tag = "lumen",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "Loading or shutting down", body = Status),
    ))]
pub async fn ready(State(state): AppStateRef) -> (StatusCode, Json<Status>) {
    let s = status(&state);
    let code = if s.status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(s))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "lumen",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::handle().render(),
    )
        .into_response()
}

/// The OpenAPI document.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::server::api::openapi_json(),
    )
        .into_response()
}

pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

fn status(state: &AppState) -> Status {
    let shutting = state
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst);
    let specs = state.specs.get();
    Status {
        status: match (shutting, specs) {
            (true, _) => "shutting_down",
            (false, Some(_)) => "ok",
            (false, None) => "loading",
        }
        .into(),
        model: state.model_identity.clone(),
        device: specs.map(|s| s.device.clone()).unwrap_or_default(),
        dtype: specs.map(|s| s.dtype.clone()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

// ------------------------------------------------------------- the guide

/// A guide's layout: already in the cache, or a guide ready for the encoder.
enum GuideLayout {
    Cached(CachedLayout),
    Prepared(PreparedGuide),
}

/// The cache key of a guide and its layout from the cache, else the guide
/// decoded (size checked from the header first) and prepared on the blocking pool.
async fn resolve_guide(
    state: &AppState,
    specs: &Arc<ModelSpecs>,
    image: Bytes,
    layout_size: u32,
) -> ApiResult<(String, GuideLayout)> {
    let key = guide_key(&state.model_identity, layout_size, &image);
    if let Some(c) = state.cache_get(&key) {
        return Ok((key, GuideLayout::Cached(c)));
    }
    let specs = specs.clone();
    let guide = blocking(move || {
        let layout = &specs.layout;
        let img = guide::decode(&image, layout.settings.max_image_pixels)?.to_rgb8();
        layout.prepare(&img, Some(layout_size))
    })
    .await?;
    Ok((key, GuideLayout::Prepared(guide)))
}

// ------------------------------------------------------------- the queue

/// Queue a job and wait for its answer (or the deadline).
async fn enqueue(state: &AppState, work: Work) -> ApiResult<(Output, Instant)> {
    let permit = state.queue.try_permit()?;
    let (tx, rx) = oneshot::channel();
    let now = Instant::now();
    state.queue.push(Job {
        work,
        reply: tx,
        enqueued: now,
        deadline: now + state.request_timeout,
        permit,
    })?;
    match tokio::time::timeout(state.request_timeout, rx).await {
        Err(_) => Err(ApiError::Timeout(state.request_timeout.as_secs())),
        Ok(Err(_)) => {
            Err(Error::Internal("the inference thread failed on this request".into()).into())
        }
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Ok(Ok(out))) => Ok((out, now)),
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

// ------------------------------------------------------------- the body

/// A request body read as JSON or multipart, before typing.
struct Body {
    /// The fields as a JSON object (multipart text parts converted).
    fields: serde_json::Value,
    /// Multipart: the `image` part's bytes.
    file_image: Option<Bytes>,
}

impl Body {
    fn deserialize<T: DeserializeOwned>(&self) -> ApiResult<T> {
        serde_path_to_error::deserialize(&self.fields).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let field = if path == "." {
                // serde names the field itself for unknown / missing fields.
                inner
                    .split('`')
                    .nth(1)
                    .map(str::to_string)
                    .unwrap_or_else(|| "body".into())
            } else {
                path
            };
            ApiError::bad_request(field, inner)
        })
    }

    fn has_file_image(&self) -> bool {
        self.file_image.is_some()
    }

    /// The guide's bytes: the multipart file, else the base64 JSON field.
    fn image_bytes(&self, b64_field: Option<&str>) -> ApiResult<Bytes> {
        let b64_field = b64_field.filter(|s| !s.is_empty());
        match (&self.file_image, b64_field) {
            (Some(bytes), _) => Ok(bytes.clone()),
            (None, Some(s)) => decode_b64(s).map(Bytes::from),
            (None, None) => Err(ApiError::bad_request(
                "image",
                "missing: send the guide image (base64 in JSON, or a multipart file part `image`)",
            )),
        }
    }
}

/// Read the body as JSON or multipart/form-data. `numeric` multipart fields
/// are parsed as JSON values (numbers), `text` ones kept as strings; a part
/// `image` holds the guide.
async fn read_body(
    state: &Arc<AppState>,
    req: Request,
    numeric: &[&str],
    text: &[&str],
) -> ApiResult<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > state.body_limit {
            // Read (and discard) a moderately larger body so the client, still
            // sending, gets this answer instead of a reset connection.
            if len <= DRAIN_LIMIT {
                let body = req.into_body();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    axum::body::to_bytes(body, DRAIN_LIMIT),
                )
                .await;
            }
            return Err(ApiError::PayloadTooLarge {
                limit: state.body_limit,
            });
        }
    }
    match mime.as_str() {
        "application/json" => {
            let bytes = Bytes::from_request(req, state).await.map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: state.body_limit,
                    }
                } else {
                    ApiError::bad_request("body", r.body_text())
                }
            })?;
            let fields: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad_request("body", format!("invalid JSON: {e}")))?;
            if !fields.is_object() {
                return Err(ApiError::bad_request("body", "must be a JSON object"));
            }
            Ok(Body {
                fields,
                file_image: None,
            })
        }
        "multipart/form-data" => {
            let mut mp = Multipart::from_request(req, state)
                .await
                .map_err(|r| ApiError::bad_request("body", r.body_text()))?;
            let mut fields = serde_json::Map::new();
            let mut file_image = None;
            let too_large = |e: axum::extract::multipart::MultipartError| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit: state.body_limit,
                    }
                } else {
                    ApiError::bad_request(
                        "body",
                        format!("invalid multipart body: {}", e.body_text()),
                    )
                }
            };
            while let Some(field) = mp.next_field().await.map_err(too_large)? {
                let name = field.name().unwrap_or("").to_string();
                if name.is_empty() {
                    return Err(ApiError::bad_request(
                        "body",
                        "a multipart part has no name",
                    ));
                }
                if fields.contains_key(&name) || (name == "image" && file_image.is_some()) {
                    return Err(ApiError::bad_request(name, "given more than once"));
                }
                let bytes = field.bytes().await.map_err(too_large)?;
                if name == "image" {
                    file_image = Some(bytes);
                    continue;
                }
                let s = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::bad_request(&name, "is not UTF-8 text"))?;
                let value = if numeric.contains(&name.as_str()) {
                    serde_json::from_str::<serde_json::Value>(s.trim())
                        .ok()
                        .filter(|v| v.is_number())
                        .ok_or_else(|| {
                            ApiError::bad_request(&name, format!("`{s}` is not a number"))
                        })?
                } else if text.contains(&name.as_str()) {
                    serde_json::Value::String(s)
                } else {
                    return Err(ApiError::bad_request(&name, "unknown field"));
                };
                fields.insert(name, value);
            }
            Ok(Body {
                fields: serde_json::Value::Object(fields),
                file_image,
            })
        }
        "" => Err(ApiError::UnsupportedMediaType("(none)".into())),
        _ => Err(ApiError::UnsupportedMediaType(content_type)),
    }
}

fn decode_b64(s: &str) -> ApiResult<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    // Accept a data URL as well as bare base64.
    let s = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT
        .decode(cleaned.as_bytes())
        .map_err(|e| ApiError::bad_request("image", format!("invalid base64: {e}")))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------- parameters

fn resolve_layout_size(specs: &ModelSpecs, v: Option<u32>) -> ApiResult<u32> {
    let s = v.unwrap_or(specs.layout.settings.layout_size);
    let patch = specs.layout.patch_size as u32;
    if s < patch || s > guide::MAX_LAYOUT_SIZE {
        return Err(Error::param(
            "layout_size",
            format!(
                "{s} is out of range {patch}..={} (one patch to the maximum)",
                guide::MAX_LAYOUT_SIZE
            ),
        )
        .into());
    }
    Ok(s)
}

/// Cap the work of one request: num_images × pixels.
fn check_pixel_budget(width: u32, height: u32, n: usize) -> ApiResult<()> {
    let budget = MAX_SIDE as u64 * MAX_SIDE as u64 * 2;
    let total = width as u64 * height as u64 * n as u64;
    if total > budget {
        return Err(Error::param(
            "num_images",
            format!(
                "{n} images of {width}x{height} exceed the per-request budget of {budget} pixels"
            ),
        )
        .into());
    }
    Ok(())
}

/// Content hash of a guide for the layout cache (model, layout size, bytes).
fn guide_key(model: &str, layout_size: u32, image: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(layout_size.to_le_bytes());
    h.update(image);
    let d = h.finalize();
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// `<32 hex>-<K>` → (cache key, K).
fn parse_layout_id(id: &str) -> ApiResult<(&str, usize)> {
    let bad = || {
        ApiError::bad_request(
            "layout_id",
            format!("`{id}` is not a layout id (as returned by POST /layout)"),
        )
    };
    let (key, k) = id.rsplit_once('-').ok_or_else(bad)?;
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let k = k.parse::<usize>().map_err(|_| bad())?;
    Ok((key, k))
}

fn preview_size((w, h): (u32, u32)) -> (u32, u32) {
    let long = w.max(h);
    if long <= PREVIEW_MAX_SIDE {
        return (w, h);
    }
    let scale = PREVIEW_MAX_SIDE as f64 / long as f64;
    (
        ((w as f64 * scale).round() as u32).max(1),
        ((h as f64 * scale).round() as u32).max(1),
    )
}

fn encode_preview(layout: &Layout, w: u32, h: u32) -> Result<Vec<u8>> {
    let img = layout.preview(w, h)?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("cannot encode the preview: {e}")))?;
    Ok(out)
}

fn binary(mime: &'static str, bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, mime)], bytes).into_response()
}

// ------------------------------------------------------- content types

#[derive(Clone, Copy, Debug)]
enum LayoutAccept {
    Json,
    Png,
    Safetensors,
}

/// The media types of an Accept header, best first (q-values honoured).
fn accepted(headers: &HeaderMap) -> Vec<String> {
    let Some(v) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return vec!["*/*".into()];
    };
    let mut list: Vec<(f32, usize, String)> = v
        .split(',')
        .enumerate()
        .filter_map(|(i, part)| {
            let mut it = part.split(';');
            let mime = it.next()?.trim().to_ascii_lowercase();
            if mime.is_empty() {
                return None;
            }
            let q = it
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0).then_some((q, i, mime))
        })
        .collect();
    list.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    list.into_iter().map(|(_, _, m)| m).collect()
}

impl LayoutAccept {
    fn parse(headers: &HeaderMap) -> ApiResult<Self> {
        let list = accepted(headers);
        for m in &list {
            match m.as_str() {
                "application/json" | "*/*" | "application/*" => return Ok(Self::Json),
                "image/png" | "image/*" => return Ok(Self::Png),
                "application/octet-stream" => return Ok(Self::Safetensors),
                _ => {}
            }
        }
        Err(ApiError::NotAcceptable {
            accept: list.join(", "),
            message: "/layout answers application/json, image/png or application/octet-stream"
                .into(),
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum ImageAccept {
    Json,
    Raw(OutFormat),
}

impl ImageAccept {
    fn parse(headers: &HeaderMap) -> ApiResult<Self> {
        let list = accepted(headers);
        for m in &list {
            match m.as_str() {
                "application/json" | "*/*" | "application/*" => return Ok(Self::Json),
                "image/png" | "image/*" => return Ok(Self::Raw(OutFormat::Png)),
                "image/jpeg" => return Ok(Self::Raw(OutFormat::Jpeg)),
                "image/webp" => return Ok(Self::Raw(OutFormat::Webp)),
                _ => {}
            }
        }
        Err(ApiError::NotAcceptable {
            accept: list.join(", "),
            message: "/synthesize answers application/json, image/png, image/jpeg or image/webp"
                .into(),
        })
    }

    fn default_format(&self) -> OutFormat {
        match self {
            Self::Json => OutFormat::Png,
            Self::Raw(f) => *f,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutFormat {
    fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "jpeg" | "jpg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            _ => Err(Error::param(
                "format",
                format!("`{s}` is not png, jpeg or webp"),
            )),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    fn mime(&self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// Encode one image; PNGs carry `parameters` (with this image's seed).
    fn encode(&self, img: &RgbImage, params: &SynthesisParameters, seed: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Self::Png => {
                let mut v =
                    serde_json::to_value(params).map_err(|e| Error::Internal(e.to_string()))?;
                v["seed"] = seed.into();
                v["num_images"] = 1.into();
                return png_text::encode(img, png_text::KEYWORD, &v.to_string());
            }
            Self::Jpeg => {
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92);
                img.write_with_encoder(enc)
            }
            Self::Webp => {
                let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
                img.write_with_encoder(enc)
            }
        }
        .map_err(|e| Error::Internal(format!("cannot encode the image: {e}")))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_order_and_q() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            "image/png;q=0.5, application/json".parse().unwrap(),
        );
        assert_eq!(accepted(&h), vec!["application/json", "image/png"]);
        h.insert(header::ACCEPT, "text/html;q=0, image/png".parse().unwrap());
        assert_eq!(accepted(&h), vec!["image/png"]);
        assert!(matches!(LayoutAccept::parse(&h), Ok(LayoutAccept::Png)));
        h.insert(header::ACCEPT, "text/html".parse().unwrap());
        assert!(LayoutAccept::parse(&h).is_err());
    }

    #[test]
    fn layout_ids_round_trip() {
        let key = guide_key("m", 518, b"abc");
        assert_eq!(key.len(), 32);
        let id = format!("{key}-7");
        assert_eq!(parse_layout_id(&id).unwrap(), (key.as_str(), 7));
        for bad in ["", "abc", "xyz-3", &format!("{key}-x"), &format!("{key}3")] {
            assert!(parse_layout_id(bad).is_err(), "{bad}");
        }
        assert_ne!(guide_key("m", 518, b"abc"), guide_key("m", 224, b"abc"));
    }

    #[test]
    fn base64_lenient() {
        assert_eq!(decode_b64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_b64("aGVs\nbG8=").unwrap(), b"hello");
        assert_eq!(
            decode_b64("data:image/png;base64,aGVsbG8=").unwrap(),
            b"hello"
        );
        assert!(decode_b64("!!!").is_err());
    }
}
