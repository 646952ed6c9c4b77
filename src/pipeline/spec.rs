//! What request handling needs to know about a model set, as plain data read
//! from its configs (no weights): patch size, Kmax, defaults from
//! `lumen.json`, the output size multiple, the scheduler config. The loaded
//! models build their own specs with these same readers, so a request checked
//! against a spec fits the models.

use candle_core::Device;
use image::RgbImage;

use crate::config::LumenSettings;
use crate::error::{Error, Result};
use crate::guide::{prepare_pixels, PreparedGuide};
use crate::model_folder::ModelSource;
use crate::models::dinov2::Dinov2Config;
use crate::models::pca::{self, Pca};
use crate::models::schedulers::{self, SchedulerKind};
use crate::models::unet_layout::UNetLayout;
use crate::models::vae::VaeConfig;

/// The scheduler config's name inside a model folder.
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// The layout half's shape and defaults.
#[derive(Clone, Debug)]
pub struct LayoutSpec {
    pub patch_size: usize,
    /// Kmax of the PCA basis.
    pub max_components: usize,
    /// K used when a request names none: `lumen.json`'s `default_components`
    /// (at most Kmax), else Kmax.
    pub default_components: usize,
    pub settings: LumenSettings,
    /// The encoder's config (its cost model).
    pub encoder: Dinov2Config,
}

impl LayoutSpec {
    /// From the encoder config, the PCA basis and `lumen.json`.
    pub fn read(src: &ModelSource) -> Result<Self> {
        let settings = LumenSettings::load(src)?;
        let encoder = Dinov2Config::read(src)?;
        let pca = Pca::load(src, &Device::Cpu)?;
        if pca.dim() != encoder.hidden_size {
            return Err(Error::model_file(
                src.path(pca::PCA_FILE),
                format!(
                    "basis has width {} but the encoder's hidden_size is {} ({})",
                    pca.dim(),
                    encoder.hidden_size,
                    src.path(Dinov2Config::FILE)
                ),
            ));
        }
        let kmax = pca.max_components();
        Ok(Self {
            patch_size: encoder.patch_size,
            max_components: kmax,
            default_components: settings.default_components.map_or(kmax, |k| k.min(kmax)),
            settings,
            encoder,
        })
    }

    /// Resize and normalize a decoded guide at `layout_size` (default from lumen.json).
    pub fn prepare(&self, img: &RgbImage, layout_size: Option<u32>) -> Result<PreparedGuide> {
        prepare_pixels(
            self.patch_size,
            img,
            layout_size.unwrap_or(self.settings.layout_size),
        )
    }
}

/// The diffusion half's sizes and scheduler config.
#[derive(Clone, Debug)]
pub struct SynthesisSpec {
    /// Output sides are multiples of this (VAE factor × UNet downsampling).
    pub size_multiple: u32,
    pub vae_factor: usize,
    pub latent_channels: usize,
    /// Kmax (= the ControlNet's conditioning channels).
    pub max_components: usize,
    pub scheduler_config: serde_json::Value,
    /// The scheduler config's full name, for errors.
    pub scheduler_file: String,
    /// The UNet's (and ControlNet's) block layout and the VAE's config:
    /// what a step and a decode cost (see [`crate::pipeline::cost`]).
    pub unet: UNetLayout,
    pub vae: VaeConfig,
}

impl SynthesisSpec {
    /// From the UNet, VAE and scheduler configs and the PCA basis; fails when
    /// a component synthesis needs is missing.
    pub fn read(src: &ModelSource) -> Result<Self> {
        Self::read_with(src, Pca::load(src, &Device::Cpu)?.max_components())
    }

    /// [`Self::read`] with Kmax already known (from the [`LayoutSpec`]), so
    /// the basis is not read again.
    pub fn read_with(src: &ModelSource, kmax: usize) -> Result<Self> {
        let components: [(&str, &[&str]); 6] = [
            ("unet", &["unet/config.json"]),
            ("controlnet", &["controlnet/config.json"]),
            ("vae", &[VaeConfig::FILE]),
            ("text_encoder", &["text_encoder/config.json"]),
            (
                "tokenizer",
                &["tokenizer/tokenizer.json", "tokenizer/vocab.json"],
            ),
            ("scheduler", &[SCHEDULER_CONFIG]),
        ];
        for (dir, files) in components {
            if !files.iter().any(|f| src.has(f)) {
                return Err(Error::model_file(
                    src.path(dir),
                    format!("the model folder has no `{dir}/` component (needed for synthesis)"),
                ));
            }
        }
        let unet = UNetLayout::from_config(&src.diffusers_config("unet/config.json")?)?;
        let vae = VaeConfig::read(src)?;
        let scheduler_config: serde_json::Value = src.read_json(SCHEDULER_CONFIG)?;
        Ok(Self {
            size_multiple: (vae.factor() * unet.downsample_factor()) as u32,
            vae_factor: vae.factor(),
            latent_channels: vae.latent_channels,
            max_components: kmax,
            scheduler_config,
            scheduler_file: src.path(SCHEDULER_CONFIG),
            unet,
            vae,
        })
    }

    /// The scheduler default: the folder's own class when lumen has it (SD1.5
    /// ships PNDM, which it has not), else DPM++ 2M.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.scheduler_config
            .get("_class_name")
            .and_then(|c| c.as_str())
            .and_then(SchedulerKind::from_class_name)
            .unwrap_or(SchedulerKind::DpmSolverMultistep)
    }

    /// Build the scheduler of `kind` for `steps` from this folder's config.
    pub fn scheduler(
        &self,
        kind: SchedulerKind,
        steps: usize,
    ) -> Result<Box<dyn schedulers::Scheduler>> {
        schedulers::build(kind, &self.scheduler_config, steps, &self.scheduler_file)
    }

    /// The most steps, at most `limit`, that every scheduler accepts with this
    /// config (DDIM's leading spacing, for one, cannot reach
    /// `num_train_timesteps`).
    pub fn max_steps(&self, limit: usize) -> usize {
        let fits = |n: usize| {
            SchedulerKind::ALL
                .iter()
                .all(|k| self.scheduler(*k, n).is_ok())
        };
        let train = self
            .scheduler_config
            .get("num_train_timesteps")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1000) as usize;
        let mut n = limit.min(train).max(1);
        while n > 1 && !fits(n) {
            n -= 1;
        }
        n
    }

    /// `[1, C, h, w]` of one image's latents at `width × height`.
    pub fn latent_shape(&self, width: u32, height: u32) -> [usize; 4] {
        let f = self.vae_factor;
        [
            1,
            self.latent_channels,
            height as usize / f,
            width as usize / f,
        ]
    }
}

/// Both halves' specs and the model's identity.
#[derive(Clone, Debug)]
pub struct ModelSpecs {
    /// The model folder's identity (logs, image metadata, layout ids).
    pub model: String,
    pub layout: LayoutSpec,
    pub synthesis: SynthesisSpec,
}

impl ModelSpecs {
    /// Read both halves' specs from a model folder's configs.
    pub fn read(src: &ModelSource) -> Result<Self> {
        let layout = LayoutSpec::read(src)?;
        Ok(Self {
            model: src.identity()?,
            synthesis: SynthesisSpec::read_with(src, layout.max_components)?,
            layout,
        })
    }
}
