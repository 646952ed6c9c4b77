//! AutoencoderKL (`vae/`): candle-transformers' implementation configured from
//! diffusers' `config.json`. lumen only decodes; the encoder weights are
//! loaded because candle's model owns both halves. The downsampling factor is
//! 2^(number of blocks − 1), never assumed to be 8.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::{json, Value};

use crate::config::ModelSource;
use crate::error::Result;
use crate::models::unet::ConfigReader;

pub struct Vae {
    model: AutoEncoderKL,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub latent_channels: usize,
    pub factor: usize,
}

impl Vae {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let file = "vae/config.json";
        let value: Value = src.read_json(file)?;
        let r = ConfigReader {
            value: &value,
            file,
        };
        let channels = r.usizes("block_out_channels")?;
        if channels.is_empty() {
            return Err(r.err("`block_out_channels` is empty"));
        }
        for name in ["down_block_types", "up_block_types"] {
            if r.value.get(name).is_some() {
                let kinds = r.strings(name)?;
                let want = if name == "up_block_types" {
                    "UpDecoderBlock2D"
                } else {
                    "DownEncoderBlock2D"
                };
                if kinds.len() != channels.len() || kinds.iter().any(|k| k != want) {
                    return Err(crate::Error::model_file(
                        file,
                        format!("unsupported config: `{name}` = {kinds:?}"),
                    ));
                }
            }
        }
        r.require("act_fn", &[json!("silu")])?;
        r.require("mid_block_add_attention", &[json!(true)])?;
        r.require("latents_mean", &[])?;
        r.require("latents_std", &[])?;
        let groups = r.usize_or("norm_num_groups", 32)?;
        if groups == 0 || channels.iter().any(|c| !c.is_multiple_of(groups)) {
            return Err(r.err(format!(
                "block_out_channels {channels:?} do not split into {groups} groups"
            )));
        }
        let latent_channels = r.usize_or("latent_channels", 4)?;
        let cfg = AutoEncoderKLConfig {
            block_out_channels: channels.clone(),
            layers_per_block: r.usize_or("layers_per_block", 1)?,
            latent_channels,
            norm_num_groups: groups,
            use_quant_conv: r.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: r.bool_or("use_post_quant_conv", true)?,
        };
        let in_channels = r.usize_or("in_channels", 3)?;
        let out_channels = r.usize_or("out_channels", 3)?;
        if out_channels != 3 {
            return Err(crate::Error::model_file(
                file,
                format!("unsupported config: out_channels {out_channels} (RGB only)"),
            ));
        }
        let scaling_factor = r.f64_or("scaling_factor", 0.18215)?;
        let shift_factor = r.f64_or("shift_factor", 0.0)?;
        let w = src.weights("vae", "diffusion_pytorch_model", dtype, device)?;
        let model = AutoEncoderKL::new(w.vb().clone(), in_channels, out_channels, cfg)
            .map_err(|e| w.wrap(e))?;
        Ok(Self {
            model,
            scaling_factor,
            shift_factor,
            latent_channels,
            factor: 1 << (channels.len() - 1),
        })
    }

    /// Decode denoised latents into images in [-1, 1]: `[B, 3, h·f, w·f]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.scaling_factor)? + self.shift_factor)?;
        Ok(self.model.decode(&z)?)
    }
}
