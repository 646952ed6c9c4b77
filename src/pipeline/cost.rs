//! What a request costs on this device, before it is admitted.
//!
//! The work of one denoising step, one VAE decode and one encoder pass is
//! counted from the models' configs as two terms in the number of positions
//! N at each resolution: a linear one (convolutions, projections, MLPs:
//! ∝ N·C²) and a quadratic one (self-attention: ∝ N²·C). Their sum, in
//! multiply-accumulates, is the model's *work*. At warm-up the engine times
//! each stage at two sizes and fits `seconds = overhead + work / rate`;
//! a request's estimate is then the sum of its stages. Counting the
//! attention term from the config is what lets a measurement at small
//! sizes say something about 2048² (where attention dominates).

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::dinov2::Dinov2Config;
use crate::models::unet_layout::UNetLayout;
use crate::models::vae::VaeConfig;
use crate::pipeline::request::SynthesisPlan;
use crate::pipeline::spec::ModelSpecs;

/// Tokens of CLIP's text (cross-attention keys); SD's is 77.
const TEXT_TOKENS: f64 = 77.0;

/// Multiply-accumulates of one transformer block (self-attention, cross-
/// attention, GEGLU feed-forward, the in/out projections) over `n`
/// positions of width `c`.
fn transformer(n: f64, c: f64, text_dim: f64) -> f64 {
    let linear = n * c * c * (4.0 + 2.0 + 12.0 + 2.0)
        + 2.0 * n * TEXT_TOKENS * c
        + 2.0 * TEXT_TOKENS * text_dim * c;
    let attention = 2.0 * n * n * c;
    linear + attention
}

/// One 3×3 convolution.
fn conv3(n: f64, cin: f64, cout: f64) -> f64 {
    9.0 * n * cin * cout
}

/// Work of the UNet's down path and mid block at latent size `h × w`; the
/// ControlNet runs the same. Returns (down + mid, up).
fn unet_work(l: &UNetLayout, h: usize, w: usize) -> (f64, f64) {
    let text = l.cross_attention_dim as f64;
    let mut down = 0.0;
    let mut up = 0.0;
    let mut cin = l.blocks[0].out_channels as f64;
    let mut n = (h * w) as f64;
    for (i, b) in l.blocks.iter().enumerate() {
        let c = b.out_channels as f64;
        let layers = l.layers_per_block as f64;
        let res = conv3(n, cin, c) + conv3(n, c, c) + (layers - 1.0) * 2.0 * conv3(n, c, c);
        let attn = b
            .cross_attn_layers
            .map_or(0.0, |t| layers * t as f64 * transformer(n, c, text));
        down += res + attn;
        // The up block: one more layer, inputs widened by the skips.
        up += (layers + 1.0) * (conv3(n, 2.0 * c, c) + conv3(n, c, c))
            + b.cross_attn_layers
                .map_or(0.0, |t| (layers + 1.0) * t as f64 * transformer(n, c, text));
        cin = c;
        if i + 1 < l.blocks.len() {
            n /= 4.0;
        }
    }
    let last = l.blocks.last().map_or(0.0, |b| b.out_channels as f64);
    let mid =
        4.0 * conv3(n, last, last) + l.mid_transformer_layers as f64 * transformer(n, last, text);
    (down + mid, up)
}

/// Work of one VAE decode of latents `h × w`.
fn vae_work(v: &VaeConfig, h: usize, w: usize) -> f64 {
    let mut n = (h * w) as f64;
    let ch = &v.block_out_channels;
    let top = *ch.last().unwrap_or(&1) as f64;
    // conv_in, the mid block (two resnets and a single-head attention).
    let mut work = conv3(n, v.latent_channels as f64, top)
        + 4.0 * conv3(n, top, top)
        + 4.0 * n * top * top
        + 2.0 * n * n * top;
    let mut cin = top;
    for (i, &c) in ch.iter().rev().enumerate() {
        let c = c as f64;
        let layers = (v.layers_per_block + 1) as f64;
        work += conv3(n, cin, c) + (2.0 * layers - 1.0) * conv3(n, c, c);
        cin = c;
        if i + 1 < ch.len() {
            n *= 4.0;
            work += conv3(n, c, c);
        }
    }
    work + conv3(n, cin, 3.0)
}

/// Work of one encoder pass over a `side × side`-ish input of `tokens` patches.
fn encoder_work(e: &Dinov2Config, tokens: usize) -> f64 {
    let n = (tokens + 1) as f64;
    let d = e.hidden_size as f64;
    let per_layer = n * d * d * (4.0 + 2.0 * e.mlp_ratio) + 2.0 * n * n * d;
    e.num_hidden_layers as f64 * per_layer
}

/// Seconds = overhead + work / rate, fitted from two timings.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Rate {
    pub overhead_s: f64,
    /// Multiply-accumulates per second.
    pub per_s: f64,
}

impl Rate {
    /// Through `(work, seconds)` at a small and a larger size. A larger
    /// size that did not take longer (timer noise) leaves all the time to
    /// the work, which overestimates rather than underestimates.
    pub fn fit(small: (f64, f64), large: (f64, f64)) -> Self {
        let (w1, t1) = small;
        let (w2, t2) = large;
        let slope = if w2 > w1 && t2 > t1 {
            (t2 - t1) / (w2 - w1)
        } else {
            t2.max(t1) / w2.max(w1).max(1.0)
        };
        let overhead = (t1 - slope * w1).max(0.0);
        Self {
            overhead_s: overhead,
            per_s: 1.0 / slope.max(1e-30),
        }
    }

    pub fn seconds(&self, work: f64) -> f64 {
        self.overhead_s + work / self.per_s
    }
}

/// The per-stage rates measured at warm-up.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CostModel {
    /// One ControlNet + UNet call, by the work of its rows.
    pub step: Rate,
    /// One VAE decode.
    pub decode: Rate,
    /// One encoder pass.
    pub encode: Rate,
}

/// A request's estimated seconds, by stage.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Estimate {
    pub total_s: f64,
    /// One denoising step of all its images.
    pub step_s: f64,
    /// One image's decode.
    pub decode_s: f64,
}

/// The work of each stage for a model, from its specs alone.
pub struct Work<'a> {
    specs: &'a ModelSpecs,
}

impl<'a> Work<'a> {
    pub fn new(specs: &'a ModelSpecs) -> Self {
        Self { specs }
    }

    fn latent(&self, width: u32, height: u32) -> (usize, usize) {
        let f = self.specs.synthesis.vae_factor.max(1);
        (height as usize / f, width as usize / f)
    }

    /// One step, one model-call row (an image without guidance).
    pub fn step_row(&self, width: u32, height: u32) -> f64 {
        let (h, w) = self.latent(width, height);
        let (down, up) = unet_work(&self.specs.synthesis.unet, h, w);
        // The UNet (down, mid, up) and the ControlNet (down, mid).
        2.0 * down + up
    }

    pub fn decode(&self, width: u32, height: u32) -> f64 {
        let (h, w) = self.latent(width, height);
        vae_work(&self.specs.synthesis.vae, h, w)
    }

    /// One encoder pass at `layout_size` (square: the most patches that size gives).
    pub fn encode(&self, layout_size: u32) -> f64 {
        let p = self.specs.layout.patch_size.max(1);
        let side = layout_size as usize / p;
        encoder_work(&self.specs.layout.encoder, side * side)
    }
}

impl CostModel {
    /// The estimate for `plan`; `encodes` is whether its guide still has to
    /// go through the encoder.
    pub fn estimate(&self, specs: &ModelSpecs, plan: &SynthesisPlan, encodes: bool) -> Estimate {
        let work = Work::new(specs);
        let s = &plan.settings;
        let rows = plan.num_images as f64 * if plan.cfg() { 2.0 } else { 1.0 };
        let step_s = self.step.seconds(rows * work.step_row(s.width, s.height));
        let decode_s = self.decode.seconds(work.decode(s.width, s.height));
        let encode_s = self.encode.seconds(work.encode(plan.layout_size));
        let scores = if plan.score {
            plan.num_images as f64
        } else {
            0.0
        };
        let encodes = if encodes { 1.0 } else { 0.0 };
        Estimate {
            total_s: (encodes + scores) * encode_s
                + s.steps as f64 * step_s
                + plan.num_images as f64 * decode_s,
            step_s,
            decode_s,
        }
    }

    /// Refuse `plan` when its estimate exceeds `budget_s`, naming what to lower.
    pub fn admit(
        &self,
        specs: &ModelSpecs,
        plan: &SynthesisPlan,
        encodes: bool,
        budget_s: f64,
        device: &str,
    ) -> Result<Estimate> {
        let e = self.estimate(specs, plan, encodes);
        if e.total_s <= budget_s {
            return Ok(e);
        }
        let s = &plan.settings;
        let mut lower = format!(
            "steps ({}), num_images ({}), width × height ({}×{})",
            s.steps, plan.num_images, s.width, s.height
        );
        if plan.cfg() {
            let _ = write!(
                lower,
                ", or guidance_scale ≤ 1 (halves each step; now {})",
                plan.guidance_scale
            );
        }
        if plan.score {
            lower.push_str(", or score (one encoder pass per image)");
        }
        Err(Error::OverBudget {
            estimate_s: e.total_s,
            budget_s,
            message: format!(
                "the estimate is {:.1} s on this device ({device}; {:.3} s a step, {:.3} s a \
                 decode) but requests must finish within {budget_s:.0} s: lower {lower}",
                e.total_s, e.step_s, e.decode_s
            ),
        })
    }
}

impl CostModel {
    /// Refuse a guide whose encoder pass at `layout_size` would take longer
    /// than `budget_s` (a layout alone, or a synthesis' guide).
    pub fn admit_layout(
        &self,
        specs: &ModelSpecs,
        layout_size: u32,
        budget_s: f64,
        device: &str,
    ) -> Result<f64> {
        let s = self.encode.seconds(Work::new(specs).encode(layout_size));
        if s <= budget_s {
            return Ok(s);
        }
        Err(Error::OverBudget {
            estimate_s: s,
            budget_s,
            message: format!(
                "the estimate is {s:.1} s on this device ({device}) for the encoder at \
                 layout_size {layout_size}, but requests must finish within {budget_s:.0} s: \
                 lower layout_size"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_through_two_points_predicts_both() {
        let r = Rate::fit((1e6, 0.011), (1e7, 0.101));
        assert!((r.seconds(1e6) - 0.011).abs() < 1e-9);
        assert!((r.seconds(1e7) - 0.101).abs() < 1e-9);
        assert!((r.overhead_s - 0.001).abs() < 1e-9);
        // Noise (the larger size was no slower) never gives a free rate.
        let r = Rate::fit((1e6, 0.05), (2e6, 0.04));
        assert!(r.seconds(4e6) >= 0.05 * 2.0 - 1e-9);
    }
}
