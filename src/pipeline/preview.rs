//! Cheap previews of an image in the making: the scheduler's predicted
//! clean latents, mapped to RGB by one affine map per latent pixel
//! (C channels + 1 → 3), at latent resolution. The map is fitted when the
//! model loads, by least squares against real VAE decodes of the warm-up's
//! latents (each latent pixel against the mean colour of the f × f block it
//! decodes to), and kept for the process' life. A preview costs a few
//! multiply-adds per latent pixel and a PNG of (width/f × height/f): no
//! VAE call.

use candle_core::{DType, Device, Tensor};
use faer::prelude::*;
use image::RgbImage;

use crate::error::{Error, Result};

/// RGB in [0, 1] = `weights` · (latent channels, 1).
#[derive(Clone, Debug, PartialEq)]
pub struct LatentRgb {
    /// Per output colour: one weight per latent channel, then the bias.
    pub weights: [Vec<f32>; 3],
}

impl LatentRgb {
    /// Fit on pairs of latents `[1, C, h, w]` and their decodes (`h·f × w·f`).
    pub fn fit(pairs: &[(Tensor, RgbImage)]) -> Result<Self> {
        let mut rows: Vec<Vec<f64>> = Vec::new();
        let mut targets: Vec<[f64; 3]> = Vec::new();
        for (latent, img) in pairs {
            let l = latent.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let (_, c, h, w) = l.dims4()?;
            let v = l.flatten_all()?.to_vec1::<f32>()?;
            let f = img.width() as usize / w.max(1);
            if f == 0 || img.height() as usize != h * f {
                return Err(Error::Internal(format!(
                    "preview fit: a {}x{} decode of a {w}x{h} latent",
                    img.width(),
                    img.height()
                )));
            }
            for y in 0..h {
                for x in 0..w {
                    let mut row: Vec<f64> = (0..c).map(|k| v[(k * h + y) * w + x] as f64).collect();
                    row.push(1.0);
                    rows.push(row);
                    let mut sum = [0.0f64; 3];
                    for dy in 0..f {
                        for dx in 0..f {
                            let p = img.get_pixel((x * f + dx) as u32, (y * f + dy) as u32);
                            for (s, &ch) in sum.iter_mut().zip(p.0.iter()) {
                                *s += ch as f64 / 255.0;
                            }
                        }
                    }
                    targets.push(sum.map(|s| s / (f * f) as f64));
                }
            }
        }
        let n = rows.first().map_or(0, Vec::len);
        if rows.len() < n * 4 || n == 0 {
            return Err(Error::Internal("preview fit: too few latent pixels".into()));
        }
        // Normal equations with a small ridge, solved by LU.
        let ata = Mat::<f64>::from_fn(n, n, |i, j| {
            rows.iter().map(|r| r[i] * r[j]).sum::<f64>() + if i == j { 1e-6 } else { 0.0 }
        });
        let atb = Mat::<f64>::from_fn(n, 3, |i, k| {
            rows.iter().zip(&targets).map(|(r, t)| r[i] * t[k]).sum()
        });
        let x = ata.partial_piv_lu().solve(&atb);
        let weights = [0, 1, 2].map(|k| (0..n).map(|i| x[(i, k)] as f32).collect::<Vec<_>>());
        if weights.iter().flatten().any(|w| !w.is_finite()) {
            return Err(Error::Internal("preview fit: not a finite map".into()));
        }
        Ok(Self { weights })
    }

    /// The preview of latents `[1, C, h, w]`: an `w × h` RGB image.
    pub fn render(&self, latent: &Tensor) -> Result<RgbImage> {
        let l = latent.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let (_, c, h, w) = l.dims4()?;
        if self.weights[0].len() != c + 1 {
            return Err(Error::Internal(format!(
                "preview: a map for {} channels given {c}",
                self.weights[0].len() - 1
            )));
        }
        let v = l.flatten_all()?.to_vec1::<f32>()?;
        let mut img = RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let px = self.weights.each_ref().map(|wk| {
                    let s: f32 =
                        (0..c).map(|k| wk[k] * v[(k * h + y) * w + x]).sum::<f32>() + wk[c];
                    (s.clamp(0.0, 1.0) * 255.0).round() as u8
                });
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        Ok(img)
    }

    /// [`Self::render`] as PNG bytes.
    pub fn png(&self, latent: &Tensor) -> Result<Vec<u8>> {
        let img = self.render(latent)?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| Error::Internal(format!("preview PNG: {e}")))?;
        Ok(out.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exactly_affine_decoder_is_recovered() {
        // A "decoder" that is affine per latent pixel, upsampled 2x.
        let (c, h, w) = (4usize, 6usize, 5usize);
        let truth = [
            vec![0.2f32, -0.1, 0.05, 0.0, 0.5],
            vec![0.0, 0.3, -0.2, 0.1, 0.4],
            vec![-0.1, 0.0, 0.1, 0.25, 0.6],
        ];
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let data: Vec<f32> = (0..c * h * w)
            .map(|_| rng.random_range(-0.4f32..0.4))
            .collect();
        let latent = Tensor::from_vec(data, (1, c, h, w), &Device::Cpu).unwrap();
        let exact = LatentRgb {
            weights: truth.clone(),
        };
        let small = exact.render(&latent).unwrap();
        let big = image::imageops::resize(
            &small,
            (w * 2) as u32,
            (h * 2) as u32,
            image::imageops::FilterType::Nearest,
        );
        let fitted = LatentRgb::fit(&[(latent.clone(), big)]).unwrap();
        for (a, b) in fitted.weights.iter().flatten().zip(truth.iter().flatten()) {
            assert!((a - b).abs() < 0.02, "{:?} vs {truth:?}", fitted.weights);
        }
        let again = fitted.render(&latent).unwrap();
        let d = again
            .pixels()
            .zip(small.pixels())
            .flat_map(|(p, q)| p.0.iter().zip(q.0.iter()).map(|(a, b)| a.abs_diff(*b)))
            .max()
            .unwrap();
        assert!(d <= 2, "rendered preview differs by {d}/255");
    }
}
