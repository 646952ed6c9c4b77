//! AutoencoderKL (`vae/`), decoder half, configured from diffusers'
//! `config.json`. lumen only decodes, so only `post_quant_conv.*` and
//! `decoder.*` are read. The downsampling factor is 2^(number of blocks − 1),
//! never assumed to be 8.
//!
//! Checkpoint keys (diffusers' `Decoder`):
//! ```text
//! post_quant_conv                          Conv2d 1×1 (if use_post_quant_conv)
//! decoder.conv_in                          Conv2d 3×3, latent → C[-1]
//! decoder.mid_block.resnets.{0,1}          ResnetBlock2D (no time embedding)
//! decoder.mid_block.attentions.0           group_norm, to_q/to_k/to_v/to_out.0
//!                                          (older files: query/key/value/proj_attn)
//! decoder.up_blocks.i.resnets.j            i over C reversed, j < layers_per_block + 1
//! decoder.up_blocks.i.upsamplers.0.conv    nearest ×2 then Conv2d 3×3 (all but the last block)
//! decoder.conv_norm_out, decoder.conv_out  GroupNorm + SiLU, Conv2d 3×3 → RGB
//! ```

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde_json::{json, Value};

use super::attention::sdpa;
use super::nn::{conv2d, group_norm, Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};

use crate::error::Result;
use crate::model_folder::{DiffusersConfig, ModelSource};

/// The checked contents of `vae/config.json`.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub in_channels: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    /// Decode in f32 when the rest runs in f16 or bf16 (diffusers'
    /// `force_upcast`, true by default: SD1.5's VAE overflows f16).
    pub force_upcast: bool,
}

impl VaeConfig {
    pub const FILE: &'static str = "vae/config.json";

    /// Read and check the config of a model folder's `vae/`.
    pub fn read(src: &ModelSource) -> Result<Self> {
        Self::from_config(&src.diffusers_config(Self::FILE)?)
    }

    pub fn from_config(r: &DiffusersConfig) -> Result<Self> {
        let channels = r.usizes("block_out_channels")?;
        if channels.is_empty() {
            return Err(r.err("`block_out_channels` is empty"));
        }
        for name in ["down_block_types", "up_block_types"] {
            if r.is_set(name) {
                let kinds = r.strings(name)?;
                let want = if name == "up_block_types" {
                    "UpDecoderBlock2D"
                } else {
                    "DownEncoderBlock2D"
                };
                if kinds.len() != channels.len() || kinds.iter().any(|k| k != want) {
                    return Err(r.unsupported(name, format!("= {kinds:?}")));
                }
            }
        }
        r.require("act_fn", &[json!("silu")])?;
        r.require("mid_block_add_attention", &[json!(true)])?;
        r.require("latents_mean", &[Value::Null])?;
        r.require("latents_std", &[Value::Null])?;
        let groups = r.usize_or("norm_num_groups", 32)?;
        if groups == 0 || channels.iter().any(|c| !c.is_multiple_of(groups)) {
            return Err(r.err(format!(
                "block_out_channels {channels:?} do not split into {groups} groups"
            )));
        }
        let out_channels = r.usize_or("out_channels", 3)?;
        if out_channels != 3 {
            return Err(r.unsupported("out_channels", format!("= {out_channels} (RGB only)")));
        }
        Ok(Self {
            block_out_channels: channels,
            layers_per_block: r.usize_or("layers_per_block", 1)?,
            in_channels: r.usize_or("in_channels", 3)?,
            latent_channels: r.usize_or("latent_channels", 4)?,
            norm_num_groups: groups,
            use_quant_conv: r.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: r.bool_or("use_post_quant_conv", true)?,
            scaling_factor: r.f64_or("scaling_factor", 0.18215)?,
            shift_factor: r.opt_f64("shift_factor")?.unwrap_or(0.0),
            force_upcast: r.bool_or("force_upcast", true)?,
        })
    }

    /// Spatial downsampling: 2 per block but the last.
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The VAE's single-head self-attention over all pixels (mid block).
#[derive(Clone, Debug)]
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        // Weights are [C, C], or [C, C, 1, 1] in files converted from convs.
        let lin = |name: &str| -> candle_core::Result<Linear> {
            let vb = vb.pp(name);
            let w = match vb.get((channels, channels), "weight") {
                Ok(w) => w,
                Err(_) => vb
                    .get((channels, channels, 1, 1), "weight")?
                    .reshape((channels, channels))?,
            };
            Linear::new(w, Some(vb.get(channels, "bias")?))
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: lin(q)?,
            to_k: lin(k)?,
            to_v: lin(v)?,
            to_out: lin(o)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let heads = |p: &Linear| p.forward(&t)?.unsqueeze(1);
        let a = sdpa(
            &heads(&self.to_q)?,
            &heads(&self.to_k)?,
            &heads(&self.to_v)?,
            1.0 / (c as f64).sqrt(),
        )?;
        let y = self.to_out.forward(&a.squeeze(1)?)?;
        y.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

/// diffusers' `Decoder` (see the module's key table).
#[derive(Clone, Debug)]
struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (ResnetBlock2D, AttentionBlock, ResnetBlock2D),
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> candle_core::Result<Self> {
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let groups = c.norm_num_groups;
        let top = *c.block_out_channels.last().expect("checked non-empty");
        let res = |vb: VarBuilder, cin: usize, cout: usize| {
            ResnetBlock2D::new(
                vb,
                ResnetConfig {
                    in_channels: cin,
                    out_channels: cout,
                    temb_channels: None,
                    groups,
                    eps: 1e-6,
                    output_scale_factor: 1.0,
                },
            )
        };
        let post_quant_conv = if c.use_post_quant_conv {
            let l = c.latent_channels;
            Some(conv2d(
                l,
                l,
                1,
                Conv2dConfig::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let m = d.pp("mid_block");
        let mid = (
            res(m.pp("resnets").pp(0), top, top)?,
            AttentionBlock::new(m.pp("attentions").pp(0), top, groups)?,
            res(m.pp("resnets").pp(1), top, top)?,
        );
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = top;
        for (i, &cout) in reversed.iter().enumerate() {
            let ub = d.pp("up_blocks").pp(i);
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    res(
                        ub.pp("resnets").pp(j),
                        if j == 0 { prev } else { cout },
                        cout,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(conv2d(
                    cout,
                    cout,
                    3,
                    pad1,
                    ub.pp("upsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
            prev = cout;
        }
        let c0 = c.block_out_channels[0];
        Ok(Self {
            post_quant_conv,
            conv_in: conv2d(c.latent_channels, top, 3, pad1, d.pp("conv_in"))?,
            mid,
            up_blocks,
            conv_norm_out: group_norm(groups, c0, 1e-6, d.pp("conv_norm_out"))?,
            conv_out: conv2d(c0, 3, 3, pad1, d.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        let x = self.conv_in.forward(&z)?;
        let x = self.mid.0.forward(&x, None)?;
        let x = self.mid.1.forward(&x)?;
        let mut x = self.mid.2.forward(&x, None)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(conv) = &block.upsampler {
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

pub struct Vae {
    decoder: Decoder,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub latent_channels: usize,
    pub factor: usize,
    /// The weights' (and the decode's) dtype.
    pub dtype: DType,
}

impl Vae {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let c = VaeConfig::read(src)?;
        let w = src.weights("vae", "diffusion_pytorch_model", dtype, device)?;
        let decoder = Decoder::new(w.vb().clone(), &c).map_err(|e| w.wrap(e))?;
        Ok(Self {
            decoder,
            scaling_factor: c.scaling_factor,
            shift_factor: c.shift_factor,
            latent_channels: c.latent_channels,
            factor: c.factor(),
            dtype,
        })
    }

    /// Decode denoised latents (any float dtype; converted to the VAE's)
    /// into images in [-1, 1]: `[B, 3, h·f, w·f]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(self.dtype)?;
        let z = ((z / self.scaling_factor)? + self.shift_factor)?;
        Ok(self.decoder.forward(&z)?)
    }
}
