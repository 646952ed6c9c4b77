//! Encoded outputs: generated images as PNG (with their
//! [`SynthesisParameters`] record), JPEG or lossless WebP, and layout previews.

use image::RgbImage;

use crate::error::{Error, Result};
use crate::pipeline::layout::Layout;
use crate::pipeline::parameters::SynthesisParameters;
use crate::png_text;

/// The image format of generated images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    /// The names requests use, in this order.
    pub const NAMES: [&'static str; 3] = ["png", "jpeg", "webp"];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "png" => Ok(Self::Png),
            "jpeg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            _ => Err(Error::param(
                "format",
                format!("`{s}` is not png, jpeg or webp"),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    pub fn mime(&self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The format a file name asks for (`.png`, `.jpg`/`.jpeg`, `.webp`).
    pub fn from_extension(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Self::Png),
            "jpg" | "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }

    /// Encode one image; a PNG carries `record` (the record of this image:
    /// see [`SynthesisParameters::for_image`]).
    pub fn encode(&self, img: &RgbImage, record: &SynthesisParameters) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Self::Png => return png_text::encode(img, png_text::KEYWORD, &record.to_json()),
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

/// Longer side of a layout preview.
pub const PREVIEW_MAX_SIDE: u32 = 1024;

/// The preview size for a guide of `(w, h)`: the guide's size, scaled down
/// to [`PREVIEW_MAX_SIDE`] when larger.
pub fn preview_size((w, h): (u32, u32)) -> (u32, u32) {
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

/// The preview of a layout (first three components as RGB) as PNG bytes.
pub fn preview_png(layout: &Layout, (w, h): (u32, u32)) -> Result<Vec<u8>> {
    let img = layout.preview(w, h)?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("cannot encode the preview: {e}")))?;
    Ok(out)
}
