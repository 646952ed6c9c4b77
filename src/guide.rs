//! Guide images: decoding (size checked from the header before any pixel is
//! decoded), resizing to the layout resolution, ImageNet normalization, and
//! the RGB preview of a layout.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// ImageNet statistics DINOv2 was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decode a PNG, JPEG or WebP guide image from memory, refusing images whose
/// header announces zero or more than `max_pixels` pixels.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::InvalidImage(format!("cannot read image: {e}")))
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(Error::InvalidImage(
            "unrecognized image format (expected PNG, JPEG or WebP)".into(),
        ));
    }
    if r.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills missing scan data with grey instead of failing.
        return Err(Error::InvalidImage(
            "truncated JPEG: the data ends before the end-of-image marker".into(),
        ));
    }
    let (width, height) = r
        .into_dimensions()
        .map_err(|e| Error::InvalidImage(format!("cannot read image header: {e}")))?;
    if width == 0 || height == 0 {
        return Err(Error::InvalidImage(format!(
            "image is {width}x{height}: it has no pixels"
        )));
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(Error::ImageTooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Up to 16-bit RGBA, plus room for the decoder's own buffers.
    limits.max_alloc = Some(pixels * 8 + (64 << 20));
    r.limits(limits);
    r.decode()
        .map_err(|e| Error::InvalidImage(format!("cannot decode image: {e}")))
}

/// Whether a JPEG stream reaches its end-of-image marker: walks the marker
/// segments (skipping their payloads by length) and the entropy-coded scans
/// (where 0xFF is byte-stuffed, so a marker there is real).
fn jpeg_is_complete(b: &[u8]) -> bool {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return false;
    }
    let mut i = 2;
    let mut in_scan = false;
    while i + 1 < b.len() {
        if b[i] != 0xFF {
            if !in_scan {
                return false;
            }
            i += 1;
            continue;
        }
        let m = b[i + 1];
        match m {
            0xD9 => return true,
            // Stuffed byte, fill bytes and restart markers stay inside a scan.
            0x00 | 0xFF | 0xD0..=0xD7 if in_scan => i += if m == 0xFF { 1 } else { 2 },
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => {
                if i + 3 >= b.len() {
                    return false;
                }
                let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
                i += 2 + len;
                in_scan = m == 0xDA;
            }
        }
    }
    false
}

/// Read and decode a guide image file.
pub fn open(path: &Path, max_pixels: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_named(&bytes, max_pixels, path)
}

/// [`decode`] the bytes of the file at `path`; errors name the file.
pub fn decode_named(bytes: &[u8], max_pixels: u64, path: &Path) -> Result<DynamicImage> {
    decode(bytes, max_pixels).map_err(|e| match e {
        Error::InvalidImage(m) => Error::InvalidImage(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// The encoder input size for a `width × height` guide: the longer side
/// becomes `layout_size`, the shorter side keeps the aspect ratio and is
/// rounded to the nearest multiple of `patch` (at least one patch).
pub fn layout_input_size(
    width: u32,
    height: u32,
    layout_size: u32,
    patch: u32,
) -> Result<(u32, u32)> {
    if layout_size < patch {
        return Err(Error::param(
            "layout_size",
            format!("{layout_size} is below one patch ({patch} pixels)"),
        ));
    }
    let round_short = |short: u32, long: u32| -> u32 {
        let exact = short as f64 * layout_size as f64 / long as f64;
        ((exact / patch as f64).round() as u32).max(1) * patch
    };
    Ok(if width >= height {
        (layout_size, round_short(height, width))
    } else {
        (round_short(width, height), layout_size)
    })
}

/// Resize (aspect kept, bicubic) to the encoder input size; an image that
/// already has that size is used as is.
pub fn resize_for_layout(img: &RgbImage, layout_size: u32, patch: u32) -> Result<RgbImage> {
    let (w, h) = layout_input_size(img.width(), img.height(), layout_size, patch)?;
    if (w, h) == img.dimensions() {
        Ok(img.clone())
    } else {
        Ok(image::imageops::resize(img, w, h, FilterType::CatmullRom))
    }
}

/// Pixels scaled to [0, 1] and normalized with the ImageNet mean and std,
/// channel-first: `[3, H, W]` f32 on the host.
pub fn normalize(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let v = px.0[c] as f32 / 255.0;
            data[c * h * w + i] = (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
}

/// A viewable picture of a layout `[K, h, w]`: its first three components as
/// R, G, B (each min–max scaled; one component shows as grey), resized with
/// nearest-neighbour sampling to `width × height`.
pub fn preview(layout: &Tensor, width: u32, height: u32) -> Result<RgbImage> {
    let (k, gh, gw) = layout.dims3()?;
    let data = layout
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = gh * gw;
    let scaled: Vec<Vec<u8>> = (0..k.min(3))
        .map(|c| {
            let p = &data[c * plane..(c + 1) * plane];
            let lo = p.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let range = if hi > lo { hi - lo } else { 1.0 };
            p.iter()
                .map(|v| ((v - lo) / range * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect()
        })
        .collect();
    let small = RgbImage::from_fn(gw as u32, gh as u32, |x, y| {
        let i = y as usize * gw + x as usize;
        let ch = |c: usize| match scaled.len() {
            1 => scaled[0][i],
            n if c < n => scaled[c][i],
            _ => 0,
        };
        image::Rgb([ch(0), ch(1), ch(2)])
    });
    Ok(image::imageops::resize(
        &small,
        width.max(1),
        height.max(1),
        FilterType::Nearest,
    ))
}

/// A guide image ready for the encoder (pixels prepared on the host).
#[derive(Clone, Debug)]
pub struct PreparedGuide {
    /// Normalized pixels `[3, H, W]` on the host.
    pub pixels: Tensor,
    /// Patch grid `(rows, cols)`.
    pub grid: (usize, usize),
    /// Size of the original guide image `(width, height)`.
    pub source_size: (u32, u32),
}

/// Resize and normalize a decoded guide for an encoder with `patch`-pixel
/// patches at `layout_size`.
pub fn prepare_pixels(patch: usize, img: &RgbImage, layout_size: u32) -> Result<PreparedGuide> {
    let resized = resize_for_layout(img, layout_size, patch as u32)?;
    let pixels = normalize(&resized)?;
    let grid = (
        resized.height() as usize / patch,
        resized.width() as usize / patch,
    );
    Ok(PreparedGuide {
        pixels,
        grid,
        source_size: img.dimensions(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_size_keeps_aspect_and_rounds_to_patches() {
        assert_eq!(layout_input_size(1000, 1000, 518, 14).unwrap(), (518, 518));
        // 518 * 3/4 = 388.5 -> 28 patches = 392
        assert_eq!(layout_input_size(800, 600, 518, 14).unwrap(), (518, 392));
        assert_eq!(layout_input_size(600, 800, 518, 14).unwrap(), (392, 518));
        // very thin images keep at least one patch
        assert_eq!(layout_input_size(5000, 10, 518, 14).unwrap(), (518, 14));
        assert!(layout_input_size(100, 100, 13, 14).is_err());
    }

    #[test]
    fn jpeg_completeness() {
        let img = RgbImage::from_fn(40, 24, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 9) as u8, 77])
        });
        let mut buf = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Jpeg)
            .unwrap();
        assert!(jpeg_is_complete(&buf));
        let mut trailing = buf.clone();
        trailing.extend_from_slice(b"trailing bytes");
        assert!(jpeg_is_complete(&trailing));
        for cut in [buf.len() - 1, buf.len() / 2, 10, 3] {
            assert!(!jpeg_is_complete(&buf[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_garbage_and_zero_sized() {
        assert!(matches!(
            decode(b"not an image", 100),
            Err(Error::InvalidImage(_))
        ));
        assert!(matches!(decode(&[], 100), Err(Error::InvalidImage(_))));
    }
}
