//! GroupNorm, optionally fused with the SiLU that follows it in every
//! ResNet block, for f32 NCHW tensors on the CPU: one task per (image,
//! group) computes the group's mean and variance (f64 sums) and writes the
//! normalized, scaled and shifted values (and their SiLU) in one pass,
//! where candle composes about ten whole-tensor operations.

use rayon::prelude::*;

use super::cpu_attention::exp_neg;

/// `x` [batch, channels, pixels] contiguous; `gamma`, `beta` [channels].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_f32(
    x: &[f32],
    channels: usize,
    pixels: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<f32> {
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "{channels} channels in {groups} groups"
    );
    assert_eq!(gamma.len(), channels, "gamma size");
    assert_eq!(beta.len(), channels, "beta size");
    assert_eq!(x.len() % (channels * pixels).max(1), 0, "input size");
    let per_group = channels / groups;
    let span = per_group * pixels;
    let mut out = vec![0f32; x.len()];
    if x.is_empty() || span == 0 {
        return out;
    }
    // Spans of consecutive (image, group) pairs are contiguous in NCHW.
    out.par_chunks_mut(span)
        .zip(x.par_chunks(span))
        .enumerate()
        .for_each(|(i, (dst, src))| {
            let g = i % groups;
            let n = src.len() as f64;
            let mean = sum(src) / n;
            let m = mean as f32;
            let var = src.iter().map(|&v| ((v - m) as f64).powi(2)).sum::<f64>() / n;
            let rstd = (1.0 / (var + eps).sqrt()) as f32;
            for (c, (d, s)) in dst.chunks_mut(pixels).zip(src.chunks(pixels)).enumerate() {
                let ch = g * per_group + c;
                let scale = rstd * gamma[ch];
                let shift = beta[ch] - m * scale;
                if silu {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = silu_f32(v * scale + shift);
                    }
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
    out
}

/// Sum in f64 over 8 lanes (vectorizes; exact enough for any span here).
fn sum(v: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// x·σ(x), with σ from the branch-free e^{-|x|}.
#[inline(always)]
pub fn silu_f32(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let r = 1.0 / (1.0 + e);
    let s = if x >= 0.0 { r } else { e * r };
    x * s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        let (b, c, p, g) = (2, 6, 35, 3);
        let x: Vec<f32> = (0..b * c * p)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 / 10.0).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 / 3.0 - 1.0).collect();
        for silu in [false, true] {
            let got = group_norm_f32(&x, c, p, g, 1e-6, &gamma, &beta, silu);
            for bi in 0..b {
                for gi in 0..g {
                    let base = (bi * c + gi * (c / g)) * p;
                    let span = &x[base..base + (c / g) * p];
                    let mean = span.iter().map(|&v| v as f64).sum::<f64>() / span.len() as f64;
                    let var = span.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()
                        / span.len() as f64;
                    for (j, &v) in span.iter().enumerate() {
                        let ch = gi * (c / g) + j / p;
                        let mut y = (v as f64 - mean) / (var + 1e-6).sqrt() * gamma[ch] as f64
                            + beta[ch] as f64;
                        if silu {
                            y /= 1.0 + (-y).exp();
                        }
                        let e = (got[base + j] as f64 - y).abs();
                        assert!(
                            e < 1e-5 * (1.0 + y.abs()),
                            "silu {silu}: {} vs {y}",
                            got[base + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn silu_is_accurate_everywhere() {
        for i in -2000..=2000 {
            let x = i as f32 / 20.0;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let got = silu_f32(x) as f64;
            assert!(
                (got - want).abs() <= 2e-7 * (1.0 + want.abs()),
                "{x}: {got} vs {want}"
            );
        }
    }
}
