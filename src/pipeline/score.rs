//! Fidelity score: how much of its guide's layout a synthesized image kept.
//!
//! The output is resized to the guide's encoder input (so both share one
//! patch grid), encoded by the same encoder and projected on the same PCA
//! basis; the score is the Pearson correlation between the guide's and the
//! output's layouts over every patch and every component of the basis
//! (Kmax, whatever K the image was made with). 1: the same layout up to
//! scale; 0: unrelated.
//!
//! Why this measure (shapes model, `lumen augment` outputs at K = 1, 2, 3, 8,
//! Spearman's rho against the colour mIoU of the carried-over masks: 0.88
//! over 576 outputs; against the alternatives, on 239 of them, 0.83 vs 0.63
//! for the first K, 0.63 for the per-patch cosine; README, "Augment a
//! labelled dataset"):
//! - over all Kmax components rather than the first K: the score then says
//!   how much of the guide's layout the image kept, so it is comparable
//!   across K (its mean rises with K as the IoU does) and one `--min-score`
//!   means the same for every K; over the first K it falls with K instead
//!   (more components to agree on) while the IoU rises;
//! - correlation rather than the mean per-patch cosine: with few components
//!   a per-patch cosine is mostly the sign agreement of a few numbers, and
//!   patches near the basis' mean (short vectors) swing it at random; the
//!   correlation weighs each patch by how far it lies from the mean and
//!   ignores a global offset or scale of the output's features.

use image::RgbImage;

use crate::error::{Error, Result};
use crate::guide;
use crate::pipeline::layout::{Layout, LayoutModel, PreparedGuide};

/// `img` resized (Catmull-Rom, as guides are) to exactly the encoder input
/// of a layout with patch grid `grid`, and normalized.
pub fn prepare_on_grid(
    img: &RgbImage,
    grid: (usize, usize),
    patch: usize,
) -> Result<PreparedGuide> {
    let (rows, cols) = grid;
    let (w, h) = ((cols * patch) as u32, (rows * patch) as u32);
    if w == 0 || h == 0 {
        return Err(Error::Internal(format!(
            "score: empty layout grid {grid:?}"
        )));
    }
    let resized = if img.dimensions() == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, w, h, image::imageops::FilterType::CatmullRom)
    };
    Ok(PreparedGuide {
        pixels: guide::normalize(&resized)?,
        grid,
        source_size: img.dimensions(),
    })
}

/// The fidelity score of each image against `guide`'s layout (pass the
/// guide's Kmax layout; the images' layouts get as many components): the
/// Pearson correlation of the two layouts over all patches and components.
pub fn fidelity(model: &LayoutModel, guide: &Layout, images: &[RgbImage]) -> Result<Vec<f32>> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let patch = model.spec().patch_size;
    let prepared = images
        .iter()
        .map(|img| prepare_on_grid(img, guide.grid, patch))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<(&PreparedGuide, usize)> =
        prepared.iter().map(|p| (p, guide.components)).collect();
    let outputs = model.layouts(&refs)?;
    let g = guide.data.flatten_all()?.to_vec1::<f32>()?;
    outputs
        .iter()
        .map(|o| {
            if o.data.dims() != guide.data.dims() {
                return Err(Error::Internal(format!(
                    "score: layouts of shapes {:?} and {:?}",
                    guide.data.dims(),
                    o.data.dims()
                )));
            }
            Ok(pearson(&g, &o.data.flatten_all()?.to_vec1::<f32>()?))
        })
        .collect()
}

/// Pearson correlation of two equally long series; 0 when either is constant.
pub fn pearson(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n == 0 {
        return 0.0;
    }
    let mean = |v: &[f32]| v[..n].iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a[..n].iter().zip(&b[..n]) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        (sab / (saa * sbb).sqrt()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_is_scale_and_offset_free() {
        let a = [1.0, 2.0, 3.0, 5.0];
        let b: Vec<f32> = a.iter().map(|x| 3.0 * x - 7.0).collect();
        assert!((pearson(&a, &b) - 1.0).abs() < 1e-6);
        let c: Vec<f32> = a.iter().map(|x| -x).collect();
        assert!((pearson(&a, &c) + 1.0).abs() < 1e-6);
        assert_eq!(pearson(&a, &[2.0; 4]), 0.0);
        assert_eq!(pearson(&[], &[]), 0.0);
        // Uncorrelated by construction: symmetric around the mean.
        assert!(pearson(&[1.0, -1.0, 1.0, -1.0], &[1.0, 1.0, -1.0, -1.0]).abs() < 1e-6);
    }

    #[test]
    fn the_guide_itself_scores_one_and_noise_scores_low() {
        let src = crate::model_folder::ModelSource::from_arg(None);
        let model = LayoutModel::load(&src, &candle_core::Device::Cpu).unwrap();
        let guide_img = image::open(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/images/shapes-guide.png"),
        )
        .unwrap()
        .to_rgb8();
        let prepared = model.prepare(&guide_img, None).unwrap();
        let layout = model.layouts(&[(&prepared, 3)]).unwrap().pop().unwrap();
        let mut noise = RgbImage::new(64, 64);
        for (i, p) in noise.pixels_mut().enumerate() {
            let v = ((i as u64 * 2654435761) % 251) as u8;
            *p = image::Rgb([v, v.wrapping_mul(7), v.wrapping_mul(13)]);
        }
        let s = fidelity(&model, &layout, &[guide_img.clone(), noise]).unwrap();
        assert!((s[0] - 1.0).abs() < 1e-5, "{s:?}");
        assert!(s[1] < 0.5, "{s:?}");
        // A larger copy of the guide is resized back onto its grid.
        let big =
            image::imageops::resize(&guide_img, 128, 128, image::imageops::FilterType::Nearest);
        assert!(fidelity(&model, &layout, &[big]).unwrap()[0] > 0.9);
    }
}
