//! Scaled dot-product attention that never materializes more than a bounded
//! slice of the score matrix. f32 on the CPU goes through the fused kernel of
//! [`super::cpu_attention`]; other devices and dtypes run candle's matmul and
//! softmax over chunks of the (batch × heads) axis, and over blocks of query
//! rows when one head alone is too large, so that no chunk's `[chunk, rows,
//! Nk]` scores pass [`SCORE_BUDGET_BYTES`] nor 2^31 elements (candle's CUDA
//! softmax indexes with a 32-bit `int`; past it the kernel faults and poisons
//! the CUDA context).

use candle_core::{DType, Device, Result, Tensor};

use super::cpu_attention;
use super::nn::with_cpu_f32;

/// Upper bound on the bytes of one chunk of attention scores.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// softmax(q·kᵀ·scale)·v for `q` [B, H, Nq, d], `k`/`v` [B, H, Nk, d].
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attend(q, k, v, scale, false, false)
}

/// [`sdpa`] with the scores and the softmax in f32 whatever the dtype of
/// the inputs when `upcast` (diffusers' `upcast_attention`: SD2's f16
/// scores overflow); the probabilities are cast back before they meet `v`.
pub fn sdpa_upcast(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    attend(q, k, v, scale, false, upcast)
}

/// [`sdpa`] with a causal mask: query i attends to keys 0..=i.
pub fn sdpa_causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attend(q, k, v, scale, true, false)
}

fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    upcast: bool,
) -> Result<Tensor> {
    let (b, h, nq, d) = q.dims4()?;
    let nk = k.dim(2)?;
    let dv = v.dim(3)?;
    let bh = b * h;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let out = with_cpu_f32([&q, &k, &v], |[qs, ks, vs]| {
            cpu_attention::attention_f32(qs, ks, vs, bh, nq, nk, d, dv, scale as f32, causal)
        })?;
        return Tensor::from_vec(out, (b, h, nq, dv), &Device::Cpu);
    }
    chunked(q, k, v, scale, causal, upcast, SCORE_BUDGET_BYTES)
}

/// The composed path, chunked so that one chunk's scores hold at most
/// `budget` bytes and at most `i32::MAX` elements.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    upcast: bool,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, nq, d) = q.dims4()?;
    let nk = k.dim(2)?;
    let dv = v.dim(3)?;
    let bh = b * h;
    let score_dtype = if upcast { DType::F32 } else { q.dtype() };
    let q = (q.reshape((bh, nq, d))?.to_dtype(score_dtype)? * scale)?;
    let k = k.reshape((bh, nk, d))?.to_dtype(score_dtype)?;
    let v = v.reshape((bh, nk, dv))?;
    let max_elements = (budget / score_dtype.size_in_bytes())
        .min(i32::MAX as usize)
        .max(1);
    let per_head = nq * nk.max(1);
    // Heads per chunk, and query rows per block when one head is too large.
    let (heads, rows) = if per_head <= max_elements {
        ((max_elements / per_head).clamp(1, bh), nq)
    } else {
        (1, (max_elements / nk.max(1)).clamp(1, nq))
    };
    let mut outs = Vec::with_capacity(bh.div_ceil(heads) * nq.div_ceil(rows));
    for start in (0..bh).step_by(heads) {
        let len = heads.min(bh - start);
        let kc = k.narrow(0, start, len)?.contiguous()?;
        let vc = v.narrow(0, start, len)?.contiguous()?;
        let mut blocks = Vec::with_capacity(nq.div_ceil(rows));
        for row in (0..nq).step_by(rows) {
            let n = rows.min(nq - row);
            let qc = q.narrow(0, start, len)?.narrow(1, row, n)?.contiguous()?;
            let scores = qc.matmul(&kc.t()?)?;
            let scores = if causal {
                scores.broadcast_add(&causal_mask(row, n, nk, scores.dtype(), scores.device())?)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vc.dtype())?;
            blocks.push(probs.matmul(&vc)?);
        }
        outs.push(if blocks.len() == 1 {
            blocks.pop().expect("one block")
        } else {
            Tensor::cat(&blocks, 1)?
        });
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 0)?
    };
    out.reshape((b, h, nq, dv))
}

/// Additive mask `[n, nk]` for query rows `first..first + n`: 0 where key
/// j ≤ query i, −∞ elsewhere.
fn causal_mask(first: usize, n: usize, nk: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (first..first + n)
        .flat_map(|i| (0..nk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, nk), device)?.to_dtype(dtype)
}

/// Split `[B, N, H·d]` into heads `[B, H, N, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?.transpose(1, 2)
}

/// Merge heads `[B, H, N, d]` back into `[B, N, H·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_tensors::{max_diff, random, values};

    /// Forced chunks over heads and over query rows (down to one row, with
    /// and without the causal mask) equal the fused kernel.
    #[test]
    fn chunks_and_query_blocks_equal_the_fused_kernel() {
        let (b, h, nq, nk, d) = (2, 3, 11, 11, 8);
        let q = random(&[b, h, nq, d], 1);
        let k = random(&[b, h, nk, d], 2);
        let v = random(&[b, h, nk, d], 3);
        for causal in [false, true] {
            let fused = attend(&q, &k, &v, 0.35, causal, false).unwrap();
            // Budgets (bytes of f32 scores): all heads, 2 heads, one head,
            // blocks of 3 query rows, one row at a time.
            for budget in [usize::MAX, 2 * nq * nk * 4, nq * nk * 4, 3 * nk * 4, 1] {
                let split = chunked(&q, &k, &v, 0.35, causal, false, budget).unwrap();
                let e = max_diff(&fused, &split);
                assert!(e < 1e-5, "causal {causal}, budget {budget}: {e}");
            }
        }
    }

    /// With `upcast`, scores that overflow f16 (here 80,000) stay finite
    /// and give the f32 result; without it they turn to NaN, as in torch.
    #[test]
    fn upcast_keeps_f16_scores_that_overflow_finite() {
        let (nq, d) = (4, 4);
        let big = random(&[1, 1, nq, d], 5)
            .abs()
            .and_then(|t| t.affine(50.0, 200.0))
            .unwrap();
        let v = random(&[1, 1, nq, d], 6);
        let reference = attend(&big, &big, &v, 0.5, false, false).unwrap();
        let h = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let upcast = sdpa_upcast(&h(&big), &h(&big), &h(&v), 0.5, true).unwrap();
        assert!(max_diff(&reference, &upcast) < 2e-3);
        let plain = sdpa(&h(&big), &h(&big), &h(&v), 0.5).unwrap();
        let plain = values(&plain);
        assert!(
            plain.iter().any(|x| !x.is_finite()),
            "f16 scores were expected to overflow"
        );
    }
}
