//! Scaled dot-product attention that never materializes more than a bounded
//! slice of the score matrix. f32 on the CPU goes through the fused kernel of
//! [`super::cpu_attention`]; other devices and dtypes process the
//! (batch × heads) axis in chunks sized so that one chunk's `[chunk, Nq, Nk]`
//! scores stay under a budget.

use candle_core::{DType, Device, Result, Tensor};

use super::cpu_attention;
use super::nn::with_cpu_f32;

/// Upper bound on the bytes of one chunk of attention scores.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// softmax(q·kᵀ·scale)·v for `q` [B, H, Nq, d], `k`/`v` [B, H, Nk, d].
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attend(q, k, v, scale, false)
}

/// [`sdpa`] with a causal mask: query i attends to keys 0..=i.
pub fn sdpa_causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attend(q, k, v, scale, true)
}

fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
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
    let q = (q.reshape((bh, nq, d))? * scale)?;
    let k = k.reshape((bh, nk, d))?;
    let v = v.reshape((bh, nk, dv))?;
    let per_slice = nq * nk * q.dtype().size_in_bytes();
    let chunk = (SCORE_BUDGET_BYTES / per_slice.max(1)).clamp(1, bh);
    let mut outs = Vec::with_capacity(bh.div_ceil(chunk));
    for start in (0..bh).step_by(chunk) {
        let len = chunk.min(bh - start);
        let qc = q.narrow(0, start, len)?.contiguous()?;
        let kc = k.narrow(0, start, len)?.contiguous()?;
        let vc = v.narrow(0, start, len)?.contiguous()?;
        let scores = qc.matmul(&kc.t()?)?;
        let scores = if causal {
            scores.broadcast_add(&causal_mask(nq, nk, scores.dtype(), scores.device())?)?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&vc)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 0)?
    };
    out.reshape((b, h, nq, dv))
}

/// Additive mask `[nq, nk]`: 0 where key j ≤ query i, −∞ elsewhere.
fn causal_mask(nq: usize, nk: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..nq)
        .flat_map(|i| (0..nk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (nq, nk), device)?.to_dtype(dtype)
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
