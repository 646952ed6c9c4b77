//! The one request model. The CLI, the HTTP handlers (JSON and multipart)
//! and batch jobs all build a [`SynthesisRequest`] or [`LayoutRequest`]
//! (every field optional) and resolve it here against the model's
//! [`Bounds`]: every default, limit and check lives in this module and in
//! [`limits`], and the resolved [`SynthesisPlan`] writes the one
//! [`SynthesisParameters`] record that PNGs carry and the API returns.
//!
//! Errors name the field: [`crate::Error::InvalidParameter`] for a value that
//! is not allowed.

pub mod limits;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};
use crate::models::schedulers::SchedulerKind;
use crate::pipeline::layout::Layout;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::synthesis::{SynthesisItem, SynthesisSettings};

pub use crate::pipeline::parameters::SynthesisParameters;
pub use limits::{rules, Bounds, FieldRule, LayoutBounds, Limits, DEFAULT_LIMITS, MAX_SEED};

use limits::{DEFAULT_NUM_IMAGES, MAX_ABS_SCALE};

/// A synthesis as a caller asks for it; `None` (or JSON `null`) means "the
/// default". The guide (an image file, an uploaded image, a `layout_id`) is
/// given beside it, as each entry point receives it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SynthesisRequest {
    /// Text prompt.
    pub prompt: Option<String>,
    /// Negative prompt (used when guidance_scale > 1).
    pub negative_prompt: Option<String>,
    /// K: the number of PCA components of the layout. Fewer give more
    /// diverse images, more give higher fidelity to the guide. Default: the
    /// layout_id's K, else the model's (lumen.json's `default_components`, else Kmax).
    pub components: Option<usize>,
    /// Longer side, in pixels, of the guide image fed to the encoder (not
    /// with a layout_id, which already has its size). Default: the model's.
    pub layout_size: Option<u32>,
    /// Denoising steps (default: lumen.json `default_steps`, else 30). At
    /// most `--max-steps` and what every scheduler reaches with the model's
    /// `num_train_timesteps` (999 of 1000: DDIM's leading spacing cannot
    /// start at step 1000).
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: lumen.json
    /// `default_guidance_scale`, else 7.5); at most 1 skips the unconditional pass.
    pub guidance_scale: Option<f64>,
    /// Weight of the ControlNet residuals.
    pub control_scale: Option<f64>,
    /// Scheduler. Default: the model folder's scheduler if lumen has it, else dpmpp-2m.
    pub scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i (modulo 2^53). At
    /// most 2^53 - 1, so that JavaScript clients keep it exact. Random if
    /// omitted.
    pub seed: Option<u64>,
    /// Number of images.
    pub num_images: Option<usize>,
    /// Output width. Default: from the height and the guide's aspect ratio,
    /// or the guide's aspect with the longer side the model's default size
    /// (lumen.json `default_size`, else 512); a derived side is
    /// rounded to the size multiple and kept within the largest side.
    pub width: Option<u32>,
    /// Output height (default as for width).
    pub height: Option<u32>,
    /// Image format: png (carries the parameters in an iTXt chunk), jpeg or
    /// webp (lossless).
    pub format: Option<String>,
    /// Also return each image's fidelity score: the Pearson correlation
    /// between the guide's layout and the image's over all Kmax PCA
    /// components (whatever K the image was made with), re-extracted with
    /// the same encoder and PCA (1: same layout; 0: unrelated). Costs one
    /// encoder pass per image. Default: false.
    pub score: Option<bool>,
}

/// A neural layout as a caller asks for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LayoutRequest {
    /// Number of PCA components K. Default: the model's (lumen.json's
    /// `default_components`, else Kmax).
    pub components: Option<usize>,
    /// Longer side, in pixels, of the image fed to the encoder. Default: the model's.
    pub layout_size: Option<u32>,
}

/// What the guide brings to a synthesis.
#[derive(Clone, Copy, Debug)]
pub struct GuideInfo {
    /// The guide image's `(width, height)`.
    pub source_size: (u32, u32),
    /// The layout size of an already computed layout (a `layout_id`); a
    /// request may not ask for another.
    pub layout_size: Option<u32>,
    /// The K a `layout_id` names: the default K of its request.
    pub components: Option<usize>,
}

impl GuideInfo {
    /// A guide image to encode.
    pub fn image(source_size: (u32, u32)) -> Self {
        Self {
            source_size,
            layout_size: None,
            components: None,
        }
    }
}

/// A synthesis with every default resolved and every value checked.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthesisPlan {
    pub settings: SynthesisSettings,
    pub components: usize,
    pub layout_size: u32,
    pub prompt: String,
    pub negative_prompt: String,
    pub guidance_scale: f64,
    pub control_scale: f64,
    pub seed: u64,
    pub num_images: usize,
    pub format: OutputFormat,
    /// Score each image against its guide's layout.
    pub score: bool,
}

/// K within 1..=Kmax of the model's basis: the one check of a requested K
/// (the CLI's, the API's and the jobs' requests all resolve here).
pub fn check_components(k: usize, kmax: usize) -> Result<()> {
    if k == 0 || k > kmax {
        return Err(Error::param(
            "components",
            format!("{k} is out of range: this model's PCA basis has 1 to {kmax} components"),
        ));
    }
    Ok(())
}

/// `v` within `min..=max`.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    v: T,
    min: T,
    max: T,
) -> Result<T> {
    if v < min || v > max {
        return Err(Error::param(
            name,
            format!("{v} is out of range {min}..={max}"),
        ));
    }
    Ok(v)
}

fn check_layout_size(b: &LayoutBounds, v: u32) -> Result<u32> {
    check_layout_size_within(v, b.min_layout_size, b.max_layout_size)
}

/// A layout size within one patch and the largest allowed.
pub fn check_layout_size_within(v: u32, patch: u32, max: u32) -> Result<u32> {
    if v < patch || v > max {
        return Err(Error::param(
            "layout_size",
            format!("{v} is out of range {patch}..={max} (one patch to the maximum)"),
        ));
    }
    Ok(v)
}

fn check_side(b: &Bounds, name: &str, v: u32) -> Result<u32> {
    let m = b.size_multiple;
    if v == 0 || !v.is_multiple_of(m) || v > b.max_side {
        let why = if b.max_side_from_model {
            " (the model supports no larger side: lumen.json max_size)"
        } else {
            ""
        };
        return Err(Error::param(
            name,
            format!(
                "{v} must be a positive multiple of {m} (VAE factor × UNet downsampling), \
                 at most {}{why}",
                b.max_side
            ),
        ));
    }
    if v < b.min_side {
        return Err(Error::param(
            name,
            format!(
                "{v} is below {}, the model's smallest supported side (lumen.json min_size)",
                b.min_side
            ),
        ));
    }
    Ok(v)
}

/// The output size: given sides as they are; a missing side from the other
/// and the guide's aspect ratio; neither: the guide's aspect with the longer
/// side the model's default (`lumen.json` `default_size`, else 512). Derived
/// sides are rounded to the size multiple
/// and kept within `min_side..=max_side`.
pub fn output_size(
    b: &Bounds,
    (sw, sh): (u32, u32),
    width: Option<u32>,
    height: Option<u32>,
) -> (u32, u32) {
    let m = b.size_multiple;
    let fit = |x: f64| (((x / m as f64).round() as u32).max(1) * m).clamp(b.min_side, b.max_side);
    let (sw, sh) = (sw.max(1) as f64, sh.max(1) as f64);
    match (width, height) {
        (Some(w), Some(h)) => (w, h),
        (Some(w), None) => (w, fit(w as f64 * sh / sw)),
        (None, Some(h)) => (fit(h as f64 * sw / sh), h),
        (None, None) => {
            let long = (b.default_long_side.div_ceil(m) * m).clamp(b.min_side, b.max_side);
            if sw >= sh {
                (long, fit(long as f64 * sh / sw))
            } else {
                (fit(long as f64 * sw / sh), long)
            }
        }
    }
}

impl SynthesisRequest {
    pub fn num_images(&self) -> usize {
        self.num_images.unwrap_or(DEFAULT_NUM_IMAGES)
    }

    /// The guidance scale: the request's, else the model's default.
    pub fn guidance_scale(&self, b: &Bounds) -> f64 {
        self.guidance_scale.unwrap_or(b.default_guidance_scale)
    }

    /// The ControlNet's weight: the request's, else the model's default.
    pub fn control_scale(&self, b: &Bounds) -> f64 {
        self.control_scale.unwrap_or(b.default_control_scale)
    }

    /// The output format (png unless asked otherwise).
    pub fn format(&self) -> Result<OutputFormat> {
        self.format
            .as_deref()
            .map_or(Ok(OutputFormat::Png), OutputFormat::parse)
    }

    /// Check every given value against the bounds; needs no guide, so a bad
    /// parameter is reported before any image is decoded.
    pub fn validate(&self, b: &Bounds) -> Result<()> {
        in_range(
            "steps",
            self.steps.unwrap_or(b.default_steps),
            1,
            b.max_steps,
        )?;
        in_range("num_images", self.num_images(), 1, b.limits.max_images)?;
        if let Some(seed) = self.seed {
            in_range("seed", seed, 0, MAX_SEED)?;
        }
        for (name, v) in [
            ("guidance_scale", self.guidance_scale(b)),
            ("control_scale", self.control_scale(b)),
        ] {
            if !v.is_finite() || v.abs() > MAX_ABS_SCALE {
                return Err(Error::param(
                    name,
                    format!("{v} must be a finite number within ±{MAX_ABS_SCALE}"),
                ));
            }
        }
        if let Some(s) = &self.scheduler {
            SchedulerKind::parse(s)?;
        }
        self.format()?;
        if let Some(k) = self.components {
            check_components(k, b.layout.max_components)?;
        }
        if let Some(s) = self.layout_size {
            check_layout_size(&b.layout, s)?;
        }
        if let Some(w) = self.width {
            check_side(b, "width", w)?;
        }
        if let Some(h) = self.height {
            check_side(b, "height", h)?;
        }
        Ok(())
    }

    /// The encoder input size for a guide image (validated).
    pub fn layout_size(&self, b: &Bounds) -> Result<u32> {
        check_layout_size(
            &b.layout,
            self.layout_size.unwrap_or(b.layout.default_layout_size),
        )
    }

    /// Every default resolved against the model and the guide.
    pub fn resolve(&self, b: &Bounds, guide: &GuideInfo) -> Result<SynthesisPlan> {
        self.validate(b)?;
        let layout_size = match (guide.layout_size, self.layout_size) {
            (Some(_), Some(_)) => {
                return Err(Error::param(
                    "layout_size",
                    "applies to a guide image; a layout_id already has its size",
                ))
            }
            (Some(fixed), None) => fixed,
            (None, _) => self.layout_size(b)?,
        };
        let components = self
            .components
            .or(guide.components)
            .unwrap_or(b.layout.default_components);
        check_components(components, b.layout.max_components)?;
        let (width, height) = output_size(b, guide.source_size, self.width, self.height);
        let scheduler = match &self.scheduler {
            Some(s) => SchedulerKind::parse(s)?,
            None => b.default_scheduler,
        };
        Ok(SynthesisPlan {
            settings: SynthesisSettings {
                width,
                height,
                steps: self.steps.unwrap_or(b.default_steps),
                scheduler,
            },
            components,
            layout_size,
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone().unwrap_or_default(),
            guidance_scale: self.guidance_scale(b),
            control_scale: self.control_scale(b),
            seed: self.seed.unwrap_or_else(|| rand::random::<u32>() as u64),
            num_images: self.num_images(),
            format: self.format()?,
            score: self.score.unwrap_or(false),
        })
    }
}

impl LayoutRequest {
    /// `(K, layout size)` with the model's defaults, checked.
    pub fn resolve(&self, b: &LayoutBounds) -> Result<(usize, u32)> {
        let k = self.components.unwrap_or(b.default_components);
        check_components(k, b.max_components)?;
        let size = check_layout_size(b, self.layout_size.unwrap_or(b.default_layout_size))?;
        Ok((k, size))
    }
}

impl SynthesisPlan {
    /// Whether the unconditional pass runs (guidance scale above 1).
    pub fn cfg(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The seed of image `i`.
    pub fn seed_of(&self, i: usize) -> u64 {
        (self.seed.wrapping_add(i as u64)) & MAX_SEED
    }

    /// One item per image for `layout` (which must hold `components` channels).
    pub fn items(&self, layout: &Layout) -> Vec<SynthesisItem> {
        (0..self.num_images)
            .map(|i| SynthesisItem {
                layout: layout.clone(),
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                guidance: self.guidance_scale,
                control_scale: self.control_scale,
                seed: self.seed_of(i),
                latents: None,
            })
            .collect()
    }

    /// The record of this synthesis: the guide's `layout_id`, the model.
    pub fn parameters(&self, layout_id: String, model: &str) -> SynthesisParameters {
        SynthesisParameters {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            components: self.components,
            layout_size: self.layout_size,
            layout_id,
            steps: self.settings.steps,
            guidance_scale: self.guidance_scale,
            control_scale: self.control_scale,
            scheduler: self.settings.scheduler.name().to_string(),
            seed: self.seed,
            num_images: self.num_images,
            width: self.settings.width,
            height: self.settings.height,
            format: self.format.name().to_string(),
            latents: None,
            model: model.to_string(),
            lumen_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
