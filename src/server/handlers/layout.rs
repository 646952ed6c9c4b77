//! `POST /layout`: a guide image in, its neural layout out (JSON, preview PNG
//! or safetensors).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{binary, blocking, enqueue, missing_image, resolve_guide, GuideLayout};
use crate::error::{Error, Result};
use crate::pipeline::layout_id::layout_id;
use crate::pipeline::output::{preview_png, preview_size};
use crate::pipeline::request::LayoutRequest;
use crate::server::api::{ErrorBody, LayoutResponse};
use crate::server::body::{b64, cached_field_types, FieldType, Fields};
use crate::server::error::ApiResult;
use crate::server::metrics;
use crate::server::negotiate::LayoutAccept;
use crate::server::queue::{Output, Unwatched, Work};
use crate::server::state::{AppState, CachedLayout};

static TYPES: OnceLock<HashMap<String, FieldType>> = OnceLock::new();

/// Compute the neural layout of a guide image.
#[utoipa::path(
    post,
    path = "/layout",
    tag = "lumen",
    request_body(
        description = "The guide image and the layout parameters",
        content(
            (LayoutRequest = "application/json"),
            (LayoutRequest = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "The layout. JSON by default; `Accept: image/png` gives the preview, `Accept: application/octet-stream` a safetensors file with tensor `layout` (f32 [K, h, w]).",
            content(
                (LayoutResponse = "application/json"),
                (String = "image/png"),
                (String = "application/octet-stream"),
            )),
        (status = 400, description = "Invalid request or parameter (the message names the field)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 406, description = "No acceptable response type", body = ErrorBody),
        (status = 408, description = "The body did not arrive within the body timeout", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "Body neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "Image cannot be decoded or is over the pixel limit; or the encoder at this layout_size would not finish within the request timeout (over_time_budget)", body = ErrorBody),
        (status = 429, description = "Queue full (see Retry-After)", body = ErrorBody),
        (status = 503, description = "Not ready, timed out or shutting down", body = ErrorBody),
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub async fn layout(State(state): State<Arc<AppState>>, req: Request) -> ApiResult<Response> {
    let start = Instant::now();
    let ready = state.ready()?;
    let accept = LayoutAccept::parse(req.headers())?;
    let types = cached_field_types::<LayoutRequest>(&TYPES);
    let mut fields = Fields::read(&state, req, types).await?;
    let image = fields.take_image()?;
    let request: LayoutRequest = fields.parse()?;
    let (k, layout_size) = request.resolve(&ready.bounds.layout)?;
    ready
        .costs
        .admit_layout(
            &ready.specs,
            layout_size,
            state.request_timeout.as_secs_f64(),
            &ready.device,
        )
        .inspect_err(|_| crate::server::metrics::refused("over_time_budget"))?;
    let image = image.ok_or_else(|| missing_image(""))?;
    let (key, guide) = resolve_guide(&state, &ready, image, layout_size).await?;
    let cached = match guide {
        GuideLayout::Cached(c) => c,
        GuideLayout::Prepared(guide) => {
            let source_size = guide.source_size;
            let Output::Layout { layout, .. } =
                enqueue(&state, Work::Layout(guide), Arc::new(Unwatched)).await?
            else {
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
    let layout_id = layout_id(&key, k);
    let response = blocking(move || -> Result<Response> {
        let layout = cached.layout.truncate(k)?;
        let size = preview_size(cached.source_size);
        Ok(match accept {
            LayoutAccept::Png => binary("image/png", preview_png(&layout, size)?),
            LayoutAccept::Safetensors => {
                binary("application/octet-stream", layout.to_safetensors()?)
            }
            LayoutAccept::Json => Json(LayoutResponse {
                layout_id,
                components: k,
                grid: [layout.grid.0, layout.grid.1],
                preview_png: b64(&preview_png(&layout, size)?),
                data: b64(&layout.to_le_bytes()?),
            })
            .into_response(),
        })
    })
    .await?;
    metrics::stage("request_layout", start.elapsed().as_secs_f64());
    Ok(response)
}
