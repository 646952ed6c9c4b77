//! diffusers' `ControlNetModel` (`controlnet/`), built from candle-transformers'
//! UNet blocks. Its conditioning input is the neural layout (K PCA channels
//! zero-padded to `conditioning_channels`, at output resolution); its outputs
//! are residuals for the UNet's skip connections and mid block.
//!
//! Keys (diffusers):
//!
//! ```text
//! conv_in, time_embedding.linear_{1,2}
//! controlnet_cond_embedding.conv_in
//! controlnet_cond_embedding.blocks.N            (pairs: 3×3, then 3×3 stride 2)
//! controlnet_cond_embedding.conv_out
//! down_blocks.N.*, mid_block.*                  (as in the UNet)
//! controlnet_down_blocks.N                      (1×1 convs, one per skip connection)
//! controlnet_mid_block                          (1×1 conv)
//! ```

use super::nn::{conv2d, Conv2d};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use serde_json::json;

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::models::unet_blocks::DownPath;
use crate::models::unet_layout::UNetLayout;

/// Stack of convolutions turning the conditioning input into the first block's features.
struct CondEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl CondEmbedding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?.silu()?;
        for b in &self.blocks {
            x = b.forward(&x)?.silu()?;
        }
        self.conv_out.forward(&x)
    }
}

/// The ControlNet.
pub struct ControlNet {
    pub layout: UNetLayout,
    pub conditioning_channels: usize,
    /// Spatial downsampling of the conditioning embedding (2 per stride-2 conv).
    pub conditioning_factor: usize,
    down: DownPath,
    cond_embedding: CondEmbedding,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
}

impl ControlNet {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let r = src.diffusers_config("controlnet/config.json")?;
        let layout = UNetLayout::from_config(&r)?;
        r.require("controlnet_conditioning_channel_order", &[json!("rgb")])?;
        r.reject_true("global_pool_conditions")?;
        let conditioning_channels = r.usize_or("conditioning_channels", 3)?;
        let emb_channels =
            r.usizes_or("conditioning_embedding_out_channels", &[16, 32, 96, 256])?;
        if emb_channels.is_empty() {
            return Err(r.err("`conditioning_embedding_out_channels` is empty"));
        }
        let w = src.weights("controlnet", "diffusion_pytorch_model", dtype, device)?;
        let vb = w.vb().clone();
        let wrap = |e| w.wrap(e);
        let c0 = layout.blocks[0].out_channels;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };

        let ce = vb.pp("controlnet_cond_embedding");
        let mut blocks = Vec::new();
        for i in 0..emb_channels.len() - 1 {
            let (cin, cout) = (emb_channels[i], emb_channels[i + 1]);
            blocks.push(conv2d(cin, cin, 3, pad1, ce.pp("blocks").pp(2 * i)).map_err(wrap)?);
            let stride2 = Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            };
            blocks
                .push(conv2d(cin, cout, 3, stride2, ce.pp("blocks").pp(2 * i + 1)).map_err(wrap)?);
        }
        let cond_embedding = CondEmbedding {
            conv_in: conv2d(
                conditioning_channels,
                emb_channels[0],
                3,
                pad1,
                ce.pp("conv_in"),
            )
            .map_err(wrap)?,
            blocks,
            conv_out: conv2d(
                *emb_channels.last().expect("non-empty"),
                c0,
                3,
                pad1,
                ce.pp("conv_out"),
            )
            .map_err(wrap)?,
        };

        let down = DownPath::new(&vb, &layout).map_err(wrap)?;
        let n = layout.blocks.len();
        let one = Conv2dConfig::default();
        let cdb = vb.pp("controlnet_down_blocks");
        let mut controlnet_down_blocks = vec![conv2d(c0, c0, 1, one, cdb.pp(0)).map_err(wrap)?];
        for (i, b) in layout.blocks.iter().enumerate() {
            let skips = layout.layers_per_block + usize::from(i < n - 1);
            for _ in 0..skips {
                let idx = controlnet_down_blocks.len();
                controlnet_down_blocks.push(
                    conv2d(b.out_channels, b.out_channels, 1, one, cdb.pp(idx)).map_err(wrap)?,
                );
            }
        }
        let last = layout.blocks.last().expect("n > 0");
        let controlnet_mid_block = conv2d(
            last.out_channels,
            last.out_channels,
            1,
            one,
            vb.pp("controlnet_mid_block"),
        )
        .map_err(wrap)?;
        Ok(Self {
            conditioning_factor: 1 << (emb_channels.len() - 1),
            layout,
            conditioning_channels,
            down,
            cond_embedding,
            controlnet_down_blocks,
            controlnet_mid_block,
        })
    }

    /// Residuals for the UNet's skip connections and mid block, before the
    /// conditioning scale. `cond` is `[B, conditioning_channels, H, W]` at
    /// output resolution.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &[f64],
        text: &Tensor,
        cond: &Tensor,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let temb = self.down.time(timesteps, latents)?;
        let cond = self.cond_embedding.forward(cond)?;
        let x = (self.down.conv_in.forward(latents)? + cond)?;
        let (x, skips) = self.down.forward(x, &temb, text)?;
        if skips.len() != self.controlnet_down_blocks.len() {
            return Err(Error::Internal(format!(
                "controlnet produced {} skip connections for {} projections",
                skips.len(),
                self.controlnet_down_blocks.len()
            )));
        }
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| conv.forward(s))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = self.controlnet_mid_block.forward(&x)?;
        Ok((down, mid))
    }
}
