//! UNet2DConditionModel (`unet/`), configured from diffusers' `config.json`
//! (its block layout in [`crate::models::unet_layout`], its blocks in
//! [`crate::models::unet_blocks`]).
//!
//! Checkpoint keys are diffusers': `conv_in`, `time_embedding.linear_{1,2}`,
//! `down_blocks.N.{resnets,attentions,downsamplers}.*`, `mid_block.*`,
//! `up_blocks.N.*`, `conv_norm_out`, `conv_out`.

use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::models::unet_blocks::{DownPath, UpPath};
use crate::models::unet_layout::UNetLayout;

/// The denoising UNet.
pub struct UNet {
    pub layout: UNetLayout,
    pub out_channels: usize,
    down: DownPath,
    up: UpPath,
}

impl UNet {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let r = src.diffusers_config("unet/config.json")?;
        let layout = UNetLayout::from_config(&r)?;
        let up = r.strings("up_block_types")?;
        let n = layout.blocks.len();
        for (i, kind) in up.iter().enumerate() {
            let mirrored = &layout.blocks[n - 1 - i];
            let want = if mirrored.cross_attn_layers.is_some() {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            };
            if kind != want || up.len() != n {
                return Err(r.unsupported(
                    "up_block_types",
                    format!("{up:?}: they do not mirror down_block_types"),
                ));
            }
        }
        r.reject_true("mid_block_only_cross_attention")?;
        if layout.center_input_sample {
            return Err(r.unsupported("center_input_sample", "= true"));
        }
        let out_channels = r.usize_or("out_channels", 4)?;
        let w = src.weights("unet", "diffusion_pytorch_model", dtype, device)?;
        let down = DownPath::new(w.vb(), &layout).map_err(|e| w.wrap(e))?;
        let upp = UpPath::new(w.vb(), &layout, out_channels).map_err(|e| w.wrap(e))?;
        Ok(Self {
            layout,
            out_channels,
            down,
            up: upp,
        })
    }

    /// The time embedding `[1 or B, 4·C0]` of each row's timestep, in the
    /// dtype of `like` (the projection itself runs in f32).
    pub fn time_embedding(&self, timesteps: &[f64], like: &Tensor) -> Result<Tensor> {
        Ok(self.down.time(timesteps, like)?)
    }

    /// Noise prediction for `latents` [B, C, h, w] at `timestep`, with the
    /// ControlNet's residuals added to the skip connections and mid block.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &[f64],
        text: &Tensor,
        down_residuals: Option<&[Tensor]>,
        mid_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let temb = self.down.time(timesteps, latents)?;
        let x = self.down.conv_in.forward(latents)?;
        let (mut x, mut skips) = self.down.forward(x, &temb, text)?;
        if let Some(res) = down_residuals {
            if res.len() != skips.len() {
                return Err(Error::Internal(format!(
                    "{} controlnet residuals for {} skip connections",
                    res.len(),
                    skips.len()
                )));
            }
            skips = skips
                .iter()
                .zip(res)
                .map(|(s, r)| s + r)
                .collect::<candle_core::Result<_>>()?;
        }
        if let Some(m) = mid_residual {
            x = (x + m)?;
        }
        Ok(self.up.forward(x, skips, &temb, text)?)
    }
}
