//! [`SynthesisParameters`]: the record of a synthesis, defaults resolved. The
//! API returns it, every PNG carries it (iTXt chunk `parameters`, for that
//! image: its own seed, `num_images` 1), the CLI writes the same.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The parameters a synthesis ran with, defaults resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
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
    /// Seed of the first image (of this image, in a PNG's record).
    pub seed: u64,
    pub num_images: usize,
    pub width: u32,
    pub height: u32,
    pub format: String,
    /// The file the initial noise came from instead of `seed` (`lumen
    /// synthesize --latents`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub latents: Option<String>,
    pub model: String,
    pub lumen_version: String,
}

impl SynthesisParameters {
    /// The record of image `i` alone: its seed, one image.
    pub fn for_image(&self, i: usize) -> Self {
        Self {
            seed: self.seed.wrapping_add(i as u64),
            num_images: 1,
            ..self.clone()
        }
    }

    /// As JSON text, for a PNG's `parameters` chunk.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}
