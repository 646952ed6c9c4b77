//! One request's way through the models, written once for the CLI, the
//! local `lumen augment` engine and the server's inference thread: the
//! guide's Kmax layout is truncated to the plan's K, the plan makes one item
//! per image, a [`Denoising`] runs them step by step (alone, or stepped
//! beside other requests' by [`SynthesisModel::step`]), then the images are
//! decoded and, when the plan asks, scored against the guide's layout.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::pipeline::denoise::Denoising;
use crate::pipeline::layout::{Layout, LayoutModel};
use crate::pipeline::request::SynthesisPlan;
use crate::pipeline::score::fidelity;
use crate::pipeline::synthesis::SynthesisModel;

/// A resolved synthesis in flight.
pub struct Generation {
    plan: SynthesisPlan,
    /// The guide's layout at Kmax (images are scored against all of it).
    full: Arc<Layout>,
    denoising: Denoising,
}

/// A finished generation's images, and their scores when the plan asks.
pub struct Generated {
    pub images: Vec<RgbImage>,
    pub scores: Vec<f32>,
    /// Seconds spent decoding and scoring.
    pub decode_s: f64,
    pub score_s: f64,
}

impl Generation {
    /// Truncate the guide's Kmax layout `full` to the plan's K, make the
    /// plan's items (image 0 starting from `latents` when given) and set up
    /// their denoising.
    pub fn start(
        model: &SynthesisModel,
        plan: SynthesisPlan,
        full: Arc<Layout>,
        latents: Option<Tensor>,
    ) -> Result<Self> {
        let layout = full.truncate(plan.components)?;
        let mut items = plan.items(&layout);
        if let Some(l) = latents {
            let first = items
                .first_mut()
                .ok_or_else(|| Error::Internal("a plan with no image".into()))?;
            first.latents = Some(l);
        }
        let denoising = Denoising::new(model, &plan.settings, &items)?;
        Ok(Self {
            plan,
            full,
            denoising,
        })
    }

    pub fn plan(&self) -> &SynthesisPlan {
        &self.plan
    }

    pub fn denoising(&self) -> &Denoising {
        &self.denoising
    }

    pub fn denoising_mut(&mut self) -> &mut Denoising {
        &mut self.denoising
    }

    pub fn is_done(&self) -> bool {
        self.denoising.is_done()
    }

    /// Decode image `i` (of a finished generation).
    pub fn decode(&self, model: &SynthesisModel, i: usize) -> Result<RgbImage> {
        model.decode_one(&self.denoising, i)
    }

    /// Scores of `images` against the guide's layout, when the plan asks
    /// (else empty). Scoring needs the layout half's encoder.
    pub fn score(&self, layouts: Option<&LayoutModel>, images: &[RgbImage]) -> Result<Vec<f32>> {
        match (self.plan.score, layouts) {
            (false, _) => Ok(Vec::new()),
            (true, Some(l)) => fidelity(l, &self.full, images),
            (true, None) => Err(Error::Internal(
                "scores were asked for without the encoder loaded".into(),
            )),
        }
    }

    /// Decode every image, then score them when the plan asks.
    pub fn finish(
        &self,
        model: &SynthesisModel,
        layouts: Option<&LayoutModel>,
    ) -> Result<Generated> {
        let t = Instant::now();
        let images = (0..self.denoising.len())
            .map(|i| self.decode(model, i))
            .collect::<Result<Vec<_>>>()?;
        let decode_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let scores = self.score(layouts, &images)?;
        Ok(Generated {
            images,
            scores,
            decode_s,
            score_s: t.elapsed().as_secs_f64(),
        })
    }
}

/// Step `gens` together (one model call per step while they share a latent
/// size) until every one is done; `progress(step, steps)` after each step,
/// counted by the longest.
pub fn run_to_end(
    model: &SynthesisModel,
    gens: &mut [Generation],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let steps = gens.iter().map(|g| g.denoising.steps()).max().unwrap_or(0);
    loop {
        let mut active: Vec<&mut Denoising> = gens
            .iter_mut()
            .map(|g| &mut g.denoising)
            .filter(|d| !d.is_done())
            .collect();
        let Some(size) = active.first().map(|d| d.latent_size()) else {
            return Ok(());
        };
        active.retain(|d| d.latent_size() == size);
        model.step(&mut active)?;
        let done = gens
            .iter()
            .map(|g| g.denoising.step_index())
            .max()
            .unwrap_or(0);
        progress(done, steps);
    }
}
