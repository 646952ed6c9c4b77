//! Small building blocks shared by the models.

use candle_core::{DType, Module, Result, Storage, Tensor};

/// `nn.Linear` with its weight kept transposed (`[in, out]`, contiguous):
/// a row-major right-hand side runs markedly faster in candle's CPU gemm
/// than the strided transpose of the checkpoint's `[out, in]` layout.
#[derive(Clone, Debug)]
pub struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a checkpoint weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// Stack several linears that read the same input into one (outputs concatenated).
    pub fn stack(parts: &[Linear]) -> Result<Self> {
        let w: Vec<&Tensor> = parts.iter().map(|l| &l.weight_t).collect();
        let weight_t = Tensor::cat(&w, 1)?;
        let bias = if parts.iter().any(|l| l.bias.is_some()) {
            let b = parts
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.out_dim(), l.weight_t.dtype(), l.weight_t.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        Ok(Self { weight_t, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight_t.dims()[1]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight_t)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim();
        y.reshape(out_dims)
    }
}

/// The activations transformers configs name in `hidden_act`.
#[derive(Clone, Copy, Debug)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
    QuickGelu,
}

impl Activation {
    /// Parse a transformers `hidden_act` name.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            other => return Err(format!("bad config: unsupported hidden_act `{other}`")),
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `nn.Linear(in_dim, out_dim, bias)` from a checkpoint (`weight` [out, in],
/// optional `bias` [out]).
pub fn linear(
    w: &crate::model_folder::Weights,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> crate::Result<Linear> {
    let (weight, bias) = w.linear_parts(in_dim, out_dim, bias)?;
    Ok(Linear::new(weight, bias)?)
}

/// `nn.Linear(cin, cout, bias)` from `vb` (`weight` [cout, cin], `bias`).
pub fn linear_vb(
    vb: &candle_nn::VarBuilder,
    cin: usize,
    cout: usize,
    bias: bool,
) -> Result<Linear> {
    let w = vb.get((cout, cin), "weight")?;
    let b = if bias {
        Some(vb.get(cout, "bias")?)
    } else {
        None
    };
    Linear::new(w, b)
}

/// `nn.Conv2d` (`weight` [out, in/groups, kh, kw], optional `bias` [out]).
/// f32 on the CPU runs lumen's own kernel ([`super::cpu_conv`]); other
/// devices, dtypes and grouped convolutions use candle's.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: candle_nn::Conv2dConfig,
}

impl Conv2d {
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        config: candle_nn::Conv2dConfig,
    ) -> Result<Self> {
        Ok(Self {
            weight: weight.contiguous()?,
            bias: bias.map(|b| b.contiguous()).transpose()?,
            config,
        })
    }

    fn forward_cpu_f32(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, c_in, h, w) = x.dims4()?;
        let (c_out, wc_in, kh, kw) = self.weight.dims4()?;
        if wc_in != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the weight expects {wc_in}");
        }
        let c = &self.config;
        let shape = super::cpu_conv::ConvShape {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride: c.stride,
            padding: c.padding,
            dilation: c.dilation,
        };
        if !shape.is_valid() {
            candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a {h}×{w} input");
        }
        let x = x.contiguous()?;
        let out = match &self.bias {
            Some(b) => with_cpu_f32([&x, &self.weight, b], |[x, wt, b]| {
                super::cpu_conv::conv2d_f32(x, wt, Some(b), shape)
            })?,
            None => with_cpu_f32([&x, &self.weight], |[x, wt]| {
                super::cpu_conv::conv2d_f32(x, wt, None, shape)
            })?,
        };
        Tensor::from_vec(
            out,
            (batch, c_out, shape.out_h(), shape.out_w()),
            x.device(),
        )
    }
}

/// The most elements one candle convolution call may touch, in its im2col
/// buffer or its output. candle's CUDA kernels launch over `elements as u32`
/// (past 2^32 the index silently wraps), and a bound in bytes keeps the
/// transient im2col buffer, which candle materializes whole, at 1 GiB.
pub fn conv_call_elements(dtype: DType) -> usize {
    const BYTES: usize = 1 << 30;
    (BYTES / dtype.size_in_bytes()).min(i32::MAX as usize)
}

impl Conv2d {
    /// candle's convolution, split into calls of at most `limit` elements
    /// (see [`conv_call_elements`]): first by images, then by output rows,
    /// each row block reading the input rows it needs, zero-padded by hand
    /// where it meets the border. Every output element is the same dot
    /// product as in one call.
    pub fn forward_split(&self, x: &Tensor, limit: usize) -> Result<Tensor> {
        let c = &self.config;
        let (batch, c_in, h, w) = x.dims4()?;
        let (c_out, c_in_group, kh, kw) = self.weight.dims4()?;
        if c_in_group * c.groups != c_in {
            candle_core::bail!(
                "conv2d: input has {c_in} channels, the weight expects {}",
                c_in_group * c.groups
            );
        }
        let span =
            |size: usize, k: usize| (size + 2 * c.padding).checked_sub(c.dilation * (k - 1) + 1);
        let (Some(sh), Some(sw)) = (span(h, kh), span(w, kw)) else {
            candle_core::bail!("conv2d: a {kh}×{kw} kernel does not fit a {h}×{w} input");
        };
        let (out_h, out_w) = (sh / c.stride + 1, sw / c.stride + 1);
        // Elements of one output row of one image: its im2col columns or its
        // output, whichever is larger.
        let per_row = (out_w * c_in_group * kh * kw).max(c_out * out_w).max(1);
        let per_image = per_row * out_h;
        let limit = limit.max(1);
        let y = if batch * per_image <= limit {
            self.call(x, c.padding)?
        } else if per_image <= limit {
            let images = limit / per_image;
            let mut parts = Vec::with_capacity(batch.div_ceil(images));
            for start in (0..batch).step_by(images) {
                let len = images.min(batch - start);
                parts.push(self.call(&x.narrow(0, start, len)?, c.padding)?);
            }
            Tensor::cat(&parts, 0)?
        } else {
            let rows = (limit / per_row).max(1);
            let mut images = Vec::with_capacity(batch);
            for i in 0..batch {
                let image = x.narrow(0, i, 1)?;
                let mut parts = Vec::with_capacity(out_h.div_ceil(rows));
                for r0 in (0..out_h).step_by(rows) {
                    let n = rows.min(out_h - r0);
                    // Input rows [first, last] (in padded coordinates shifted
                    // back by the padding) that output rows r0..r0+n read.
                    let first = (r0 * c.stride) as isize - c.padding as isize;
                    let last = ((r0 + n - 1) * c.stride + c.dilation * (kh - 1)) as isize
                        - c.padding as isize;
                    let lo = first.max(0);
                    let hi = last.min(h as isize - 1);
                    let slice = if hi < lo {
                        // The block reads only padding.
                        let rows = (last - first + 1) as usize;
                        Tensor::zeros((1, c_in, rows, w + 2 * c.padding), x.dtype(), x.device())?
                    } else {
                        let top = (lo - first) as usize;
                        let bottom = (last - hi) as usize;
                        image
                            .narrow(2, lo as usize, (hi + 1 - lo) as usize)?
                            .pad_with_zeros(2, top, bottom)?
                            .pad_with_zeros(3, c.padding, c.padding)?
                    };
                    parts.push(self.call(&slice, 0)?);
                }
                images.push(Tensor::cat(&parts, 2)?);
            }
            Tensor::cat(&images, 0)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        }
    }

    fn call(&self, x: &Tensor, padding: usize) -> Result<Tensor> {
        let c = &self.config;
        x.contiguous()?
            .conv2d(&self.weight, padding, c.stride, c.dilation, c.groups)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        if x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && c.groups == 1
        {
            return self.forward_cpu_f32(x);
        }
        self.forward_split(x, conv_call_elements(x.dtype()))
    }
}

/// `nn.Conv2d(c_in, c_out, kernel, …)` from `vb` (`weight`, and `bias`).
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    config: candle_nn::Conv2dConfig,
    vb: candle_nn::VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((c_out, c_in / config.groups, kernel, kernel), "weight")?;
    let bias = vb.get(c_out, "bias")?;
    Conv2d::new(weight, Some(bias), config)
}

/// Borrow the host memory of contiguous f32 CPU tensors for the duration of `f`.
pub fn with_cpu_f32<R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("kernel input is not contiguous".into()))?;
        match &**storage {
            Storage::Cpu(cpu) => {
                let s: &[f32] = &cpu.as_slice::<f32>()?[start..end];
                // SAFETY: the storage guards in `guards` outlive every use of
                // the slices, which end when `f` returns below.
                *slot = unsafe { &*(s as *const [f32]) };
            }
            _ => candle_core::bail!("kernel input is not on the CPU"),
        }
    }
    let r = f(slices);
    drop(guards);
    Ok(r)
}

/// `nn.GroupNorm` (`weight`, `bias` [channels]); [`GroupNorm::forward_silu`]
/// fuses the SiLU that usually follows. f32 on the CPU runs
/// [`super::cpu_norm`]; everything else candle's composed GroupNorm.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.elem_count();
        let fallback =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight: weight.contiguous()?,
            bias: bias.contiguous()?,
            groups,
            eps,
            fallback,
        })
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let on_cpu_f32 =
            x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32;
        if !on_cpu_f32 || x.rank() < 2 {
            let y = self.fallback.forward(x)?;
            return if silu { y.silu() } else { Ok(y) };
        }
        let channels = x.dim(1)?;
        if channels != self.weight.elem_count() {
            candle_core::bail!(
                "group norm: {channels} channels, the weight has {}",
                self.weight.elem_count()
            );
        }
        let x = x.contiguous()?;
        let pixels = x.dims()[2..].iter().product();
        let out = with_cpu_f32([&x, &self.weight, &self.bias], |[xs, g, b]| {
            super::cpu_norm::group_norm_f32(xs, channels, pixels, self.groups, self.eps, g, b, silu)
        })?;
        Tensor::from_vec(out, x.shape(), x.device())
    }

    /// SiLU(GroupNorm(x)).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` from `vb` (`weight`, `bias`).
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: candle_nn::VarBuilder,
) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
    }
    GroupNorm::new(
        vb.get(channels, "weight")?,
        vb.get(channels, "bias")?,
        groups,
        eps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_tensors::{max_diff, random};
    use candle_nn::Conv2dConfig;

    /// Forced splits (by images, by row blocks down to one row, blocks that
    /// read only padding) give the unsplit convolution, for every stride,
    /// padding, dilation and grouping the models use and some they don't.
    #[test]
    fn split_convolutions_equal_one_call() {
        let cases = [
            // (batch, c_in, c_out, h, w, kernel, stride, padding, dilation, groups)
            (3, 4, 6, 9, 7, 3, 1, 1, 1, 1),
            (2, 4, 8, 10, 9, 3, 2, 1, 1, 1),
            (2, 6, 6, 8, 8, 3, 1, 2, 2, 3),
            (2, 3, 5, 7, 6, 1, 1, 0, 1, 1),
            (1, 2, 4, 6, 5, 4, 4, 0, 1, 1),
            (2, 2, 3, 4, 4, 3, 1, 4, 1, 1),
        ];
        for (i, &(b, cin, cout, h, w, k, stride, padding, dilation, groups)) in
            cases.iter().enumerate()
        {
            let config = Conv2dConfig {
                padding,
                stride,
                dilation,
                groups,
                ..Default::default()
            };
            let weight = random(&[cout, cin / groups, k, k], 2 * i as u64);
            let bias = random(&[cout], 2 * i as u64 + 1);
            let conv = Conv2d::new(weight, Some(bias), config).unwrap();
            let x = random(&[b, cin, h, w], 100 + i as u64);
            let whole = conv.forward_split(&x, usize::MAX).unwrap();
            if groups == 1 {
                let fused = conv.forward_cpu_f32(&x).unwrap();
                assert!(
                    max_diff(&whole, &fused) < 1e-5,
                    "case {i}: candle vs lumen kernel"
                );
            }
            for limit in [1, 7, 40, 200, 1000, 5000] {
                let split = conv.forward_split(&x, limit).unwrap();
                let d = max_diff(&whole, &split);
                assert!(d < 1e-5, "case {i}, limit {limit}: differs by {d}");
            }
        }
    }

    #[test]
    fn the_call_bound_is_below_both_index_limits() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let n = conv_call_elements(dtype);
            assert!(n <= i32::MAX as usize && n * dtype.size_in_bytes() <= 1 << 30);
        }
    }
}
