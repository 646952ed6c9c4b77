//! The router: routes, the API key, CORS, request ids, tracing, metrics.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::error::{Error, Result};
use crate::server::error::ApiError;
use crate::server::handlers::{jobs, layout, playground, status, synthesize};
use crate::server::metrics;
use crate::server::state::AppState;

/// Build the router over `state`.
pub fn router(state: Arc<AppState>, cors_origins: &[String]) -> Result<Router> {
    use utoipa_swagger_ui::SwaggerUi;
    let protected = Router::new()
        .route("/layout", post(layout::layout))
        .route("/synthesize", post(synthesize::synthesize))
        .route("/jobs", post(jobs::create))
        .route("/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/jobs/{id}/images/{index}", get(jobs::image))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let mut about = Router::new()
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(status::openapi))
        .merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")));
    if state.protect_all {
        about = about.route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    }
    let mut app = Router::new()
        .merge(protected)
        .merge(about)
        .route("/", get(playground::index))
        .route("/playground/app.js", get(playground::script))
        .route("/playground/style.css", get(playground::style))
        .route("/playground/examples/{file}", get(playground::example))
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        .fallback(status::no_route)
        .method_not_allowed_fallback(status::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn(metrics::track))
        .with_state(state);
    if !cors_origins.is_empty() {
        app = app.layer(cors_layer(cors_origins)?);
    }
    let request_id = HeaderName::from_static("x-request-id");
    Ok(app
        .layer(middleware::from_fn(log_request))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid)))
}

/// Middleware: one `info` line per request when its answer is ready (id,
/// method, path, status, duration, response bytes when known), inside a
/// span that the handlers' own lines share. Never the query, the headers
/// (the key) or the body.
async fn log_request(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %id, method = %method, path = %path);
    let start = std::time::Instant::now();
    let res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let bytes = axum::body::HttpBody::size_hint(res.body()).exact();
    let _enter = span.enter();
    tracing::info!(
        status = res.status().as_u16(),
        ms = (start.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        bytes,
        "request"
    );
    res
}

fn cors_layer(origins: &[String]) -> Result<CorsLayer> {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim()).map_err(|_| {
                    Error::param("cors_origin", format!("`{o}` is not a valid origin"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers(Any)
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-lumen-seed"),
            HeaderName::from_static("x-lumen-score"),
            HeaderName::from_static("location"),
        ]))
}

/// Middleware: the API key, when one is set.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    match given {
        Some(g) if key.matches(g.trim()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}
