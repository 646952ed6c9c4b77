//! The playground at `/`: one page, its script and style sheet, and the
//! bundled shapes guides, all compiled into the binary (no CDN, no build
//! step). The page uses only the public API, with the caller's key; the
//! files themselves are public, as they hold no data.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::server::error::ApiError;

const INDEX: &str = include_str!("../playground/index.html");
const SCRIPT: &str = include_str!("../playground/app.js");
const STYLE: &str = include_str!("../playground/style.css");

/// The bundled guides the page offers (the README's shapes examples).
const EXAMPLES: [(&str, &[u8]); 3] = [
    (
        "shapes-guide",
        include_bytes!("../../../models/examples/shapes-guide.png"),
    ),
    (
        "shapes-guide-2",
        include_bytes!("../../../models/examples/shapes-guide-2.png"),
    ),
    (
        "shapes-guide-3",
        include_bytes!("../../../models/examples/shapes-guide-3.png"),
    ),
];

/// Only this server's own scripts, styles and API; images also from data:
/// and blob: URLs (the results arrive as base64).
const CSP: &str = "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; \
    style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    frame-ancestors 'none'; form-action 'none'";

fn asset(mime: &'static str, body: impl IntoResponse) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

pub async fn example(Path(file): Path<String>) -> Result<Response, ApiError> {
    let name = file.strip_suffix(".png").unwrap_or(&file);
    EXAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| asset("image/png", *bytes))
        .ok_or_else(|| ApiError::NoRoute {
            method: "GET".into(),
            path: format!("/playground/examples/{file}"),
        })
}
