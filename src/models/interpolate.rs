//! Bicubic resampling of small channel-first grids, bit-for-bit in the sense
//! of PyTorch's `nn.functional.interpolate(mode="bicubic", align_corners=False)`
//! (candle has no bicubic op). Used to fit DINOv2's position embeddings to any
//! patch grid, in f32, on the host.
//!
//! Two kernels exist because transformers uses both:
//! - [`Bicubic::Plain`]: `antialias=False` — Keys' cubic with A = -0.75, four
//!   taps, edge indices clamped (`Dinov2Model`).
//! - [`Bicubic::Antialias`]: `antialias=True` — the PIL-style separable filter
//!   with A = -0.5, support widened by the scale when shrinking, weights
//!   normalized (`Dinov2WithRegistersModel`).

/// Which of PyTorch's two bicubic kernels to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bicubic {
    Plain,
    Antialias,
}

/// Resample `input`, laid out as `[channels, in_h, in_w]`, to
/// `[channels, out_h, out_w]`.
pub fn resize_bicubic(
    input: &[f32],
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    kernel: Bicubic,
) -> Vec<f32> {
    assert_eq!(input.len(), channels * in_h * in_w, "bicubic input size");
    let wy = taps(in_h, out_h, kernel);
    let wx = taps(in_w, out_w, kernel);
    // Separable: rows first (along x), then columns (along y). The order of
    // the sums only changes results at the level of f32 rounding.
    let mut tmp = vec![0f32; channels * in_h * out_w];
    for c in 0..channels {
        for y in 0..in_h {
            let src = &input[(c * in_h + y) * in_w..][..in_w];
            let dst = &mut tmp[(c * in_h + y) * out_w..][..out_w];
            for (d, tap) in dst.iter_mut().zip(&wx) {
                *d = tap.apply(|i| src[i]);
            }
        }
    }
    let mut out = vec![0f32; channels * out_h * out_w];
    for c in 0..channels {
        let plane = &tmp[c * in_h * out_w..][..in_h * out_w];
        for (oy, tap) in wy.iter().enumerate() {
            let dst = &mut out[(c * out_h + oy) * out_w..][..out_w];
            for (ox, d) in dst.iter_mut().enumerate() {
                *d = tap.apply(|iy| plane[iy * out_w + ox]);
            }
        }
    }
    out
}

/// The source indices and weights that make one output sample.
struct Tap {
    idx: Vec<usize>,
    w: Vec<f32>,
}

impl Tap {
    fn apply(&self, get: impl Fn(usize) -> f32) -> f32 {
        self.idx
            .iter()
            .zip(&self.w)
            .map(|(&i, &w)| w * get(i))
            .sum()
    }
}

fn taps(input: usize, output: usize, kernel: Bicubic) -> Vec<Tap> {
    // PyTorch's area_pixel_compute_scale without align_corners and without an
    // explicit scale factor: in / out.
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| match kernel {
            Bicubic::Plain => plain_tap(input, scale, o),
            Bicubic::Antialias => aa_tap(input, scale, o),
        })
        .collect()
}

/// upsample_bicubic2d: source = scale * (o + 0.5) - 0.5 (not clamped for
/// cubic), four taps around floor(source), indices clamped to the edge.
fn plain_tap(input: usize, scale: f32, o: usize) -> Tap {
    const A: f32 = -0.75;
    let real = scale * (o as f32 + 0.5) - 0.5;
    let base = real.floor();
    let t = real - base;
    let base = base as i64;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let w = vec![cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
    let last = input as i64 - 1;
    let idx = (0..4)
        .map(|k| (base - 1 + k).clamp(0, last) as usize)
        .collect();
    Tap { idx, w }
}

/// The antialiasing kernel (_upsample_bicubic2d_aa): PIL's bicubic filter
/// (A = -0.5) with support 2·max(scale, 1), taps restricted to the image and
/// the weights normalized to sum to one.
fn aa_tap(input: usize, scale: f32, o: usize) -> Tap {
    const A: f32 = -0.5;
    let filter = |x: f32| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    };
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let center = scale * (o as f32 + 0.5);
    // C++ casts truncate toward zero.
    let xmin = ((center - support + 0.5) as i64).max(0) as usize;
    let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
    let mut w: Vec<f32> = (xmin..xmax)
        .map(|j| filter((j as f32 - center + 0.5) * invscale))
        .collect();
    let total: f32 = w.iter().sum();
    if total != 0.0 {
        w.iter_mut().for_each(|v| *v /= total);
    }
    Tap {
        idx: (xmin..xmax).collect(),
        w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let x: Vec<f32> = (0..2 * 5 * 7).map(|v| (v as f32).sin()).collect();
        for k in [Bicubic::Plain, Bicubic::Antialias] {
            let y = resize_bicubic(&x, 2, (5, 7), (5, 7), k);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-6, "{k:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn constant_stays_constant() {
        let x = vec![3.5f32; 6 * 6];
        for k in [Bicubic::Plain, Bicubic::Antialias] {
            for out in [(2, 9), (11, 4), (6, 6)] {
                let y = resize_bicubic(&x, 1, (6, 6), out, k);
                assert!(y.iter().all(|v| (v - 3.5).abs() < 1e-5), "{k:?} {out:?}");
            }
        }
    }
}
