//! Layout-conditioned synthesis: text embeddings, seeded initial latents, the
//! ControlNet + UNet denoising loop with classifier-free guidance, VAE decode.
//! Orchestration only: the models are in `crate::models`; what a request may
//! ask for is decided in [`crate::pipeline::request`].
//!
//! One call runs a batch of items that share size, steps, scheduler and
//! whether guidance is on; each item has its own layout, prompts, guidance,
//! control scale and seed. Each image's initial latents are drawn on the host
//! from its own seeded ChaCha20 generator, so a seed gives the same image
//! alone or in a batch, on any device.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::models::clip::TextConditioner;
use crate::models::controlnet::ControlNet;
use crate::models::schedulers::SchedulerKind;
use crate::models::unet::UNet;
use crate::models::vae::{Vae, VaeConfig};
use crate::pipeline::denoise::Denoising;
use crate::pipeline::layout::Layout;
use crate::pipeline::spec::SynthesisSpec;

/// The diffusion half of a model folder, resident on one device. The layout
/// half ([`crate::pipeline::layout::LayoutModel`]) is loaded separately, so
/// a one-shot command can free the encoder before the diffusion weights load.
pub struct SynthesisModel {
    pub text: TextConditioner,
    pub unet: UNet,
    pub controlnet: ControlNet,
    pub vae: Vae,
    spec: SynthesisSpec,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
}

/// The dtypes of the diffusion half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    /// Text encoder, UNet, ControlNet (and the denoising loop).
    pub weights: DType,
    /// Decode with the VAE in f32 when the weights are f16 or bf16: `None`
    /// follows the VAE config's `force_upcast` (SD1.5's VAE can overflow
    /// f16 at large sizes), `Some` overrides it.
    pub vae_upcast: Option<bool>,
}

impl Precision {
    /// Every part, the VAE included, in `dtype`.
    pub fn uniform(dtype: DType) -> Self {
        Self::new(dtype, Some(false))
    }

    pub fn new(dtype: DType, vae_upcast: Option<bool>) -> Self {
        Self {
            weights: dtype,
            vae_upcast,
        }
    }

    /// The VAE's dtype, given its config's `force_upcast`.
    pub fn vae_dtype(&self, force_upcast: bool) -> DType {
        if self.vae_upcast.unwrap_or(force_upcast) {
            DType::F32
        } else {
            self.weights
        }
    }
}

/// Per-request settings shared by a batch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SynthesisSettings {
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub scheduler: SchedulerKind,
}

/// One image to make.
#[derive(Clone, Debug)]
pub struct SynthesisItem {
    /// The guide's layout `[K, h, w]` (K ≤ Kmax).
    pub layout: Layout,
    pub prompt: String,
    pub negative_prompt: String,
    pub guidance: f64,
    pub control_scale: f64,
    pub seed: u64,
    /// Unit-variance initial latents `[1, C, h, w]` overriding the seed.
    pub latents: Option<Tensor>,
}

impl SynthesisModel {
    /// Load every component of a model folder in f32 and check they fit together.
    pub fn load(src: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_as(src, device, DType::F32)
    }

    /// [`Self::load`] with the weights (and the computation) in `dtype`:
    /// f32, or f16 / bf16 on a GPU.
    pub fn load_as(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(src, device, Precision::uniform(dtype))
    }

    /// [`Self::load`] with the text encoder, UNet and ControlNet in
    /// `p.weights` and the VAE in [`Precision::vae_dtype`].
    pub fn load_with(src: &ModelSource, device: &Device, p: Precision) -> Result<Self> {
        Self::load_spec(src, SynthesisSpec::read(src)?, device, p)
    }

    /// [`Self::load_with`] with the spec already read (see
    /// [`crate::pipeline::spec::ModelSpecs`]).
    pub fn load_spec(
        src: &ModelSource,
        spec: SynthesisSpec,
        device: &Device,
        p: Precision,
    ) -> Result<Self> {
        let dtype = p.weights;
        let text = TextConditioner::load(src, device, dtype)?;
        let unet = UNet::load(src, device, dtype)?;
        let controlnet = ControlNet::load(src, device, dtype)?;
        let vae_dtype = p.vae_dtype(spec.vae.force_upcast);
        let vae = Vae::load(src, device, vae_dtype)?;
        let kmax = spec.max_components;
        let controlnet_config = src.path("controlnet/config.json");
        if controlnet.conditioning_channels != kmax {
            return Err(Error::model_file(
                controlnet_config,
                format!(
                    "conditioning_channels is {} but the PCA basis has {kmax} components; \
                     the ControlNet must be trained on this basis",
                    controlnet.conditioning_channels
                ),
            ));
        }
        if controlnet.conditioning_factor != vae.factor {
            return Err(Error::model_file(
                controlnet_config,
                format!(
                    "the conditioning embedding downsamples by {} but the VAE by {}",
                    controlnet.conditioning_factor, vae.factor
                ),
            ));
        }
        let text_dim = text.encoder.config().hidden_size;
        for (name, dim) in [
            ("unet", unet.layout.cross_attention_dim),
            ("controlnet", controlnet.layout.cross_attention_dim),
        ] {
            if dim != text_dim {
                return Err(Error::model_file(
                    src.path(&format!("{name}/config.json")),
                    format!("cross_attention_dim {dim} does not match the text encoder's hidden_size {text_dim}"),
                ));
            }
        }
        if unet.layout.in_channels != vae.latent_channels
            || unet.out_channels != vae.latent_channels
        {
            return Err(Error::model_file(
                src.path("unet/config.json"),
                format!(
                    "in/out channels do not match the VAE's latent_channels {} ({})",
                    vae.latent_channels,
                    src.path(VaeConfig::FILE)
                ),
            ));
        }
        Ok(Self {
            text,
            unet,
            controlnet,
            vae,
            spec,
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The UNet's and ControlNet's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The VAE's dtype (see [`Precision::vae_dtype`]).
    pub fn vae_dtype(&self) -> DType {
        self.vae_dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model's sizes and limits as plain data (for validating requests
    /// away from the weights).
    pub fn spec(&self) -> &SynthesisSpec {
        &self.spec
    }

    /// Kmax of the folder's PCA basis (= the ControlNet's conditioning channels).
    pub fn max_components(&self) -> usize {
        self.spec.max_components
    }

    /// Output sides must be multiples of this (VAE factor × UNet downsampling).
    pub fn size_multiple(&self) -> u32 {
        self.spec.size_multiple
    }

    /// Check a batch before it runs: every item's K within Kmax, its
    /// guidance and control scale finite, its latents (if any) of the right
    /// shape; steps and scheduler are checked when the scheduler is built.
    pub fn check_batch(&self, s: &SynthesisSettings, items: &[SynthesisItem]) -> Result<()> {
        let m = self.spec.size_multiple;
        for (name, v) in [("width", s.width), ("height", s.height)] {
            if v == 0 || !v.is_multiple_of(m) {
                return Err(Error::param(
                    name,
                    format!(
                        "{v} must be a positive multiple of {m} (VAE factor × UNet downsampling)"
                    ),
                ));
            }
        }
        for item in items {
            for (name, v) in [
                ("guidance_scale", item.guidance),
                ("control_scale", item.control_scale),
            ] {
                if !v.is_finite() {
                    return Err(Error::param(name, format!("{v} is not a finite number")));
                }
            }
            if item.layout.components > self.spec.max_components {
                // Requests are checked against Kmax before they get here.
                return Err(Error::Internal(format!(
                    "a layout of {} components for {} conditioning channels",
                    item.layout.components, self.spec.max_components
                )));
            }
            if let Some(l) = &item.latents {
                let want = self.spec.latent_shape(s.width, s.height);
                if l.dims() != want {
                    return Err(Error::param(
                        "latents",
                        format!(
                            "shape {:?} does not match {want:?} for {}x{}",
                            l.dims(),
                            s.width,
                            s.height
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Unit-variance Gaussian latents from `seed` (ChaCha20, drawn on the host).
    pub fn seeded_latents(&self, s: &SynthesisSettings, seed: u64) -> Result<Tensor> {
        let shape = self.spec.latent_shape(s.width, s.height);
        let n: usize = shape.iter().product();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(data, &shape[..], &Device::Cpu)?)
    }

    /// The ControlNet input for a layout (see [`Layout::conditioning`]), on
    /// this model's device and in its dtype.
    pub fn conditioning(&self, layout: &Layout, width: u32, height: u32) -> Result<Tensor> {
        let cond = layout.conditioning(self.controlnet.conditioning_channels, width, height)?;
        Ok(cond
            .unsqueeze(0)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Text embeddings `[2, L, D]` (negative, positive) or `[1, L, D]` (positive only).
    pub fn text_embeddings(&self, prompt: &str, negative: &str, cfg: bool) -> Result<Tensor> {
        if cfg {
            self.text.encode(&[negative, prompt], &self.device)
        } else {
            self.text.encode(&[prompt], &self.device)
        }
    }

    /// Run the denoising loop for a batch and decode the images.
    /// `progress(step, total)` is called after each step.
    pub fn generate(
        &self,
        s: &SynthesisSettings,
        items: &[SynthesisItem],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<RgbImage>> {
        let latents = self.denoise(s, items, &mut progress)?;
        (0..items.len())
            .map(|i| self.decode(&latents.narrow(0, i, 1)?))
            .collect()
    }

    /// The denoising loop alone: final latents `[B, C, h, w]`.
    pub fn denoise(
        &self,
        s: &SynthesisSettings,
        items: &[SynthesisItem],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.denoise_with(s, items, progress, &mut |_, _| Ok(()))
    }

    /// [`Self::denoise`] with a hook that sees each step's guided noise
    /// prediction. The loop is [`Denoising`]'s, stepped to its end.
    pub fn denoise_with(
        &self,
        s: &SynthesisSettings,
        items: &[SynthesisItem],
        progress: &mut dyn FnMut(usize, usize),
        on_noise_pred: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        if items.is_empty() {
            return Err(Error::param("num_images", "nothing to generate"));
        }
        let mut d = Denoising::new(self, s, items)?;
        self.run_to_end(&mut d, progress, on_noise_pred)?;
        Ok(d.latents().clone())
    }

    /// Decode one image's latents `[1, C, h, w]` to 8-bit RGB, as diffusers'
    /// image processor does: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        let img = self.vae.decode(latents)?.to_dtype(DType::F32)?;
        let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let img = (img * 255.0)?
            .round()?
            .to_dtype(DType::U8)?
            .squeeze(0)?
            .permute((1, 2, 0))?;
        let (h, w, _) = img.dims3()?;
        let data = img
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        RgbImage::from_raw(w as u32, h as u32, data)
            .ok_or_else(|| Error::Internal("decoded image has a bad size".into()))
    }
}
