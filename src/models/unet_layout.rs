//! [`UNetLayout`]: the validated block layout that `UNet2DConditionModel`
//! and `ControlNetModel` configs share (block types and widths, heads,
//! transformer depth, norms, time embedding options), read from diffusers'
//! `config.json` with the one [`DiffusersConfig`] reader.

use serde_json::{json, Value};

use crate::error::Result;
use crate::model_folder::DiffusersConfig;

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
    /// Attention scores and softmax in f32 whatever the weights' dtype
    /// (diffusers' `upcast_attention`, set by SD2 configs).
    pub upcast_attention: bool,
}

impl UNetLayout {
    /// Parse the layout fields shared by UNet and ControlNet configs.
    pub fn from_config(r: &DiffusersConfig) -> Result<Self> {
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
        // diffusers: `num_attention_heads or attention_head_dim` (the latter
        // is the historical name of the head count in SD1.5 configs).
        let heads = match r.per_block("num_attention_heads", n, None)? {
            Some(h) => h,
            None => r
                .per_block("attention_head_dim", n, Some(8))?
                .ok_or_else(|| {
                    r.err("`num_attention_heads` and `attention_head_dim` are both null")
                })?,
        };
        let tlayers = r
            .per_block("transformer_layers_per_block", n, Some(1))?
            .ok_or_else(|| {
                r.err("`transformer_layers_per_block` must be an integer or a list, got null")
            })?;
        let mut blocks = Vec::with_capacity(n);
        for (i, kind) in down.iter().enumerate() {
            let cross = match kind.as_str() {
                "CrossAttnDownBlock2D" => Some(tlayers[i]),
                "DownBlock2D" => None,
                other => return Err(r.unsupported("down_block_types", format!("block `{other}`"))),
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
        let cross_attention_dim = match r.get("cross_attention_dim") {
            Some(Value::Array(_)) => {
                return Err(r.unsupported("cross_attention_dim", "per block (a list)"))
            }
            _ => r.usize_or("cross_attention_dim", 1280)?,
        };
        r.require("act_fn", &[json!("silu")])?;
        r.reject_true("only_cross_attention")?;
        r.reject_true("dual_cross_attention")?;
        r.require("resnet_time_scale_shift", &[json!("default")])?;
        for none_by_default in [
            "class_embed_type",
            "addition_embed_type",
            "encoder_hid_dim",
            "time_cond_proj_dim",
            "num_class_embeds",
        ] {
            r.require(none_by_default, &[Value::Null])?;
        }
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
            upcast_attention: r.bool_or("upcast_attention", false)?,
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
