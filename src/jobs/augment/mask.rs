//! Segmentation masks as PNG class maps, carried over to a synthesized image
//! of another size.
//!
//! A mask is kept exactly as stored: the PNG is decoded with no expansion,
//! so a palette (indexed) mask keeps its indices with its `PLTE` and `tRNS`,
//! a greyscale mask keeps its 8- or 16-bit values and an RGB(A) colour mask
//! keeps its colours. The only change on reading is that sub-byte depths
//! (1, 2 or 4 bits, palette or grey) are unpacked to one byte per pixel; they
//! are written back as 8-bit PNGs with the same values.
//!
//! Resizing is nearest neighbour by the pixel-centre rule (see
//! [`nearest_indices`]), so every output pixel is a copy of one input pixel
//! and no class value is ever invented. [`super::coco`] resizes its RLE masks
//! by the same rule.

use std::io::Cursor;
use std::path::Path;

use crate::error::{Error, Result};

/// The most bytes a decoded mask may hold (after unpacking sub-byte depths):
/// 1 GiB, e.g. a 16384 × 16384 RGBA 8-bit map. A header announcing more is
/// refused before anything is allocated.
pub const MAX_MASK_BYTES: u64 = 1 << 30;

/// One mask image: `width × height` pixels, row-major, each pixel
/// `channels × bytes_per_sample` bytes with 16-bit samples big-endian (as in
/// PNG).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    width: u32,
    height: u32,
    color: png::ColorType,
    sixteen: bool,
    samples: Vec<u8>,
    palette: Option<Vec<u8>>,
    trns: Option<Vec<u8>>,
}

/// For each of `dst_len` output positions, the input position (< `src_len`)
/// that nearest-neighbour resizing copies, by the pixel-centre rule:
///
/// `src = min(floor((dst + 0.5) · src_len / dst_len), src_len − 1)`,
///
/// computed exactly in integers as `floor((2·dst + 1) · src_len / (2·dst_len))`
/// (the `min` never binds then). This is PIL's `NEAREST` and torch's
/// `nearest-exact`; those compute in floating point, so where the sample
/// point falls exactly on the border of two input pixels (e.g. 2 → 7 pixels)
/// they may pick the lower one while this picks the upper one. Integer ratios
/// (×k, ÷k) agree with both.
///
/// Empty when `dst_len` is 0, and when `src_len` is 0 (no input pixel to
/// copy).
pub fn nearest_indices(src_len: u32, dst_len: u32) -> Vec<usize> {
    if src_len == 0 || dst_len == 0 {
        return Vec::new();
    }
    let (s, d) = (u128::from(src_len), u128::from(dst_len));
    (0..d)
        .map(|i| {
            let j = ((2 * i + 1) * s / (2 * d)).min(s - 1);
            // j < src_len <= u32::MAX, so it fits a usize on every target we build.
            j as usize
        })
        .collect()
}

impl Mask {
    /// A mask from samples already unpacked to 8 or 16 bits (16-bit samples
    /// big-endian). Fails when the length does not match the size, the depth
    /// is not 8 or 16, or an indexed mask has no palette.
    pub fn from_samples(
        width: u32,
        height: u32,
        color: png::ColorType,
        bit_depth: png::BitDepth,
        samples: Vec<u8>,
        palette: Option<Vec<u8>>,
        trns: Option<Vec<u8>>,
    ) -> Result<Mask> {
        let sixteen = match bit_depth {
            png::BitDepth::Eight => false,
            png::BitDepth::Sixteen => true,
            other => {
                return Err(Error::param(
                    "masks",
                    format!("samples must be 8 or 16 bits, not {}", other as u8),
                ))
            }
        };
        if sixteen && color == png::ColorType::Indexed {
            return Err(Error::param("masks", "an indexed mask cannot be 16-bit"));
        }
        if color == png::ColorType::Indexed && palette.is_none() {
            return Err(Error::param("masks", "an indexed mask needs a palette"));
        }
        if width == 0 || height == 0 {
            return Err(Error::param(
                "masks",
                format!("a mask cannot be {width}x{height}"),
            ));
        }
        let bpp = color.samples() * if sixteen { 2 } else { 1 };
        let expected = u64::from(width) * u64::from(height) * bpp as u64;
        if samples.len() as u64 != expected {
            return Err(Error::param(
                "masks",
                format!(
                    "{width}x{height} mask needs {expected} bytes of samples, got {}",
                    samples.len()
                ),
            ));
        }
        Ok(Mask {
            width,
            height,
            color,
            sixteen,
            samples,
            palette,
            trns,
        })
    }

    /// Reads a PNG mask. An unreadable file is [`Error::Io`]; a file that is
    /// not a PNG this module can keep is a `masks` parameter error naming it.
    pub fn read(path: &Path) -> Result<Mask> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::decode(&bytes, path)
    }

    /// Decodes PNG bytes; `name` is only used in error messages.
    pub fn decode(bytes: &[u8], name: &Path) -> Result<Mask> {
        let bad = |why: String| Error::param("masks", format!("{}: {why}", name.display()));
        let mut decoder = png::Decoder::new(Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let header = decoder
            .read_header_info()
            .map_err(|e| bad(format!("not a decodable PNG: {e}")))?;
        let (width, height) = (header.width, header.height);
        let (color, depth) = (header.color_type, header.bit_depth);
        let bits = depth as u64;
        let unpacked_bytes = u64::from(width)
            * u64::from(height)
            * color.samples() as u64
            * if bits == 16 { 2 } else { 1 };
        if unpacked_bytes > MAX_MASK_BYTES {
            return Err(bad(format!(
                "{width}x{height} is too large for a mask (over {MAX_MASK_BYTES} bytes decoded)"
            )));
        }
        let mut reader = decoder
            .read_info()
            .map_err(|e| bad(format!("not a decodable PNG: {e}")))?;
        let info = reader.info();
        let palette = info.palette.as_ref().map(|p| p.to_vec());
        let trns = info.trns.as_ref().map(|t| t.to_vec());
        if color == png::ColorType::Indexed && palette.is_none() {
            return Err(bad("indexed PNG without a palette (PLTE)".into()));
        }
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| bad(format!("{width}x{height} is too large")))?;
        let mut buf = vec![0u8; size];
        let frame = reader
            .next_frame(&mut buf)
            .map_err(|e| bad(format!("not a decodable PNG: {e}")))?;
        let line = frame.line_size;
        let (w, h) = (width as usize, height as usize);
        let samples = if bits < 8 {
            // Only grey and indexed PNGs have sub-byte depths: one sample a pixel.
            let bits = bits as usize;
            let per_byte = 8 / bits;
            let max = (1u16 << bits) - 1;
            let mut out = Vec::with_capacity(w * h);
            for row in buf.chunks(line.max(1)).take(h) {
                for x in 0..w {
                    let byte = row.get(x / per_byte).copied().unwrap_or(0);
                    let shift = 8 - bits * (x % per_byte + 1);
                    out.push(((u16::from(byte) >> shift) & max) as u8);
                }
            }
            out
        } else {
            buf.truncate(line * h);
            buf
        };
        let bit_depth = if bits == 16 {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        };
        Mask::from_samples(width, height, color, bit_depth, samples, palette, trns).map_err(|e| {
            match e {
                Error::InvalidParameter { message, .. } => bad(message),
                other => other,
            }
        })
    }

    /// `(width, height)` in pixels.
    pub fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// The PNG colour type the mask was stored with (and is written with).
    pub fn color_type(&self) -> png::ColorType {
        self.color
    }

    /// The sample depth held and written: 8 (sub-byte depths included) or 16.
    pub fn bit_depth(&self) -> png::BitDepth {
        if self.sixteen {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        }
    }

    /// The raw samples, row-major, 16-bit ones big-endian.
    pub fn samples(&self) -> &[u8] {
        &self.samples
    }

    /// The `PLTE` chunk (RGB triplets), if any.
    pub fn palette(&self) -> Option<&[u8]> {
        self.palette.as_deref()
    }

    /// The `tRNS` chunk, if any.
    pub fn trns(&self) -> Option<&[u8]> {
        self.trns.as_deref()
    }

    fn bytes_per_pixel(&self) -> usize {
        self.color.samples() * if self.sixteen { 2 } else { 1 }
    }

    /// The distinct pixel values, sorted: each one number per channel (the
    /// palette index, the grey level, or the colour's samples; 16-bit
    /// samples as numbers up to 65535).
    pub fn values(&self) -> Vec<Vec<u32>> {
        let bpp = self.bytes_per_pixel();
        let distinct: std::collections::BTreeSet<&[u8]> = self.samples.chunks_exact(bpp).collect();
        let step = if self.sixteen { 2 } else { 1 };
        distinct
            .into_iter()
            .map(|px| {
                px.chunks_exact(step)
                    .map(|b| b.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x)))
                    .collect()
            })
            .collect()
    }

    /// The bytes of pixel `(x, y)`, or `None` outside the mask.
    pub fn pixel(&self, x: u32, y: u32) -> Option<&[u8]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let bpp = self.bytes_per_pixel();
        let at = (y as usize * self.width as usize + x as usize) * bpp;
        self.samples.get(at..at + bpp)
    }

    /// The mask resized to `width × height` by nearest neighbour with the
    /// pixel-centre rule of [`nearest_indices`]: output pixel `(x, y)` is
    /// input pixel `(floor((2x+1)·W / 2w), floor((2y+1)·H / 2h))`, copied
    /// byte for byte, so class values, palette and `tRNS` are untouched.
    pub fn resize_nearest(&self, width: u32, height: u32) -> Mask {
        let bpp = self.bytes_per_pixel();
        let xs = nearest_indices(self.width, width);
        let ys = nearest_indices(self.height, height);
        let src_row = self.width as usize * bpp;
        let mut samples = Vec::with_capacity(xs.len() * ys.len() * bpp);
        for &sy in &ys {
            let row = &self.samples[sy * src_row..(sy + 1) * src_row];
            for &sx in &xs {
                samples.extend_from_slice(&row[sx * bpp..(sx + 1) * bpp]);
            }
        }
        Mask {
            width: xs.len() as u32,
            height: ys.len() as u32,
            color: self.color,
            sixteen: self.sixteen,
            samples,
            palette: self.palette.clone(),
            trns: self.trns.clone(),
        }
    }

    /// Encodes the mask as a PNG with the same colour type, palette and
    /// `tRNS`; sub-byte depths come out as 8-bit (same values), 16-bit stays
    /// 16-bit. Fails only for a mask with no pixels.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let fail = |e: png::EncodingError| {
            Error::Internal(format!(
                "encoding a {}x{} mask as PNG: {e}",
                self.width, self.height
            ))
        };
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
            encoder.set_color(self.color);
            encoder.set_depth(self.bit_depth());
            if let Some(p) = &self.palette {
                encoder.set_palette(p.as_slice());
            }
            if let Some(t) = &self.trns {
                encoder.set_trns(t.as_slice());
            }
            let mut writer = encoder.write_header().map_err(fail)?;
            writer.write_image_data(&self.samples).map_err(fail)?;
            writer.finish().map_err(fail)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use png::{BitDepth, ColorType};

    #[test]
    fn values_are_distinct_and_per_channel() {
        let grey = Mask::from_samples(
            3,
            1,
            ColorType::Grayscale,
            BitDepth::Sixteen,
            vec![1, 0, 0, 7, 1, 0],
            None,
            None,
        )
        .unwrap();
        assert_eq!(grey.values(), [vec![7], vec![256]]);
        let rgb = Mask::from_samples(
            2,
            1,
            ColorType::Rgb,
            BitDepth::Eight,
            vec![9, 8, 7, 1, 2, 3],
            None,
            None,
        )
        .unwrap();
        assert_eq!(rgb.values(), [vec![1, 2, 3], vec![9, 8, 7]]);
    }

    /// Encodes packed rows (as PNG stores them) into a PNG file.
    fn png_bytes(
        w: u32,
        h: u32,
        color: ColorType,
        depth: BitDepth,
        packed: &[u8],
        palette: Option<&[u8]>,
        trns: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, w, h);
            e.set_color(color);
            e.set_depth(depth);
            if let Some(p) = palette {
                e.set_palette(p.to_vec());
            }
            if let Some(t) = trns {
                e.set_trns(t.to_vec());
            }
            let mut wr = e.write_header().unwrap();
            wr.write_image_data(packed).unwrap();
            wr.finish().unwrap();
        }
        out
    }

    fn grey8(w: u32, h: u32, values: Vec<u8>) -> Mask {
        Mask::from_samples(
            w,
            h,
            ColorType::Grayscale,
            BitDepth::Eight,
            values,
            None,
            None,
        )
        .unwrap()
    }

    fn name() -> &'static Path {
        Path::new("masks/a.png")
    }

    #[test]
    fn palette_8bit_round_trips_indices_palette_and_trns() {
        let palette: Vec<u8> = (0..3 * 5).map(|i| (i * 17) as u8).collect();
        let trns = [0u8, 255, 128];
        let idx = [0u8, 1, 2, 3, 4, 4, 3, 2, 1, 0, 2, 2];
        let bytes = png_bytes(
            4,
            3,
            ColorType::Indexed,
            BitDepth::Eight,
            &idx,
            Some(&palette),
            Some(&trns),
        );
        let m = Mask::decode(&bytes, name()).unwrap();
        assert_eq!(m.dimensions(), (4, 3));
        assert_eq!(m.color_type(), ColorType::Indexed);
        assert_eq!(m.samples(), &idx);
        assert_eq!(m.palette(), Some(palette.as_slice()));
        assert_eq!(m.trns(), Some(trns.as_slice()));
        let again = Mask::decode(&m.to_png().unwrap(), name()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn palette_4bit_unpacks_and_writes_back_as_8bit() {
        // 5x2 at 4 bits: rows of 3 bytes, the last nibble padding.
        let palette: Vec<u8> = (0..3 * 16).map(|i| (255 - i * 5) as u8).collect();
        let packed = [0x01, 0x23, 0xF0, 0xFE, 0xDC, 0xB0];
        let bytes = png_bytes(
            5,
            2,
            ColorType::Indexed,
            BitDepth::Four,
            &packed,
            Some(&palette),
            None,
        );
        let m = Mask::decode(&bytes, name()).unwrap();
        assert_eq!(m.samples(), &[0, 1, 2, 3, 15, 15, 14, 13, 12, 11]);
        assert_eq!(m.bit_depth(), BitDepth::Eight);
        assert_eq!(m.palette(), Some(palette.as_slice()));
        assert_eq!(m.trns(), None);
        let png = m.to_png().unwrap();
        let mut reader = png::Decoder::new(Cursor::new(&png)).read_info().unwrap();
        assert_eq!(reader.info().bit_depth, BitDepth::Eight);
        assert_eq!(reader.info().color_type, ColorType::Indexed);
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, m.samples());
        assert_eq!(Mask::decode(&png, name()).unwrap(), m);
    }

    #[test]
    fn sub_byte_grey_keeps_values() {
        // 1-bit 10x1: 1011 0010 | 11xx xxxx
        let bytes = png_bytes(
            10,
            1,
            ColorType::Grayscale,
            BitDepth::One,
            &[0b1011_0010, 0b1100_0000],
            None,
            None,
        );
        let m = Mask::decode(&bytes, name()).unwrap();
        assert_eq!(m.samples(), &[1, 0, 1, 1, 0, 0, 1, 0, 1, 1]);
        // 2-bit 3x1: 11 01 10 xx
        let bytes = png_bytes(
            3,
            1,
            ColorType::Grayscale,
            BitDepth::Two,
            &[0b1101_1000],
            None,
            None,
        );
        assert_eq!(Mask::decode(&bytes, name()).unwrap().samples(), &[3, 1, 2]);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn interlaced_sub_byte_masks_unpack() {
        // Written by pypng (Adam7): 13x11, 4-bit palette, index (3x + y) % 16;
        // and 13x11 1-bit grey, value (x + y) % 2.
        let palette4 = unhex(
            "89504e470d0a1a0a0000000d494844520000000d0000000b0403000001219b2ac400000030504c54\
             4500ff0010ef0120df0230cf0340bf0450af05609f06708f07807f08906f09a05f0ab04f0bc03f0c\
             d02f0de01f0ef00f0ffb7aebfe0000006249444154789c63e060686038c2e0c3e0708221e901c332\
             058657090c1a4f162430e400498605391a0f182cbf6e648816bfcc506bf995617eb438c3c65a4b86\
             cbf3a31944aa2e98cdf914c0002422f68914300009a0c80406b070c40606b070d50500f80d27611b\
             b429a20000000049454e44ae426082",
        );
        let m = Mask::decode(&palette4, name()).unwrap();
        assert_eq!(m.dimensions(), (13, 11));
        let want: Vec<u8> = (0..11u8)
            .flat_map(|y| (0..13u8).map(move |x| (3 * x + y) % 16))
            .collect();
        assert_eq!(m.samples(), want.as_slice());
        assert_eq!(m.palette().map(<[u8]>::len), Some(48));
        assert_eq!(
            m.palette().map(|p| p[3..6].to_vec()),
            Some(vec![16, 239, 1])
        );
        let grey1 = unhex(
            "89504e470d0a1a0a0000000d494844520000000d0000000b0100000001fbce0a5a00000012494441\
             54789c6360c00afe20c1552b901100adc10c8371d9705e0000000049454e44ae426082",
        );
        let m = Mask::decode(&grey1, name()).unwrap();
        let want: Vec<u8> = (0..11u8)
            .flat_map(|y| (0..13u8).map(move |x| (x + y) % 2))
            .collect();
        assert_eq!(m.samples(), want.as_slice());
    }

    #[test]
    fn grey_16bit_keeps_values() {
        let values: [u16; 6] = [0, 1, 256, 1000, 65535, 300];
        let packed: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        let bytes = png_bytes(
            3,
            2,
            ColorType::Grayscale,
            BitDepth::Sixteen,
            &packed,
            None,
            None,
        );
        let m = Mask::decode(&bytes, name()).unwrap();
        assert_eq!(m.bit_depth(), BitDepth::Sixteen);
        assert_eq!(m.samples(), packed.as_slice());
        assert_eq!(m.pixel(1, 1), Some(&[0xFF, 0xFF][..]));
        let r = m.resize_nearest(6, 4);
        assert_eq!(r.pixel(3, 3), Some(&65535u16.to_be_bytes()[..]));
        let again = Mask::decode(&r.to_png().unwrap(), name()).unwrap();
        assert_eq!(again.bit_depth(), BitDepth::Sixteen);
        assert_eq!(again, r);
    }

    #[test]
    fn rgb_colour_mask_keeps_colours() {
        let px = [255u8, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30];
        let bytes = png_bytes(2, 2, ColorType::Rgb, BitDepth::Eight, &px, None, None);
        let m = Mask::decode(&bytes, name()).unwrap();
        assert_eq!(m.samples(), &px);
        let r = m.resize_nearest(4, 4);
        assert_eq!(r.pixel(3, 3), Some(&[10u8, 20, 30][..]));
        assert_eq!(r.pixel(1, 2), Some(&[0u8, 0, 255][..]));
        assert_eq!(Mask::decode(&r.to_png().unwrap(), name()).unwrap(), r);
    }

    #[test]
    fn upscale_by_two_is_pixel_exact() {
        let m = grey8(3, 2, vec![1, 2, 3, 4, 5, 6]);
        let r = m.resize_nearest(6, 4);
        assert_eq!(r.dimensions(), (6, 4));
        #[rustfmt::skip]
        let want = [
            1, 1, 2, 2, 3, 3,
            1, 1, 2, 2, 3, 3,
            4, 4, 5, 5, 6, 6,
            4, 4, 5, 5, 6, 6,
        ];
        assert_eq!(r.samples(), &want);
    }

    #[test]
    fn downscale_by_two_takes_the_pixel_right_of_each_centre() {
        // (d + 0.5) · 2 = 2d + 1: the centre of each 2x2 block lies on a
        // border and the rule takes the lower-right pixel, as PIL does.
        let m = grey8(4, 4, (0..16).collect());
        let r = m.resize_nearest(2, 2);
        assert_eq!(r.samples(), &[5, 7, 13, 15]);
    }

    #[test]
    fn non_integer_ratio_follows_the_formula() {
        // 7x5 -> 3x4 and 7x5 -> 10x8, compared with PIL 13 (Image.NEAREST).
        let m = grey8(7, 5, (0..35).collect());
        let r = m.resize_nearest(3, 4);
        assert_eq!(r.samples(), &[1, 3, 5, 8, 10, 12, 22, 24, 26, 29, 31, 33]);
        let r = m.resize_nearest(10, 8);
        let pil_rows: [[u8; 10]; 8] = [
            [0, 1, 1, 2, 3, 3, 4, 5, 5, 6],
            [0, 1, 1, 2, 3, 3, 4, 5, 5, 6],
            [7, 8, 8, 9, 10, 10, 11, 12, 12, 13],
            [14, 15, 15, 16, 17, 17, 18, 19, 19, 20],
            [14, 15, 15, 16, 17, 17, 18, 19, 19, 20],
            [21, 22, 22, 23, 24, 24, 25, 26, 26, 27],
            [28, 29, 29, 30, 31, 31, 32, 33, 33, 34],
            [28, 29, 29, 30, 31, 31, 32, 33, 33, 34],
        ];
        assert_eq!(r.samples(), pil_rows.concat().as_slice());
        // And the formula itself, for many size pairs.
        for s in 1..40u32 {
            for d in 1..40u32 {
                let idx = nearest_indices(s, d);
                assert_eq!(idx.len(), d as usize);
                for (i, &j) in idx.iter().enumerate() {
                    let i = i as u32;
                    assert_eq!(j as u32, ((2 * i + 1) * s / (2 * d)).min(s - 1));
                    // The pixel-centre rule: j is the input pixel holding (i + 0.5) · s / d.
                    let centre = (i as f64 + 0.5) * s as f64 / d as f64;
                    assert!(j as f64 <= centre + 1e-9 && centre < j as f64 + 1.0 + 1e-9);
                }
            }
        }
        assert_eq!(nearest_indices(u32::MAX, 1), vec![(u32::MAX / 2) as usize]);
        assert!(nearest_indices(5, 0).is_empty());
    }

    #[test]
    fn garbage_is_a_param_error_naming_the_file() {
        let err = Mask::decode(b"not a png at all", Path::new("seg/x.png")).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { ref name, .. } if name == "masks"));
        assert!(err.to_string().contains("seg/x.png"), "{err}");
        // A truncated PNG too.
        let good = png_bytes(
            4,
            4,
            ColorType::Grayscale,
            BitDepth::Eight,
            &[7; 16],
            None,
            None,
        );
        let err = Mask::decode(&good[..good.len() - 20], Path::new("seg/y.png")).unwrap_err();
        assert!(err.to_string().contains("seg/y.png"), "{err}");
    }

    #[test]
    fn read_reports_io_and_decode_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.png");
        let err = Mask::read(&missing).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("missing.png"));
        let junk = dir.path().join("junk.png");
        std::fs::write(&junk, b"\x89PNG\r\n\x1a\nnope").unwrap();
        let err = Mask::read(&junk).unwrap_err();
        assert!(matches!(err, Error::InvalidParameter { .. }));
        assert!(err.to_string().contains("junk.png"));
        let ok = dir.path().join("ok.png");
        let m = grey8(2, 1, vec![3, 9]);
        std::fs::write(&ok, m.to_png().unwrap()).unwrap();
        assert_eq!(Mask::read(&ok).unwrap(), m);
    }

    #[test]
    fn huge_header_is_refused_before_allocating() {
        // A valid 8-bit grey header claiming 100000 x 100000 pixels, no data.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
        let err = Mask::decode(&png, name()).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn from_samples_checks_its_input() {
        // Wrong sample count; indexed without a palette; a sub-byte depth; no pixels.
        for (w, h, color, depth, n) in [
            (2, 2, ColorType::Rgb, BitDepth::Eight, 11),
            (1, 1, ColorType::Indexed, BitDepth::Eight, 1),
            (1, 1, ColorType::Grayscale, BitDepth::Four, 1),
            (0, 1, ColorType::Grayscale, BitDepth::Eight, 0),
        ] {
            assert!(Mask::from_samples(w, h, color, depth, vec![0; n], None, None).is_err());
        }
        let empty = grey8(2, 2, vec![0; 4]).resize_nearest(0, 3);
        assert_eq!(empty.dimensions(), (0, 3));
        assert!(empty.to_png().is_err());
    }
}
