//! `POST /synthesize`: a guide image (or a cached layout's id) and the
//! parameters in; images out (JSON with base64 images, or one raw image).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{binary, blocking, enqueue, missing_image, resolve_guide, GuideLayout};
use crate::error::{Error, Result};
use crate::pipeline::layout_id;
use crate::pipeline::request::{GuideInfo, SynthesisRequest};
use crate::server::api::{ErrorBody, ImageOut, SynthesizeResponse, Timings};
use crate::server::body::{b64, cached_field_types, FieldType, Fields};
use crate::server::error::{ApiError, ApiResult};
use crate::server::metrics;
use crate::server::negotiate::ImageAccept;
use crate::server::queue::{LayoutInput, Output, SynthesisWork, Work};
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
    responses(
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
        (status = 422, description = "Image cannot be decoded or is over the pixel limit", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready, timed out or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn synthesize(State(state): State<Arc<AppState>>, req: Request) -> ApiResult<Response> {
    let start = Instant::now();
    let ready = state.ready()?;
    let accept = ImageAccept::parse(req.headers())?;
    let types = cached_field_types::<SynthesisRequest>(&TYPES);
    let mut fields = Fields::read(&state, req, types).await?;
    let image = fields.take_image()?;
    let layout_id = fields.take_str("layout_id")?;
    if layout_id.is_some() && fields.is_multipart() {
        // A multipart request uploads its guide; the document says so too.
        return Err(Error::request(
            "layout_id",
            "a multipart request uploads its guide image; send a layout_id in a JSON body",
        )
        .into());
    }
    let mut request: SynthesisRequest = fields.parse()?;
    if request.format.is_none() {
        request.format = Some(accept.default_format().name().into());
    }
    // Every parameter is checked before the guide is decoded.
    request.validate(&ready.bounds)?;
    accept.check(request.num_images(), request.format()?)?;

    let guide = Guide::resolve(&state, &ready, &request, image, layout_id).await?;
    let plan = request.resolve(&ready.bounds, &guide.info)?;
    let parameters = plan.parameters(
        layout_id::layout_id(&guide.key, plan.components),
        &ready.specs.model,
    );
    let format = plan.format;
    let work = Work::Synthesis(SynthesisWork {
        plan,
        layout: guide.input,
    });
    let Output::Synthesis {
        images,
        computed_layout,
        scores,
        timings,
    } = enqueue(&state, work).await?
    else {
        return Err(Error::Internal("unexpected answer to a synthesis job".into()).into());
    };
    if let Some(layout) = computed_layout {
        state.cache_put(
            guide.key.clone(),
            CachedLayout {
                layout,
                source_size: guide.info.source_size,
                layout_size: parameters.layout_size,
            },
        );
    }

    let encode_start = Instant::now();
    let record = parameters.clone();
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
    metrics::stage("request_synthesize", start.elapsed().as_secs_f64());
    if let ImageAccept::Raw(_) = accept {
        let (seed, bytes) = encoded
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("no image was generated".into()))?;
        let mut res = binary(format.mime(), bytes);
        res.headers_mut().insert("x-lumen-seed", seed.into());
        if let Some(score) = scores.first() {
            if let Ok(v) = axum::http::HeaderValue::from_str(&score.to_string()) {
                res.headers_mut().insert("x-lumen-score", v);
            }
        }
        return Ok(res);
    }
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    Ok(Json(SynthesizeResponse {
        images: encoded
            .into_iter()
            .enumerate()
            .map(|(i, (seed, bytes))| ImageOut {
                seed,
                data: b64(&bytes),
                score: scores.get(i).copied(),
            })
            .collect(),
        parameters,
        timings: Timings {
            queue_ms: ms(timings.queue),
            layout_ms: ms(timings.layout),
            denoise_ms: ms(timings.denoise),
            decode_ms: ms(timings.decode),
            score_ms: ms(timings.score),
            encode_ms: ms(encode_s),
            total_ms: ms(start.elapsed().as_secs_f64()),
            batch_images: timings.batch_images,
        },
    })
    .into_response())
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
