//! Wire types of the HTTP API and the OpenAPI document generated from them.
//! The committed `openapi/openapi.json` is this document, pretty-printed
//! (`lumen openapi > openapi/openapi.json`); a test keeps them equal.

use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

/// `POST /layout` as JSON.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LayoutRequest {
    /// The guide image (PNG, JPEG or WebP), base64 (standard alphabet, padding
    /// optional, a `data:` URL prefix allowed). Required.
    #[serde(default)]
    pub image: String,
    /// Number of PCA components K (1..=Kmax); default from the model's lumen.json.
    #[schema(minimum = 1)]
    pub components: Option<usize>,
    /// Longer side, in pixels, of the image fed to the encoder (default 518 or lumen.json's).
    #[schema(minimum = 1, maximum = 2048)]
    pub layout_size: Option<u32>,
}

/// `POST /layout` as multipart/form-data.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct LayoutForm {
    /// The guide image file (PNG, JPEG or WebP).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    #[schema(minimum = 1)]
    pub components: Option<usize>,
    pub layout_size: Option<u32>,
}

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

/// `POST /synthesize` as JSON: a guide `image` or a `layout_id`, exactly one.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SynthesizeRequest {
    /// The guide image (PNG, JPEG or WebP), base64.
    pub image: Option<String>,
    /// A `layout_id` returned by `POST /layout` (or in an earlier synthesis' parameters).
    pub layout_id: Option<String>,
    /// Text prompt.
    pub prompt: Option<String>,
    /// Negative prompt (used when guidance_scale > 1).
    pub negative_prompt: Option<String>,
    /// K (1..=Kmax): fewer components give more diverse images, more give
    /// higher fidelity to the guide. Default: the layout_id's K, else lumen.json's.
    #[schema(minimum = 1)]
    pub components: Option<usize>,
    /// Longer side of the encoder input when an image is given.
    #[schema(minimum = 1, maximum = 2048)]
    pub layout_size: Option<u32>,
    /// Denoising steps (default 30).
    #[schema(minimum = 1, maximum = 1000)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default 7.5; at most 1 skips the unconditional pass).
    pub guidance_scale: Option<f64>,
    /// Weight of the ControlNet residuals (default 1.0).
    pub control_scale: Option<f64>,
    /// `ddim`, `euler` or `dpmpp-2m`; default: the model folder's scheduler if lumen has it, else dpmpp-2m.
    pub scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i. Random if omitted.
    pub seed: Option<u64>,
    /// Number of images (1..=8, default 1).
    #[schema(minimum = 1, maximum = 8)]
    pub num_images: Option<usize>,
    /// Output width (give both or neither); default: the guide's aspect with the longer side 512.
    pub width: Option<u32>,
    /// Output height.
    pub height: Option<u32>,
    /// `png` (default; carries the parameters in an iTXt chunk), `jpeg` or `webp` (lossless).
    pub format: Option<String>,
}

/// `POST /synthesize` as multipart/form-data: the JSON fields as text parts,
/// the guide as a file part `image`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SynthesizeForm {
    #[schema(value_type = Option<String>, format = Binary)]
    pub image: Option<Vec<u8>>,
    pub layout_id: Option<String>,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub components: Option<usize>,
    pub layout_size: Option<u32>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub control_scale: Option<f64>,
    pub scheduler: Option<String>,
    pub seed: Option<u64>,
    pub num_images: Option<usize>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub format: Option<String>,
}

/// One generated image.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageOut {
    pub seed: u64,
    /// The encoded image (see `parameters.format`), base64.
    pub data: String,
}

/// The parameters a synthesis ran with, defaults resolved.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SynthesisParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub components: usize,
    pub layout_size: u32,
    /// Id of the guide's layout: reuse it to skip the encoder.
    pub layout_id: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub control_scale: f64,
    pub scheduler: String,
    /// Seed of the first image.
    pub seed: u64,
    pub num_images: usize,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub model: String,
    pub lumen_version: String,
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: invalid_parameter, invalid_request, invalid_image,
    /// image_too_large, unauthorized, unknown_layout, not_found,
    /// method_not_allowed, payload_too_large, unsupported_media_type,
    /// not_acceptable, overloaded, timeout, not_ready, shutting_down, internal.
    pub code: String,
    /// What was wrong, naming the field at fault.
    pub message: String,
}

/// `GET /health` and `GET /ready`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok`, `loading` or `shutting_down`.
    pub status: String,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub version: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lumen",
        description = "Label-free neural semantic image synthesis: a guide image becomes a neural layout (DINOv2 patch features reduced by PCA to K components), and a layout-conditioned latent diffusion model makes new images with the same scene layout.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::server::handlers::layout,
        crate::server::handlers::synthesize,
        crate::server::handlers::health,
        crate::server::handlers::ready,
        crate::server::handlers::metrics,
    ),
    components(schemas(
        LayoutRequest,
        LayoutForm,
        LayoutResponse,
        SynthesizeRequest,
        SynthesizeForm,
        SynthesizeResponse,
        SynthesisParameters,
        ImageOut,
        Timings,
        ErrorBody,
        ErrorDetail,
        Status
    )),
    modifiers(&SecurityAddon),
    tags((name = "lumen", description = "Neural layouts and layout-conditioned synthesis"))
)]
pub struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The OpenAPI document as committed in `openapi/openapi.json`.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut s = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}
