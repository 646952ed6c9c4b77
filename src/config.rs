//! lumen's own configuration: a model folder's `lumen.json` settings and the
//! runtime choices every command shares (device, weight dtype). The pure
//! model code never reads any of it.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model_folder::{candle_message, ModelSource};

/// Default longer side of the image fed to the encoder (37 patches of 14).
pub const DEFAULT_LAYOUT_SIZE: u32 = 518;
/// Default cap on the pixels of a guide image, read from its header.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 40_000_000;

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
    /// Denoising steps when a request names none (default 30).
    pub default_steps: Option<usize>,
    /// Longer output side, in pixels, when a request names neither width nor
    /// height (default 512; rounded up to the model's size multiple).
    pub default_size: Option<u32>,
    /// Classifier-free guidance scale when a request names none (default 7.5).
    pub default_guidance_scale: Option<f64>,
    /// Weight of the ControlNet's residuals when a request names none (default 1).
    pub default_control_scale: Option<f64>,
    /// The output sides the model supports (the sizes it was trained at):
    /// requests for a side below `min_size` or above `max_size` are refused
    /// (default: any multiple of the size multiple up to the deployment's
    /// `--max-side`).
    pub min_size: Option<u32>,
    pub max_size: Option<u32>,
}

impl Default for LumenSettings {
    fn default() -> Self {
        Self {
            layout_size: DEFAULT_LAYOUT_SIZE,
            default_components: None,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            default_steps: None,
            default_size: None,
            default_guidance_scale: None,
            default_control_scale: None,
            min_size: None,
            max_size: None,
        }
    }
}

impl LumenSettings {
    pub const FILE: &'static str = "lumen.json";

    /// `lumen.json` if the folder has one, else the defaults; every value checked.
    pub fn load(src: &ModelSource) -> Result<Self> {
        let settings: Self = if src.has(Self::FILE) {
            src.read_json(Self::FILE)?
        } else {
            Self::default()
        };
        for (field, value) in [
            ("default_components", settings.default_components),
            ("default_steps", settings.default_steps),
            ("default_size", settings.default_size.map(|s| s as usize)),
            ("min_size", settings.min_size.map(|s| s as usize)),
            ("max_size", settings.max_size.map(|s| s as usize)),
        ] {
            if value == Some(0) {
                return Err(Error::model_file(
                    src.path(LumenSettings::FILE),
                    format!("{field} must be at least 1"),
                ));
            }
        }
        let (min, max) = (
            settings.min_size.unwrap_or(1),
            settings.max_size.unwrap_or(u32::MAX),
        );
        if min > max {
            return Err(Error::model_file(
                src.path(LumenSettings::FILE),
                format!("min_size {min} is above max_size {max}"),
            ));
        }
        if let Some(d) = settings.default_size.filter(|d| !(min..=max).contains(d)) {
            return Err(Error::model_file(
                src.path(LumenSettings::FILE),
                format!("default_size {d} is outside min_size..=max_size ({min}..={max})"),
            ));
        }
        for (field, value) in [
            ("default_guidance_scale", settings.default_guidance_scale),
            ("default_control_scale", settings.default_control_scale),
        ] {
            if let Some(g) = value.filter(|g| !g.is_finite() || g.abs() > MAX_ABS_SCALE) {
                return Err(Error::model_file(
                    src.path(LumenSettings::FILE),
                    format!("{field} {g} is not a finite number within ±{MAX_ABS_SCALE}"),
                ));
            }
        }
        Ok(settings)
    }
}

/// The largest |guidance_scale| or |control_scale| anywhere (requests and
/// `lumen.json` defaults).
pub const MAX_ABS_SCALE: f64 = 1000.0;

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

/// Turn `--dtype auto|f32|f16|bf16` into the dtype of the diffusion weights
/// on `device`: `auto` is f16 on CUDA and f32 on the CPU. (The DINOv2 encoder
/// and the PCA always run in f32.) bf16 is refused on the CPU, where candle
/// 0.11 has no bf16 matrix product: the first step would fail.
pub fn parse_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec.trim() {
        "auto" if device.is_cuda() => Ok(DType::F16),
        "auto" | "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" if device.is_cpu() => Err(Error::param(
            "dtype",
            "bf16 runs on CUDA only: the CPU has no bf16 matrix product (use f32, or f16)",
        )),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::param(
            "dtype",
            format!("`{other}` is not auto, f32, f16 or bf16"),
        )),
    }
}

/// The name of a dtype in logs and status answers (`f32`, `f16`, `bf16`).
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// The name of a device in logs and status answers (`cpu`, `cuda:0`).
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
