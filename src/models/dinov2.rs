//! DINOv2 vision transformer, written against transformers' `Dinov2Model`
//! and `Dinov2WithRegistersModel` (tensors in, tensors out). Checkpoint keys
//! are spelled out where the weights are read:
//!
//! ```text
//! embeddings.{cls_token, mask_token, position_embeddings, register_tokens}
//! embeddings.patch_embeddings.projection.{weight, bias}
//! encoder.layer.N.{norm1, norm2}.{weight, bias}
//! encoder.layer.N.attention.attention.{query, key, value}.{weight, bias}
//! encoder.layer.N.attention.output.dense.{weight, bias}
//! encoder.layer.N.layer_scale{1,2}.lambda1
//! encoder.layer.N.mlp.{fc1, fc2}.{weight, bias}            (MLP)
//! encoder.layer.N.mlp.{weights_in, weights_out}.{weight, bias}  (SwiGLU, ViT-g)
//! layernorm.{weight, bias}
//! ```
//!
//! The names transformers 5 uses in memory (`attention.q_proj`, `mlp.gate_proj`, …)
//! are accepted too.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model_folder::{ModelSource, Weights};
use crate::models::attention;
use crate::models::interpolate::{resize_bicubic, Bicubic};
use crate::models::nn::{linear, Activation, Linear};

/// `encoder/config.json`, as transformers' `Dinov2Config` /
/// `Dinov2WithRegistersConfig` writes it. Defaults are transformers'.
#[derive(Clone, Debug, Deserialize)]
pub struct Dinov2Config {
    #[serde(default = "d_model_type")]
    pub model_type: String,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// Only `Dinov2WithRegistersConfig` has it (default 4 there).
    #[serde(default)]
    pub num_register_tokens: Option<usize>,
}

fn d_model_type() -> String {
    "dinov2".into()
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-6
}
fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    14
}
fn d_channels() -> usize {
    3
}
fn d_true() -> bool {
    true
}

impl Dinov2Config {
    /// The registers variant: its own position-embedding kernel and R extra tokens.
    pub fn has_registers(&self) -> bool {
        self.model_type == "dinov2_with_registers"
    }

    pub fn register_tokens(&self) -> usize {
        if self.has_registers() {
            self.num_register_tokens.unwrap_or(4)
        } else {
            0
        }
    }

    /// Side of the square patch grid the position embeddings were trained on.
    pub fn position_grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn mlp_hidden(&self) -> usize {
        let h = (self.hidden_size as f64 * self.mlp_ratio) as usize;
        if self.use_swiglu_ffn {
            ((h as f64 * 2.0 / 3.0) as usize).div_ceil(8) * 8
        } else {
            h
        }
    }

    pub const FILE: &'static str = "encoder/config.json";

    /// Read and check `encoder/config.json` of a model folder.
    pub fn read(src: &ModelSource) -> Result<Self> {
        let cfg: Dinov2Config = src.read_json(Self::FILE)?;
        cfg.validate(&src.path(Self::FILE))?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let bad = |m: String| Err(Error::model_file(file, format!("bad config: {m}")));
        if !matches!(self.model_type.as_str(), "dinov2" | "dinov2_with_registers") {
            return bad(format!(
                "model_type `{}` is not dinov2 or dinov2_with_registers",
                self.model_type
            ));
        }
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return bad(format!(
                "patch_size {} must be positive and at most image_size {}",
                self.patch_size, self.image_size
            ));
        }
        if self.num_channels != 3 {
            return bad(format!(
                "num_channels is {}, lumen feeds RGB (3)",
                self.num_channels
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) {
            return bad(format!("mlp_ratio {} must be positive", self.mlp_ratio));
        }
        Activation::parse(&self.hidden_act).map_err(|m| Error::model_file(file, m))?;
        Ok(())
    }
}

enum Mlp {
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    SwiGlu {
        gate_up: Linear,
        down: Linear,
        hidden: usize,
    },
}

impl Mlp {
    fn load(w: &Weights, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let h = cfg.mlp_hidden();
        if cfg.use_swiglu_ffn {
            // Checkpoints store gate and up stacked in `weights_in` [2h, d].
            let (gate_up, down) = if w.contains("weights_in.weight") {
                (
                    linear(&w.pp("weights_in"), d, 2 * h, true)?,
                    linear(&w.pp("weights_out"), h, d, true)?,
                )
            } else {
                let gate = linear(&w.pp("gate_proj"), d, h, true)?;
                let up = linear(&w.pp("up_proj"), d, h, true)?;
                (
                    Linear::stack(&[gate, up])?,
                    linear(&w.pp("down_proj"), h, d, true)?,
                )
            };
            Ok(Mlp::SwiGlu {
                gate_up,
                down,
                hidden: h,
            })
        } else {
            Ok(Mlp::Plain {
                fc1: linear(&w.pp("fc1"), d, h, true)?,
                fc2: linear(&w.pp("fc2"), h, d, true)?,
                act: Activation::parse(&cfg.hidden_act).map_err(Error::Internal)?,
            })
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&act.apply(&fc1.forward(x)?)?),
            Mlp::SwiGlu {
                gate_up,
                down,
                hidden,
            } => {
                let gu = gate_up.forward(x)?;
                let last = gu.rank() - 1;
                let gate = gu.narrow(last, 0, *hidden)?;
                let up = gu.narrow(last, *hidden, *hidden)?;
                down.forward(&(gate.silu()? * up)?)
            }
        }
    }
}

struct Layer {
    norm1: LayerNorm,
    qkv: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    scale2: Tensor,
    heads: usize,
}

impl Layer {
    fn load(w: &Weights, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let att = w.pp("attention");
        let (q, k, v, out) = if att.contains("attention.query.weight") {
            let sa = att.pp("attention");
            (
                linear(&sa.pp("query"), d, d, cfg.qkv_bias)?,
                linear(&sa.pp("key"), d, d, cfg.qkv_bias)?,
                linear(&sa.pp("value"), d, d, cfg.qkv_bias)?,
                linear(&att.pp("output").pp("dense"), d, d, true)?,
            )
        } else {
            (
                linear(&att.pp("q_proj"), d, d, cfg.qkv_bias)?,
                linear(&att.pp("k_proj"), d, d, cfg.qkv_bias)?,
                linear(&att.pp("v_proj"), d, d, cfg.qkv_bias)?,
                linear(&att.pp("o_proj"), d, d, true)?,
            )
        };
        Ok(Layer {
            norm1: w.pp("norm1").layer_norm(d, eps)?,
            qkv: Linear::stack(&[q, k, v])?,
            out,
            scale1: w.pp("layer_scale1").get(d, "lambda1")?,
            norm2: w.pp("norm2").layer_norm(d, eps)?,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
            scale2: w.pp("layer_scale2").get(d, "lambda1")?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let h = self.norm1.forward(x)?;
        let qkv = self.qkv.forward(&h)?; // [B, N, 3D]
        let q = attention::split_heads(&qkv.narrow(2, 0, d)?, self.heads)?;
        let k = attention::split_heads(&qkv.narrow(2, d, d)?, self.heads)?;
        let v = attention::split_heads(&qkv.narrow(2, 2 * d, d)?, self.heads)?;
        let dh = d / self.heads;
        let a = attention::sdpa(&q, &k, &v, 1.0 / (dh as f64).sqrt())?;
        let a = self.out.forward(&attention::merge_heads(&a)?)?;
        let x = (x + a.broadcast_mul(&self.scale1)?)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?)?;
        let x = (x + h.broadcast_mul(&self.scale2)?)?;
        debug_assert_eq!(x.dims3()?, (b, n, d));
        Ok(x)
    }
}

/// A loaded DINOv2 encoder.
pub struct Dinov2 {
    cfg: Dinov2Config,
    /// Patch projection as a matrix `[D, C·p·p]` (the conv kernel flattened).
    patch_w: Tensor,
    patch_b: Tensor,
    cls_token: Tensor,
    registers: Option<Tensor>,
    pos_cls: Tensor,
    /// Patch position embeddings on the host, channel-first `[D, S, S]`, for resampling.
    pos_patch: Vec<f32>,
    pos_cache: Mutex<HashMap<(usize, usize), Tensor>>,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    device: Device,
}

impl Dinov2 {
    /// Load `encoder/config.json` + `encoder/model.safetensors` from a model folder.
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = Dinov2Config::read(src)?;
        let w = src.weights("encoder", "model", dtype, device)?;
        Self::from_weights(cfg, &w)
    }

    pub fn from_weights(cfg: Dinov2Config, w: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let c = cfg.num_channels;
        let s = cfg.position_grid();
        let emb = w.pp("embeddings");
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_w = proj.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?;
        let patch_b = proj.get(d, "bias")?;
        let cls_token = emb.get((1, 1, d), "cls_token")?;
        let registers = match cfg.register_tokens() {
            0 => None,
            r => Some(emb.get((1, r, d), "register_tokens")?),
        };
        let pos = emb.get((1, s * s + 1, d), "position_embeddings")?;
        let pos_cls = pos.narrow(1, 0, 1)?;
        let pos_patch = pos
            .narrow(1, 1, s * s)?
            .squeeze(0)?
            .t()?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let layernorm = w.pp("layernorm").layer_norm(d, cfg.layer_norm_eps)?;
        Ok(Self {
            patch_w,
            patch_b,
            cls_token,
            registers,
            pos_cls,
            pos_patch,
            pos_cache: Mutex::new(HashMap::new()),
            layers,
            layernorm,
            device: w.device().clone(),
            cfg,
        })
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.patch_w.dtype()
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn patch_size(&self) -> usize {
        self.cfg.patch_size
    }

    /// Position embeddings for a `gh × gw` patch grid `[1, 1 + gh·gw, D]`,
    /// as `interpolate_pos_encoding` computes them (resampled in f32).
    fn position_embeddings(&self, gh: usize, gw: usize, square_input: bool) -> Result<Tensor> {
        let s = self.cfg.position_grid();
        let d = self.cfg.hidden_size;
        // transformers returns the table untouched only for the trained grid
        // on a square input; otherwise it always resamples.
        let key = if gh == s && gw == s && square_input {
            (0, 0)
        } else {
            (gh, gw)
        };
        let mut cache = self
            .pos_cache
            .lock()
            .map_err(|_| Error::Internal("poisoned cache".into()))?;
        if let Some(t) = cache.get(&key) {
            return Ok(t.clone());
        }
        let patch = if key == (0, 0) {
            self.pos_patch.clone()
        } else {
            let kernel = if self.cfg.has_registers() {
                Bicubic::Antialias
            } else {
                Bicubic::Plain
            };
            resize_bicubic(&self.pos_patch, d, (s, s), (gh, gw), kernel)
        };
        let patch = Tensor::from_vec(patch, (d, gh * gw), &Device::Cpu)?
            .t()?
            .to_device(&self.device)?
            .to_dtype(self.dtype())?
            .unsqueeze(0)?;
        let t = Tensor::cat(&[&self.pos_cls, &patch], 1)?.contiguous()?;
        if cache.len() < 64 {
            cache.insert(key, t.clone());
        }
        Ok(t)
    }

    /// The patch grid `(rows, cols)` an input of `height × width` pixels yields.
    pub fn grid(&self, height: usize, width: usize) -> (usize, usize) {
        (height / self.cfg.patch_size, width / self.cfg.patch_size)
    }

    /// Run the encoder on normalized pixels `[B, 3, H, W]` and return the last
    /// hidden state after the final layernorm, `[B, 1 + R + h·w, D]`
    /// (CLS, registers, patches), like `Dinov2Model(...).last_hidden_state`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let d = self.cfg.hidden_size;
        let (gh, gw) = self.grid(height, width);
        if gh == 0 || gw == 0 || c != self.cfg.num_channels {
            return Err(Error::Internal(format!(
                "encoder input [{b}, {c}, {height}, {width}] does not fit patch size {p}"
            )));
        }
        // Conv2d(kernel = stride = p) as a matmul over flattened patches; like
        // the conv, trailing pixels that do not fill a patch are ignored.
        let x = pixels
            .to_dtype(self.dtype())?
            .narrow(2, 0, gh * p)?
            .narrow(3, 0, gw * p)?
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let x = x.matmul(&self.patch_w.t()?)?.broadcast_add(&self.patch_b)?;
        let x = x.reshape((b, gh * gw, d))?;
        let cls = self.cls_token.expand((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let x = x.broadcast_add(&self.position_embeddings(gh, gw, height == width)?)?;
        let mut x = match &self.registers {
            Some(r) => {
                let r = r.expand((b, r.dim(1)?, d))?;
                Tensor::cat(&[&x.narrow(1, 0, 1)?, &r, &x.narrow(1, 1, gh * gw)?], 1)?
            }
            None => x,
        };
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.layernorm.forward(&x)?)
    }

    /// Patch tokens only (CLS and registers dropped): `[B, h·w, D]`.
    pub fn patch_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let hidden = self.forward(pixels)?;
        let skip = 1 + self.cfg.register_tokens();
        let n = hidden.dim(1)? - skip;
        Ok(hidden.narrow(1, skip, n)?)
    }
}
