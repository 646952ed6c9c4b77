//! AutoencoderKL (`vae/`): candle-transformers' implementation configured from
//! diffusers' `config.json`. lumen only decodes; the encoder weights are
//! loaded because candle's model owns both halves. The downsampling factor is
//! 2^(number of blocks − 1), never assumed to be 8.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::{json, Value};

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
        })
    }

    /// Spatial downsampling: 2 per block but the last.
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

pub struct Vae {
    model: AutoEncoderKL,
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
        let cfg = AutoEncoderKLConfig {
            block_out_channels: c.block_out_channels.clone(),
            layers_per_block: c.layers_per_block,
            latent_channels: c.latent_channels,
            norm_num_groups: c.norm_num_groups,
            use_quant_conv: c.use_quant_conv,
            use_post_quant_conv: c.use_post_quant_conv,
        };
        let w = src.weights("vae", "diffusion_pytorch_model", dtype, device)?;
        let model =
            AutoEncoderKL::new(w.vb().clone(), c.in_channels, 3, cfg).map_err(|e| w.wrap(e))?;
        Ok(Self {
            model,
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
        Ok(self.model.decode(&z)?)
    }
}
