//! UNet2DConditionModel (`unet/`), configured from diffusers' `config.json`
//! (blocks in [`crate::models::unet_blocks`]), plus [`UNetLayout`], the
//! validated block layout that the UNet and the ControlNet share.
//!
//! Checkpoint keys are diffusers': `conv_in`, `time_embedding.linear_{1,2}`,
//! `down_blocks.N.{resnets,attentions,downsamplers}.*`, `mid_block.*`,
//! `up_blocks.N.*`, `conv_norm_out`, `conv_out`.

use candle_core::{DType, Device, Module, Tensor};
use serde_json::Value;

use crate::config::ModelSource;
use crate::error::{Error, Result};
use crate::models::unet_blocks::{DownPath, UpPath};

/// One down block (mirrored by its up block).
#[derive(Clone, Debug)]
pub struct BlockLayout {
    pub out_channels: usize,
    /// Transformer layers when the block has cross-attention.
    pub cross_attn_layers: Option<usize>,
    /// Attention heads (diffusers' `num_attention_heads`, or its historical
    /// alias `attention_head_dim` when that is unset).
    pub heads: usize,
}

/// The block layout and options common to `UNet2DConditionModel` and
/// `ControlNetModel` configs.
#[derive(Clone, Debug)]
pub struct UNetLayout {
    pub in_channels: usize,
    pub blocks: Vec<BlockLayout>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub center_input_sample: bool,
    /// Transformer layers of the mid block.
    pub mid_transformer_layers: usize,
}

/// Typed access to a diffusers config with errors naming file and field.
pub struct ConfigReader<'a> {
    pub value: &'a Value,
    pub file: &'a str,
}

impl ConfigReader<'_> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.value.get(name).filter(|v| !v.is_null())
    }

    pub fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::model_file(self.file, format!("bad config: {msg}"))
    }

    pub fn usize_or(&self, name: &str, default: usize) -> Result<usize> {
        match self.field(name) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(format!("`{name}` must be a non-negative integer, got {v}"))
            }),
        }
    }

    pub fn f64_or(&self, name: &str, default: f64) -> Result<f64> {
        match self.field(name) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{name}` must be a number, got {v}"))),
        }
    }

    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool> {
        match self.field(name) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{name}` must be true or false, got {v}"))),
        }
    }

    pub fn str_or<'s>(&'s self, name: &str, default: &'s str) -> Result<&'s str> {
        match self.field(name) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("`{name}` must be a string, got {v}"))),
        }
    }

    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        let v = self
            .field(name)
            .ok_or_else(|| self.err(format!("`{name}` is missing")))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .ok_or_else(|| self.err(format!("`{name}` must be a list of strings, got {v}")))
    }

    pub fn usizes(&self, name: &str) -> Result<Vec<usize>> {
        let v = self
            .field(name)
            .ok_or_else(|| self.err(format!("`{name}` is missing")))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
            .ok_or_else(|| self.err(format!("`{name}` must be a list of integers, got {v}")))
    }

    /// An int applying to every block, or a per-block list.
    pub fn per_block(
        &self,
        name: &str,
        n: usize,
        default: Option<usize>,
    ) -> Result<Option<Vec<usize>>> {
        match self.field(name) {
            None => Ok(default.map(|d| vec![d; n])),
            Some(Value::Number(x)) => {
                let x = x
                    .as_u64()
                    .ok_or_else(|| self.err(format!("`{name}` must be a positive integer")))?;
                Ok(Some(vec![x as usize; n]))
            }
            Some(Value::Array(_)) => {
                let v = self.usizes(name)?;
                if v.len() != n {
                    return Err(
                        self.err(format!("`{name}` has {} entries for {n} blocks", v.len()))
                    );
                }
                Ok(Some(v))
            }
            Some(v) => Err(self.err(format!("`{name}` must be an integer or a list, got {v}"))),
        }
    }

    /// Refuse an option lumen does not implement, unless it has its neutral value.
    pub fn require(&self, name: &str, neutral: &[Value]) -> Result<()> {
        match self.field(name) {
            None => Ok(()),
            Some(v) if neutral.contains(v) => Ok(()),
            Some(v) => Err(Error::model_file(
                self.file,
                format!("unsupported config: `{name}` = {v}"),
            )),
        }
    }
}

impl UNetLayout {
    /// Parse the layout fields shared by UNet and ControlNet configs.
    pub fn from_config(r: &ConfigReader) -> Result<Self> {
        use serde_json::json;
        let down = r.strings("down_block_types")?;
        let channels = r.usizes("block_out_channels")?;
        if down.is_empty() || down.len() != channels.len() {
            return Err(r.err(format!(
                "{} down_block_types for {} block_out_channels",
                down.len(),
                channels.len()
            )));
        }
        let n = down.len();
        let head_dim = r
            .per_block("attention_head_dim", n, Some(8))?
            .expect("default given");
        let heads = r
            .per_block("num_attention_heads", n, None)?
            .unwrap_or(head_dim);
        let tlayers = r
            .per_block("transformer_layers_per_block", n, Some(1))?
            .expect("default given");
        let mut blocks = Vec::with_capacity(n);
        for (i, kind) in down.iter().enumerate() {
            let cross = match kind.as_str() {
                "CrossAttnDownBlock2D" => Some(tlayers[i]),
                "DownBlock2D" => None,
                other => {
                    return Err(Error::model_file(
                        r.file,
                        format!("unsupported config: down block `{other}`"),
                    ))
                }
            };
            if heads[i] == 0 || !channels[i].is_multiple_of(heads[i]) {
                return Err(r.err(format!(
                    "block {i}: {} channels do not split into {} heads",
                    channels[i], heads[i]
                )));
            }
            blocks.push(BlockLayout {
                out_channels: channels[i],
                cross_attn_layers: cross,
                heads: heads[i],
            });
        }
        let groups = r.usize_or("norm_num_groups", 32)?;
        if groups == 0 || channels.iter().any(|c| !c.is_multiple_of(groups)) {
            return Err(r.err(format!(
                "block_out_channels {channels:?} do not split into {groups} groups"
            )));
        }
        let cross_attention_dim = match r.value.get("cross_attention_dim") {
            Some(Value::Array(_)) => {
                return Err(Error::model_file(
                    r.file,
                    "unsupported config: per-block `cross_attention_dim`",
                ))
            }
            _ => r.usize_or("cross_attention_dim", 1280)?,
        };
        r.require("act_fn", &[json!("silu")])?;
        r.require("only_cross_attention", &[json!(false)])?;
        r.require("dual_cross_attention", &[json!(false)])?;
        r.require("resnet_time_scale_shift", &[json!("default")])?;
        r.require("class_embed_type", &[])?;
        r.require("addition_embed_type", &[])?;
        r.require("encoder_hid_dim", &[])?;
        r.require("time_cond_proj_dim", &[])?;
        r.require("num_class_embeds", &[])?;
        r.require("time_embedding_type", &[json!("positional")])?;
        r.require("mid_block_type", &[json!("UNetMidBlock2DCrossAttn")])?;
        r.require("conv_in_kernel", &[json!(3)])?;
        r.require("conv_out_kernel", &[json!(3)])?;
        let mid_transformer_layers = *tlayers.last().expect("n > 0");
        Ok(Self {
            in_channels: r.usize_or("in_channels", 4)?,
            blocks,
            layers_per_block: r.usize_or("layers_per_block", 2)?,
            norm_num_groups: groups,
            norm_eps: r.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim,
            use_linear_projection: r.bool_or("use_linear_projection", false)?,
            flip_sin_to_cos: r.bool_or("flip_sin_to_cos", true)?,
            freq_shift: r.f64_or("freq_shift", 0.0)?,
            downsample_padding: r.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: r.f64_or("mid_block_scale_factor", 1.0)?,
            center_input_sample: r.bool_or("center_input_sample", false)?,
            mid_transformer_layers,
        })
    }

    /// Width of the time embedding (4 × the first block's channels).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.blocks[0].out_channels
    }

    /// Spatial downsampling of the UNet (2 per block but the last).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.blocks.len() - 1)
    }
}

/// The denoising UNet.
pub struct UNet {
    pub layout: UNetLayout,
    pub out_channels: usize,
    down: DownPath,
    up: UpPath,
}

impl UNet {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let file = "unet/config.json";
        let value: Value = src.read_json(file)?;
        let r = ConfigReader {
            value: &value,
            file,
        };
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
                return Err(Error::model_file(
                    file,
                    format!(
                        "unsupported config: up_block_types {up:?} do not mirror down_block_types"
                    ),
                ));
            }
        }
        r.require(
            "upcast_attention",
            &[serde_json::json!(false), serde_json::json!(true)],
        )?;
        if layout.center_input_sample {
            return Err(Error::model_file(
                file,
                "unsupported config: `center_input_sample` = true",
            ));
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

    /// Noise prediction for `latents` [B, C, h, w] at `timestep`, with the
    /// ControlNet's residuals added to the skip connections and mid block.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        text: &Tensor,
        down_residuals: Option<&[Tensor]>,
        mid_residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let temb = self.down.time(timestep, latents)?;
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
