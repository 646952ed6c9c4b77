//! The service's error type and the one place where errors become HTTP
//! statuses. Every failure answers `{"error": {"code": "...", "message": "..."}}`.
//!
//! The 400 codes follow the core rule (`crate::error`): `invalid_request`
//! when the body does not read as the endpoint's request (syntax, types,
//! unknown or repeated fields), `invalid_parameter` when a value is not
//! allowed (range, choice, missing, conflicting with another field). Both
//! name the field.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::Error;
use crate::server::api::{ErrorBody, ErrorDetail};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A failure from the core: a bad request, parameter or image, a full
    /// queue, shutdown, or lumen's own fault.
    #[error(transparent)]
    Lumen(#[from] Error),

    #[error("missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")]
    Unauthorized,

    #[error("unknown layout_id `{0}` (layouts are kept in a bounded cache: compute it again with POST /layout)")]
    UnknownLayout(String),

    #[error("unknown job `{0}` (finished jobs are kept for --job-ttl-s)")]
    UnknownJob(String),

    #[error("job `{id}` is {state}: its images exist once it has succeeded")]
    JobNotSucceeded { id: String, state: &'static str },

    #[error("job `{id}` has {count} image(s): index {index} is not one of them")]
    UnknownImage {
        id: String,
        index: String,
        count: usize,
    },

    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },

    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },

    #[error("the request body is over the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },

    #[error("unsupported content type `{0}`: send application/json or multipart/form-data")]
    UnsupportedMediaType(String),

    #[error("cannot answer with `{accept}`: {message}")]
    NotAcceptable { accept: String, message: String },

    #[error("the request did not finish within {0} s")]
    Timeout(u64),

    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),

    #[error("the models are still loading")]
    NotReady,
}

impl ApiError {
    /// HTTP status and stable machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Lumen(e) => match e {
                Error::InvalidRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
                Error::InvalidParameter { .. } => (StatusCode::BAD_REQUEST, "invalid_parameter"),
                Error::InvalidImage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_image"),
                Error::ImageTooLarge { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "image_too_large")
                }
                Error::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
                Error::ShuttingDown | Error::Interrupted { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
                }
                Error::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
                Error::DeadlineExceeded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
                Error::OverBudget { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "over_time_budget"),
                Error::DeviceFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "device_failed"),
                Error::ModelFile { .. }
                | Error::Io { .. }
                | Error::Tensor(_)
                | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::UnknownLayout(_) => (StatusCode::NOT_FOUND, "unknown_layout"),
            ApiError::UnknownJob(_) => (StatusCode::NOT_FOUND, "unknown_job"),
            ApiError::JobNotSucceeded { .. } => (StatusCode::CONFLICT, "job_not_succeeded"),
            ApiError::UnknownImage { .. } => (StatusCode::NOT_FOUND, "unknown_image"),
            ApiError::NoRoute { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::NotAcceptable { .. } => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
            ApiError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let expected = matches!(
            self,
            ApiError::NotReady
                | ApiError::Timeout(_)
                | ApiError::Lumen(
                    Error::ShuttingDown | Error::Cancelled | Error::DeadlineExceeded { .. }
                )
        );
        if status.is_server_error() && !expected {
            tracing::error!(code, error = %self, "request failed");
        } else if expected {
            tracing::info!(code, error = %self, "request not served");
        } else {
            tracing::debug!(code, error = %self, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: self.to_string(),
            },
        };
        let mut res = (status, Json(body)).into_response();
        let retry_after = match &self {
            ApiError::Lumen(Error::Overloaded { .. }) => Some(1),
            ApiError::Lumen(Error::ShuttingDown) => Some(1),
            ApiError::NotReady => Some(5),
            _ => None,
        };
        if let Some(s) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let ApiError::Unauthorized = self {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;
