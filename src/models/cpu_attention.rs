//! Fused scaled dot-product attention for f32 on the CPU.
//!
//! candle's composed path (matmul → softmax → matmul) writes the whole
//! `[heads, Nq, Nk]` score tensor to memory, and its softmax calls libm's
//! scalar `exp` per element; at DINOv2-L/518 that is most of a layer's time.
//! Here each task takes one head and a block of [`Q_BLOCK`] queries: the
//! block's scores (`Q_BLOCK × Nk`, cache-sized) are computed with `gemm`,
//! soft-maxed in place with a vectorizable `exp`, and multiplied by V at
//! once. Tasks run in parallel on rayon's pool; memory stays at one score
//! block per thread. Results agree with the composed path to f32 rounding.

use rayon::prelude::*;

/// Queries per task.
pub const Q_BLOCK: usize = 64;

/// softmax(q·kᵀ·scale)·v over `bh` independent heads, all row-major and
/// contiguous: `q` [bh, nq, d], `k` [bh, nk, d], `v` [bh, nk, dv]; returns
/// [bh, nq, dv]. With `causal`, query i sees keys 0..=i only.
#[allow(clippy::too_many_arguments)]
pub fn attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    assert_eq!(q.len(), bh * nq * d, "q size");
    assert_eq!(k.len(), bh * nk * d, "k size");
    assert_eq!(v.len(), bh * nk * dv, "v size");
    let mut out = vec![0f32; bh * nq * dv];
    let blocks_per_head = nq.div_ceil(Q_BLOCK);
    // One output chunk per (head, query block).
    let chunks: Vec<(usize, usize, &mut [f32])> = {
        let mut v = Vec::with_capacity(bh * blocks_per_head);
        let mut rest: &mut [f32] = &mut out;
        for h in 0..bh {
            for b in 0..blocks_per_head {
                let rows = Q_BLOCK.min(nq - b * Q_BLOCK);
                let (head, tail) = rest.split_at_mut(rows * dv);
                v.push((h, b * Q_BLOCK, head));
                rest = tail;
            }
        }
        v
    };
    chunks.into_par_iter().for_each_init(
        || vec![0f32; Q_BLOCK * nk],
        |scores, (h, row0, dst)| {
            let rows = dst.len() / dv;
            let qh = &q[(h * nq + row0) * d..][..rows * d];
            let kh = &k[h * nk * d..][..nk * d];
            let vh = &v[h * nk * dv..][..nk * dv];
            let s = &mut scores[..rows * nk];
            // SAFETY: all pointers address slices of the sizes gemm reads and
            // writes: s is rows×nk (row stride nk), qh rows×d (stride d),
            // kh read as its transpose d×nk (row stride 1, column stride d).
            unsafe {
                gemm::gemm(
                    rows,
                    nk,
                    d,
                    s.as_mut_ptr(),
                    1,
                    nk as isize,
                    false,
                    qh.as_ptr(),
                    1,
                    d as isize,
                    kh.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, row) in s.chunks_exact_mut(nk).enumerate() {
                if causal {
                    let visible = (row0 + r + 1).min(nk);
                    row[visible..].fill(f32::NEG_INFINITY);
                }
                softmax_in_place(row);
            }
            // SAFETY: dst is rows×dv (stride dv), s rows×nk, vh nk×dv.
            unsafe {
                gemm::gemm(
                    rows,
                    dv,
                    nk,
                    dst.as_mut_ptr(),
                    1,
                    dv as isize,
                    false,
                    s.as_ptr(),
                    1,
                    nk as isize,
                    vh.as_ptr(),
                    1,
                    dv as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    out
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { softmax_avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the enabled features.
            return unsafe { softmax_avx2(row) };
        }
    }
    softmax_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_avx512(row: &mut [f32]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let n = row.len();
    let full = n / L * L;
    let p = row.as_mut_ptr();
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
        i += L;
    }
    let mut max = _mm512_reduce_max_ps(vmax);
    for &x in &row[full..] {
        max = if x > max { x } else { max };
    }
    if !max.is_finite() {
        return softmax_generic(row);
    }
    // e^(x - max) = 2^n · e^r, as in exp_neg.
    let vm = _mm512_set1_ps(max);
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let round = _mm512_set1_ps(12_582_912.0);
    let round_bits = _mm512_set1_epi32(12_582_912f32.to_bits() as i32 - 127);
    let ln2_hi = _mm512_set1_ps(0.693_145_75);
    let ln2_lo = _mm512_set1_ps(1.428_606_8e-6);
    let lo = _mm512_set1_ps(-87.0);
    let c: [__m512; 8] = [
        _mm512_set1_ps(1.0 / 5040.0),
        _mm512_set1_ps(1.0 / 720.0),
        _mm512_set1_ps(1.0 / 120.0),
        _mm512_set1_ps(1.0 / 24.0),
        _mm512_set1_ps(1.0 / 6.0),
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(1.0),
    ];
    let mut vsum = _mm512_setzero_ps();
    let mut i = 0;
    while i < full {
        let x = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vm);
        let keep = _mm512_cmp_ps_mask(x, lo, _CMP_GT_OQ);
        let x = _mm512_max_ps(x, lo);
        let t = _mm512_fmadd_ps(x, log2e, round);
        let nf = _mm512_sub_ps(t, round);
        let r = _mm512_fnmadd_ps(nf, ln2_hi, x);
        let r = _mm512_fnmadd_ps(nf, ln2_lo, r);
        let mut poly = c[0];
        for ck in &c[1..] {
            poly = _mm512_fmadd_ps(poly, r, *ck);
        }
        let bits = _mm512_slli_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), round_bits), 23);
        let y = _mm512_maskz_mul_ps(keep, poly, _mm512_castsi512_ps(bits));
        _mm512_storeu_ps(p.add(i), y);
        vsum = _mm512_add_ps(vsum, y);
        i += L;
    }
    let mut sum = _mm512_reduce_add_ps(vsum);
    for x in &mut row[full..] {
        *x = exp_neg(*x - max);
        sum += *x;
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    let mut i = 0;
    while i < full {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        i += L;
    }
    let inv = 1.0 / sum;
    for x in &mut row[full..] {
        *x *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_generic(row)
}

/// Written so the compiler vectorizes every loop (lane-wise max, branch-free exp).
#[inline(always)]
fn softmax_generic(row: &mut [f32]) {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        let c: &[f32; L] = c.try_into().expect("exact chunk");
        for i in 0..L {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for l in lanes {
        max = if l > max { l } else { max };
    }
    if !max.is_finite() {
        // All -inf (fully masked) or NaN input: propagate like the reference.
        let n = row.len() as f32;
        row.iter_mut()
            .for_each(|x| *x = if max.is_nan() { f32::NAN } else { 1.0 / n });
        return;
    }
    for x in row.iter_mut() {
        *x = exp_neg(*x - max);
    }
    let mut sums = [0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        let c: &[f32; L] = c.try_into().expect("exact chunk");
        for i in 0..L {
            sums[i] += c[i];
        }
    }
    let sum: f32 = chunks.remainder().iter().sum::<f32>() + sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// e^x for x ≤ 0, branch-free, within ~2 ulp: x = n·ln2 + r with |r| ≤ ln2/2
/// (Cody–Waite split of ln2), a degree-7 Taylor polynomial for e^r, and 2^n
/// assembled in the exponent bits. Results below 2^-126 flush to zero.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = if x > -87.0 { x } else { -87.0 };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low mantissa bits of t.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let y = p * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x > -87.0 {
        y
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_neg(x) as f64;
            if want > 1e-30 {
                worst = worst.max(((got - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn matches_naive_attention() {
        let (bh, nq, nk, d, dv) = (3, 70, 131, 16, 8);
        let gen = |n: usize, s: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32
                        / (1u32 << 24) as f32)
                        * 4.0
                        - 2.0
                })
                .collect()
        };
        let (q, k, v) = (
            gen(bh * nq * d, 1),
            gen(bh * nk * d, 2),
            gen(bh * nk * dv, 3),
        );
        let scale = 0.25;
        let got = attention_f32(&q, &k, &v, bh, nq, nk, d, dv, scale, false);
        for h in 0..bh {
            for i in 0..nq {
                let s: Vec<f64> = (0..nk)
                    .map(|j| {
                        (0..d)
                            .map(|c| {
                                q[(h * nq + i) * d + c] as f64 * k[(h * nk + j) * d + c] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    let want: f64 = (0..nk)
                        .map(|j| e[j] / z * v[(h * nk + j) * dv + c] as f64)
                        .sum();
                    let g = got[(h * nq + i) * dv + c] as f64;
                    assert!((g - want).abs() < 1e-5, "h{h} i{i} c{c}: {g} vs {want}");
                }
            }
        }
    }
}
