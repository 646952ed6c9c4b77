//! Wire types of the HTTP answers. The requests are the request model's own
//! types (`crate::pipeline::request`); the document is in `server::openapi`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::pipeline::request::SynthesisParameters;

/// A neural layout.
#[derive(Debug, Serialize, ToSchema)]
pub struct LayoutResponse {
    /// Opaque id of this layout for `POST /synthesize` (kept in a bounded LRU cache).
    pub layout_id: String,
    /// K: the number of components in `data`.
    pub components: usize,
    /// Patch grid `[h, w]`.
    pub grid: [usize; 2],
    /// PNG preview (first three components as RGB) at the guide's size, base64.
    pub preview_png: String,
    /// Little-endian f32 values `[K, h, w]`, base64.
    pub data: String,
}

/// One generated image.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageOut {
    pub seed: u64,
    /// The encoded image (see `parameters.format`), base64.
    pub data: String,
    /// Fidelity score (only with `score: true`): the Pearson correlation of
    /// the guide's and this image's layouts over all Kmax components.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub score: Option<f32>,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Timings {
    /// Waiting in the queue for the inference thread.
    pub queue_ms: f64,
    /// Encoder + PCA (0 when the layout came from the cache).
    pub layout_ms: f64,
    /// Denoising loop of the batch this request ran in.
    pub denoise_ms: f64,
    /// VAE decode of this request's images.
    pub decode_ms: f64,
    /// Fidelity scores of this request's images (0 unless `score: true`).
    pub score_ms: f64,
    /// Image encoding (PNG/JPEG/WebP) and base64.
    pub encode_ms: f64,
    /// Whole request, as the server saw it.
    pub total_ms: f64,
    /// Images in the batch this request ran in.
    pub batch_images: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SynthesizeResponse {
    pub images: Vec<ImageOut>,
    pub parameters: SynthesisParameters,
    pub timings: Timings,
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: invalid_parameter, invalid_request, invalid_image,
    /// image_too_large, unauthorized, unknown_layout, unknown_job,
    /// unknown_image, job_not_succeeded, not_found,
    /// method_not_allowed, payload_too_large, unsupported_media_type,
    /// not_acceptable, overloaded, over_time_budget, timeout, cancelled,
    /// not_ready, shutting_down, device_failed, internal.
    pub code: String,
    /// What was wrong, naming the field at fault.
    pub message: String,
}

/// `GET /health` and `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok`, `loading`, `shutting_down`, or `failed` (the models could not
    /// load, or the device failed: the process is exiting non-zero).
    pub status: String,
    /// The model's identity, from its content (`sha256:` and 16 hex digits):
    /// the same model files give the same identity wherever they are.
    pub model: String,
    /// Where the model folder is: its path, or `embedded:models/shapes`.
    pub model_path: String,
    pub device: String,
    pub dtype: String,
    pub version: String,
}
