//! Health, readiness, metrics, the OpenAPI document, and the answers to
//! unknown routes and methods.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::server::api::Status;
use crate::server::error::ApiError;
use crate::server::metrics;
use crate::server::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "lumen",
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn health(State(state): State<Arc<AppState>>) -> Json<Status> {
    Json(status(&state))
}

/// Readiness: models loaded and warmed up, not shutting down.
#[utoipa::path(get, path = "/ready", tag = "lumen",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "Loading, shutting down or failed", body = Status),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
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

/// The OpenAPI document: with the loaded model's bounds once ready.
pub async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    let doc = match state.ready.get() {
        Some(r) => r.openapi.clone(),
        None => state.openapi_generic.clone(),
    };
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
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
    let shutting = state.shutting_down.load(Ordering::SeqCst);
    let ready = state.ready.get();
    Status {
        status: match (shutting, ready) {
            _ if state.failed.load(Ordering::SeqCst) => "failed",
            (true, _) => "shutting_down",
            (false, Some(_)) => "ok",
            (false, None) => "loading",
        }
        .into(),
        model: state.model_identity.clone(),
        model_path: state.model_path.clone(),
        device: ready.map(|r| r.device.clone()).unwrap_or_default(),
        dtype: ready.map(|r| r.dtype.clone()).unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
