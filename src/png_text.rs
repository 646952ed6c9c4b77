//! PNG files that carry their generation parameters: an `iTXt` chunk (UTF-8,
//! so any prompt fits) under the keyword `parameters`, holding JSON.

use std::io::Cursor;

use image::RgbImage;

use crate::error::{Error, Result};

/// The keyword of the chunk lumen writes.
pub const KEYWORD: &str = "parameters";

/// Encode `img` as PNG with `text` in an iTXt chunk named `keyword`.
pub fn encode(img: &RgbImage, keyword: &str, text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(Cursor::new(&mut out), img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk(keyword.to_string(), text.to_string())
            .map_err(|e| Error::Internal(format!("png text chunk: {e}")))?;
        let mut w = enc
            .write_header()
            .map_err(|e| Error::Internal(format!("png header: {e}")))?;
        w.write_image_data(img.as_raw())
            .map_err(|e| Error::Internal(format!("png data: {e}")))?;
    }
    Ok(out)
}

/// The text of the first tEXt/iTXt chunk named `keyword`, if any.
pub fn read(png_bytes: &[u8], keyword: &str) -> Option<String> {
    let decoder = png::Decoder::new(Cursor::new(png_bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == keyword) {
        return t.get_text().ok();
    }
    info.uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == keyword)
        .map(|t| t.text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 9]));
        let bytes = encode(&img, KEYWORD, "{\"prompt\": \"café ☕\"}").unwrap();
        assert_eq!(
            read(&bytes, KEYWORD).as_deref(),
            Some("{\"prompt\": \"café ☕\"}")
        );
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back, img);
    }
}
