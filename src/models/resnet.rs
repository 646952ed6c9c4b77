//! diffusers' `ResnetBlock2D` (UNet, ControlNet and VAE), built from lumen's
//! own convolution and fused GroupNorm + SiLU. Checkpoint keys: `norm1`,
//! `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::nn::{conv2d, group_norm, linear_vb, Conv2d, GroupNorm, Linear};

/// The block's sizes, as diffusers' constructor takes them.
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, `None` for the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv2d(
                c.in_channels,
                c.out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?,
            conv1: conv2d(c.in_channels, c.out_channels, 3, pad1, vb.pp("conv1"))?,
            time_emb_proj: c
                .temb_channels
                .map(|t| linear_vb(&vb.pp("time_emb_proj"), t, c.out_channels, true))
                .transpose()?,
            norm2: group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?,
            conv2: conv2d(c.out_channels, c.out_channels, 3, pad1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// `x` [B, C, H, W]; `temb` [1 or B, T] (the raw time embedding: SiLU is
    /// applied here, as diffusers does) when the block has a projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (temb, &self.time_emb_proj) {
            (Some(t), Some(proj)) => {
                let t = t.silu()?;
                let t = if t.dim(0)? > 1 && t.device().is_cpu() {
                    // Row by row on the CPU, each row as a batch of one
                    // would project it: the bits of a row do not depend on
                    // its neighbours (cuBLAS is not batch-invariant anyway).
                    let rows = (0..t.dim(0)?)
                        .map(|i| proj.forward(&t.narrow(0, i, 1)?))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&rows, 0)?
                } else {
                    proj.forward(&t)?
                };
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let y = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y / self.output_scale_factor
        }
    }
}
