//! Every default and every limit of a request, written once: the constants
//! below, a deployment's [`Limits`], and the [`Bounds`] they give with a
//! model's specs. Validation ([`super`]) and the OpenAPI document
//! ([`rules`]) both read them, so the document cannot promise what the
//! validation refuses.

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::models::schedulers::SchedulerKind;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::spec::{LayoutSpec, ModelSpecs};

/// Denoising steps when a request names none.
pub const DEFAULT_STEPS: usize = 30;
/// Classifier-free guidance scale when a request names none.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;
/// Weight of the ControlNet residuals when a request names none.
pub const DEFAULT_CONTROL_SCALE: f64 = 1.0;
/// Images per request when a request names none.
pub const DEFAULT_NUM_IMAGES: usize = 1;
/// The largest seed: 2^53 - 1, JavaScript's largest exact integer, so that
/// every client (a browser among them) keeps seeds exact. Image i's seed,
/// seed + i, wraps within it.
pub const MAX_SEED: u64 = (1 << 53) - 1;
/// Longer side of the output when a request gives neither width nor height.
pub const DEFAULT_LONG_SIDE: u32 = 512;
/// Guidance and control scales lie within ±this (one bound with `lumen.json`'s).
pub use crate::config::MAX_ABS_SCALE;

/// What one deployment allows a request (`lumen serve --max-*`; the CLI and
/// batch jobs use the defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Most denoising steps.
    pub max_steps: usize,
    /// Longest output side, in pixels.
    pub max_side: u32,
    /// Most images per request.
    pub max_images: usize,
    /// Longest side of the encoder input, in pixels.
    pub max_layout_size: u32,
}

/// The limits of the CLI and batch jobs, and of `lumen serve` by default.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_steps: 1000,
    max_side: 2048,
    max_images: 8,
    max_layout_size: 2048,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

impl Limits {
    /// Every limit must be at least 1.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [
            ("max_steps", self.max_steps as u64),
            ("max_side", self.max_side as u64),
            ("max_images", self.max_images as u64),
            ("max_layout_size", self.max_layout_size as u64),
        ] {
            if v == 0 {
                return Err(Error::param(name, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// The bounds and defaults of layout requests to one model's layout half.
#[derive(Clone, Debug)]
pub struct LayoutBounds {
    /// Shortest encoder input side: one patch.
    pub min_layout_size: u32,
    /// Longest encoder input side: the limit.
    pub max_layout_size: u32,
    pub default_layout_size: u32,
    /// Kmax.
    pub max_components: usize,
    /// K of a guide image when the request names none.
    pub default_components: usize,
    /// Guide images with more pixels are refused (from their header).
    pub max_image_pixels: u64,
}

impl LayoutBounds {
    /// Fails when the limits leave no layout size (or exclude the model's default).
    pub fn new(spec: &LayoutSpec, limits: &Limits) -> Result<Self> {
        limits.check()?;
        let patch = spec.patch_size as u32;
        if limits.max_layout_size < patch {
            return Err(Error::param(
                "max_layout_size",
                format!(
                    "{} is below one patch ({patch} pixels)",
                    limits.max_layout_size
                ),
            ));
        }
        // A default above the limit becomes the limit.
        let default_layout_size = spec.settings.layout_size.min(limits.max_layout_size);
        if default_layout_size < patch {
            return Err(Error::param(
                "layout_size",
                format!(
                    "the model's layout_size {default_layout_size} (lumen.json) is below one \
                     patch ({patch} pixels)"
                ),
            ));
        }
        Ok(Self {
            min_layout_size: patch,
            max_layout_size: limits.max_layout_size,
            default_layout_size,
            max_components: spec.max_components,
            default_components: spec.default_components,
            max_image_pixels: spec.settings.max_image_pixels,
        })
    }
}

/// The effective bounds and defaults of requests to one model under one
/// deployment's limits.
#[derive(Clone, Debug)]
pub struct Bounds {
    pub limits: Limits,
    /// The model's identity (image metadata, layout ids).
    pub model: String,
    pub layout: LayoutBounds,
    /// Most steps: the limit, or less where a scheduler cannot take it.
    pub max_steps: usize,
    /// `lumen.json`'s `default_steps` (else [`DEFAULT_STEPS`]), or the most
    /// steps when that is fewer.
    pub default_steps: usize,
    /// Longer output side when a request names neither width nor height:
    /// `lumen.json`'s `default_size` (else [`DEFAULT_LONG_SIDE`]).
    pub default_long_side: u32,
    /// `lumen.json`'s `default_guidance_scale` (else [`DEFAULT_GUIDANCE_SCALE`]).
    pub default_guidance_scale: f64,
    /// `lumen.json`'s `default_control_scale` (else [`DEFAULT_CONTROL_SCALE`]).
    pub default_control_scale: f64,
    /// Output sides are multiples of this.
    pub size_multiple: u32,
    /// Shortest output side: `lumen.json`'s `min_size` rounded up to the
    /// size multiple, else the size multiple.
    pub min_side: u32,
    /// Longest output side: the limit, or `lumen.json`'s `max_size` where
    /// that is less, rounded down to the size multiple.
    pub max_side: u32,
    /// Whether `max_side` is the model's `max_size` (for the messages).
    pub max_side_from_model: bool,
    pub default_scheduler: SchedulerKind,
}

impl Bounds {
    /// Fails when the limits leave the model nothing to do (a largest side
    /// below one size multiple, a default layout size out of range).
    pub fn new(specs: &ModelSpecs, limits: Limits) -> Result<Self> {
        let layout = LayoutBounds::new(&specs.layout, &limits)?;
        let m = specs.synthesis.size_multiple;
        let settings = &specs.layout.settings;
        let max_side_from_model = settings.max_size.is_some_and(|s| s < limits.max_side);
        let max_side = settings.max_size.unwrap_or(u32::MAX).min(limits.max_side) / m * m;
        let min_side = settings.min_size.unwrap_or(m).div_ceil(m).max(1) * m;
        if max_side == 0 {
            return Err(Error::param(
                "max_side",
                format!("{} is below the model's size multiple {m}", limits.max_side),
            ));
        }
        if min_side > max_side {
            return Err(Error::param(
                "max_side",
                format!(
                    "{max_side} is below the model's smallest supported side {min_side} \
                     (lumen.json min_size, rounded up to the size multiple {m})"
                ),
            ));
        }
        let max_steps = specs.synthesis.max_steps(limits.max_steps);
        Ok(Self {
            limits,
            model: specs.model.clone(),
            layout,
            max_steps,
            default_steps: settings
                .default_steps
                .unwrap_or(DEFAULT_STEPS)
                .min(max_steps),
            default_long_side: settings.default_size.unwrap_or(DEFAULT_LONG_SIDE),
            default_guidance_scale: settings
                .default_guidance_scale
                .unwrap_or(DEFAULT_GUIDANCE_SCALE),
            default_control_scale: settings
                .default_control_scale
                .unwrap_or(DEFAULT_CONTROL_SCALE),
            size_multiple: m,
            min_side,
            max_side,
            max_side_from_model,
            default_scheduler: specs.synthesis.default_scheduler(),
        })
    }
}

/// One request field's documented constraints (JSON Schema keywords).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldRule {
    pub name: &'static str,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub multiple_of: Option<u64>,
    /// The only values allowed (strings).
    pub choices: Option<Vec<&'static str>>,
    pub default: Option<Value>,
    /// The loaded model's default where a literal `default` would be wrong
    /// for some requests (K: a layout_id brings its own); documented as
    /// `x-lumen-default`, which clients show but do not send.
    pub model_default: Option<Value>,
}

impl FieldRule {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            minimum: None,
            maximum: None,
            multiple_of: None,
            choices: None,
            default: None,
            model_default: None,
        }
    }

    fn range(mut self, min: f64, max: f64) -> Self {
        self.minimum = Some(min);
        self.maximum = Some(max);
        self
    }

    fn default(mut self, v: Value) -> Self {
        self.default = Some(v);
        self
    }
}

/// The constraints of every synthesis and layout field, for the OpenAPI
/// document: with a model's bounds, exactly what validation enforces; without
/// one, what holds for every model under `limits`.
pub fn rules(limits: &Limits, bounds: Option<&Bounds>) -> Vec<FieldRule> {
    let max_steps = bounds.map_or(limits.max_steps, |b| b.max_steps);
    let m = bounds.map(|b| b.size_multiple);
    let min_side = bounds.map_or(1, |b| b.min_side);
    let max_side = bounds.map_or(limits.max_side, |b| b.max_side);
    let min_layout = bounds.map_or(1, |b| b.layout.min_layout_size);
    // Defaults that depend on the model (lumen.json) are stated only with one.
    let mut scale = FieldRule::new("guidance_scale").range(-MAX_ABS_SCALE, MAX_ABS_SCALE);
    scale.default = bounds.map(|b| json!(b.default_guidance_scale));
    let mut control = FieldRule::new("control_scale").range(-MAX_ABS_SCALE, MAX_ABS_SCALE);
    control.default = bounds.map(|b| json!(b.default_control_scale));
    let mut steps = FieldRule::new("steps").range(1.0, max_steps as f64);
    steps.default = bounds.map(|b| json!(b.default_steps));
    let side = |name| {
        let mut r = FieldRule::new(name).range(min_side as f64, max_side as f64);
        r.multiple_of = m.map(u64::from);
        r
    };
    let (width, height) = (side("width"), side("height"));
    let mut components = FieldRule::new("components");
    components.minimum = Some(1.0);
    components.maximum = bounds.map(|b| b.layout.max_components as f64);
    // Not a `default`: with a layout_id the default is that id's K, and a
    // client that sent a literal default would override it.
    components.model_default = bounds.map(|b| json!(b.layout.default_components));
    let mut layout_size =
        FieldRule::new("layout_size").range(min_layout as f64, limits.max_layout_size as f64);
    // Not a `default` either: it applies only with a guide image, and a
    // client that sent it with a layout_id would be refused.
    layout_size.model_default = bounds.map(|b| json!(b.layout.default_layout_size));
    let mut scheduler = FieldRule::new("scheduler");
    scheduler.choices = Some(SchedulerKind::ALL.iter().map(|k| k.name()).collect());
    scheduler.default = bounds.map(|b| json!(b.default_scheduler.name()));
    let mut format = FieldRule::new("format").default(json!(OutputFormat::Png.name()));
    format.choices = Some(OutputFormat::NAMES.to_vec());
    vec![
        FieldRule::new("prompt").default(json!("")),
        FieldRule::new("negative_prompt").default(json!("")),
        components,
        layout_size,
        steps,
        scale,
        control,
        scheduler,
        FieldRule::new("num_images")
            .range(1.0, limits.max_images as f64)
            .default(json!(DEFAULT_NUM_IMAGES)),
        width,
        height,
        format,
        FieldRule::new("score").default(json!(false)),
        FieldRule::new("seed").range(0.0, MAX_SEED as f64),
    ]
}
