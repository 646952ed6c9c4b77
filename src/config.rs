//! The model folder: where a model set's files come from (a directory on disk
//! or the tiny set embedded in the binary) and lumen's own settings
//! (`lumen.json`).
//!
//! Layout of a model folder (see `models/README.md`):
//!
//! ```text
//! encoder/config.json         transformers Dinov2Model / Dinov2WithRegistersModel config
//! encoder/model.safetensors   its weights (or sharded, with model.safetensors.index.json)
//! pca.safetensors             mean [D], components [Kmax, D], explained_variance [Kmax]
//! lumen.json                  optional: lumen's own settings
//! ```

use std::borrow::Cow;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::safetensors_io::SafetensorsFiles;

/// Default longer side of the image fed to the encoder (37 patches of 14).
pub const DEFAULT_LAYOUT_SIZE: u32 = 518;
/// Default cap on the pixels of a guide image, read from its header.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 40_000_000;

/// Where a model set's files live.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A model folder on disk.
    Dir(PathBuf),
    /// The tiny random-weight set from `models/tiny/`, compiled into the binary.
    Embedded,
}

impl ModelSource {
    /// `--models DIR` if given, else the embedded tiny model.
    pub fn from_arg(dir: Option<PathBuf>) -> Self {
        match dir {
            Some(d) => ModelSource::Dir(d),
            None => ModelSource::Embedded,
        }
    }

    /// A short, stable name for logs and image metadata.
    pub fn identity(&self) -> String {
        match self {
            ModelSource::Dir(d) => d.display().to_string(),
            ModelSource::Embedded => "embedded:models/tiny".to_string(),
        }
    }

    /// Whether the folder has this file (path relative to the folder root).
    pub fn has(&self, rel: &str) -> bool {
        match self {
            ModelSource::Dir(d) => d.join(rel).is_file(),
            ModelSource::Embedded => crate::embedded::file(rel).is_some(),
        }
    }

    /// The whole content of one file of the folder.
    pub fn read(&self, rel: &str) -> Result<Cow<'static, [u8]>> {
        match self {
            ModelSource::Dir(d) => {
                let path = d.join(rel);
                if !path.is_file() {
                    return Err(self.missing(rel));
                }
                std::fs::read(&path)
                    .map(Cow::Owned)
                    .map_err(|e| Error::model_file(self.display(rel), e))
            }
            ModelSource::Embedded => crate::embedded::file(rel)
                .map(Cow::Borrowed)
                .ok_or_else(|| self.missing(rel)),
        }
    }

    /// Parse a JSON file of the folder; errors name the file and the field.
    pub fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::model_file(self.display(rel), format!("bad config: {e}")))
    }

    /// Load every tensor of a small safetensors file (e.g. the PCA basis).
    pub fn load_tensors(
        &self,
        rel: &str,
        device: &Device,
    ) -> Result<std::collections::HashMap<String, Tensor>> {
        let bytes = self.read(rel)?;
        candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::model_file(self.display(rel), candle_message(&e)))
    }

    /// Open the weights of one component (`dir/model.safetensors`, or the shards
    /// listed in `dir/model.safetensors.index.json`), converted to `dtype`.
    pub fn weights(&self, dir: &str, stem: &str, dtype: DType, device: &Device) -> Result<Weights> {
        let single = format!("{dir}/{stem}.safetensors");
        let index = format!("{dir}/{stem}.safetensors.index.json");
        let file = self.display(&single);
        let vb = match self {
            ModelSource::Dir(d) => {
                let paths: Vec<PathBuf> = if d.join(&single).is_file() {
                    vec![d.join(&single)]
                } else if d.join(&index).is_file() {
                    let idx: ShardIndex = self.read_json(&index)?;
                    let mut shards: Vec<String> = idx.weight_map.into_values().collect();
                    shards.sort();
                    shards.dedup();
                    shards.iter().map(|s| d.join(dir).join(s)).collect()
                } else {
                    return Err(self.missing(&single));
                };
                for p in &paths {
                    if !p.is_file() {
                        return Err(Error::model_file(
                            p.display().to_string(),
                            "file is missing",
                        ));
                    }
                }
                let files = SafetensorsFiles::open(&paths)
                    .map_err(|e| Error::model_file(&file, candle_message(&e)))?;
                VarBuilder::from_backend(Box::new(files), dtype, device.clone())
            }
            ModelSource::Embedded => {
                let data = crate::embedded::file(&single).ok_or_else(|| self.missing(&single))?;
                VarBuilder::from_slice_safetensors(data, dtype, device)
                    .map_err(|e| Error::model_file(&file, candle_message(&e)))?
            }
        };
        Ok(Weights { vb, file })
    }

    fn display(&self, rel: &str) -> String {
        match self {
            ModelSource::Dir(d) => d.join(rel).display().to_string(),
            ModelSource::Embedded => format!("embedded:models/tiny/{rel}"),
        }
    }

    fn missing(&self, rel: &str) -> Error {
        Error::model_file(self.display(rel), "file is missing")
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// A view into one component's checkpoint. Paths mirror the checkpoint keys
/// (`w.pp("encoder").pp("layer").pp(3).get(...)`), and every failure names the
/// file and the full tensor key.
#[derive(Clone)]
pub struct Weights {
    vb: VarBuilder<'static>,
    file: String,
}

impl Weights {
    /// Descend into a sub-module (`encoder`, `layer`, `3`, …).
    pub fn pp(&self, name: impl ToString) -> Weights {
        Weights {
            vb: self.vb.pp(name),
            file: self.file.clone(),
        }
    }

    /// The tensor `name` under the current prefix, checked against `shape`.
    pub fn get(&self, shape: impl Into<candle_core::Shape>, name: &str) -> Result<Tensor> {
        self.vb
            .get(shape, name)
            .map_err(|e| Error::model_file(&self.file, candle_message(&e)))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The underlying candle `VarBuilder`, for candle's own building blocks.
    /// Errors from it should be mapped with [`Weights::wrap`].
    pub fn vb(&self) -> &VarBuilder<'static> {
        &self.vb
    }

    /// Attach this checkpoint's file name to a loading error.
    pub fn wrap(&self, e: candle_core::Error) -> Error {
        Error::model_file(&self.file, candle_message(&e))
    }

    /// `nn.Linear` as transformers and diffusers store it: `weight` [out, in], optional `bias` [out].
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<crate::models::nn::Linear> {
        let w = self.get((out_dim, in_dim), "weight")?;
        let b = if bias {
            Some(self.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(crate::models::nn::Linear::new(w, b)?)
    }

    /// `nn.LayerNorm(dim, eps)` with affine `weight` and `bias`.
    pub fn layer_norm(&self, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
        let w = self.get(dim, "weight")?;
        let b = self.get(dim, "bias")?;
        Ok(candle_nn::LayerNorm::new(w, b, eps))
    }
}

/// A candle error's message without backtrace noise.
pub fn candle_message(e: &candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().to_string()
}

/// lumen's own settings for a model folder (`lumen.json`). Every field is
/// optional; the defaults are documented in `models/README.md`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LumenSettings {
    /// Longer side, in pixels, of the image fed to the encoder.
    pub layout_size: u32,
    /// K used when a request does not choose one (clamped to the basis' Kmax).
    pub default_components: Option<usize>,
    /// Guide images with more pixels than this are refused (checked from the header).
    pub max_image_pixels: u64,
}

impl Default for LumenSettings {
    fn default() -> Self {
        Self {
            layout_size: DEFAULT_LAYOUT_SIZE,
            default_components: None,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

impl LumenSettings {
    pub const FILE: &'static str = "lumen.json";

    /// `lumen.json` if the folder has one, else the defaults.
    pub fn load(src: &ModelSource) -> Result<Self> {
        if src.has(Self::FILE) {
            src.read_json(Self::FILE)
        } else {
            Ok(Self::default())
        }
    }
}

/// Turn `--device cpu|cuda[:N]` into a candle device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::param("device", format!("`{spec}` is not cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(Error::param(
                "device",
                format!("`{spec}` is not cpu, cuda or cuda:N"),
            ))
        }
    };
    Device::new_cuda(ordinal).map_err(|e| {
        Error::param(
            "device",
            format!("cannot open {spec}: {}", candle_message(&e)),
        )
    })
}
