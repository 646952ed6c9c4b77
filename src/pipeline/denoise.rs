//! The denoising loop, one step at a time. A [`Denoising`] owns one batch
//! of images in flight: their conditioning (text embeddings, layout,
//! guidance, control scale), their latents and their scheduler's state.
//! [`SynthesisModel::step`] advances any number of them by one step with
//! one ControlNet + UNet call, as long as they share a latent size: their
//! steps, timesteps, schedulers, guidance (on or off) and control scales may
//! all differ. This is what lets the server admit a new request between two
//! steps of a long one.
//!
//! On the CPU, every kernel gives a row the same bits whatever its
//! neighbours in the batch (see `models::cpu_conv`, and the per-row time
//! embedding in `models::unet_blocks`), so an image is bit-identical alone
//! or stepped beside others.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::models::schedulers::Scheduler;
use crate::pipeline::synthesis::{SynthesisItem, SynthesisModel, SynthesisSettings};

/// One image's conditioning, on the model's device.
struct ItemCond {
    /// Whether the unconditional pass runs (guidance above 1).
    cfg: bool,
    /// `[2, L, D]` (negative, positive) with guidance, else `[1, L, D]`.
    text: Tensor,
    /// The ControlNet input `[1, K, H, W]`.
    control: Tensor,
    control_scale: f32,
    /// The guidance scale as a `[1, 1, 1, 1]` tensor in the model's dtype.
    guidance: Tensor,
}

/// A batch of images being denoised: settings shared, conditioning per image.
pub struct Denoising {
    settings: SynthesisSettings,
    scheduler: Box<dyn Scheduler>,
    timesteps: Vec<f64>,
    /// The latents `[n, C, h, w]`, in the model's dtype.
    x: Tensor,
    items: Vec<ItemCond>,
    /// Steps done.
    step: usize,
}

impl Denoising {
    /// Check the items, encode their prompts and layouts, draw (or take)
    /// their initial latents and build the scheduler: ready for step 0.
    pub fn new(
        model: &SynthesisModel,
        s: &SynthesisSettings,
        items: &[SynthesisItem],
    ) -> Result<Self> {
        if items.is_empty() {
            return Err(Error::Internal("a generation with no image".into()));
        }
        model.check_batch(s, items)?;
        let scheduler = model.spec().scheduler(s.scheduler, s.steps)?;
        let device = model.device();
        let dtype = model.dtype();
        let conds = items
            .iter()
            .map(|it| {
                let cfg = it.guidance > 1.0;
                Ok(ItemCond {
                    cfg,
                    text: model.text_embeddings(&it.prompt, &it.negative_prompt, cfg)?,
                    control: model.conditioning(&it.layout, s.width, s.height)?,
                    control_scale: it.control_scale as f32,
                    guidance: Tensor::from_vec(vec![it.guidance as f32], (1, 1, 1, 1), device)?
                        .to_dtype(dtype)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let init = items
            .iter()
            .map(|it| match &it.latents {
                Some(l) => Ok(l.clone()),
                None => model.seeded_latents(s, it.seed),
            })
            .collect::<Result<Vec<_>>>()?;
        let x = (Tensor::cat(&init, 0)?.to_device(device)?.to_dtype(dtype)?
            * scheduler.init_noise_sigma())?;
        Ok(Self {
            settings: s.clone(),
            timesteps: scheduler.timesteps().to_vec(),
            scheduler,
            x,
            items: conds,
            step: 0,
        })
    }

    pub fn settings(&self) -> &SynthesisSettings {
        &self.settings
    }

    /// Images in this batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Steps done so far.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// Steps in all.
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.timesteps.len()
    }

    /// `(h, w)` of the latents: batches step together only at one size.
    pub fn latent_size(&self) -> (usize, usize) {
        let d = self.x.dims();
        (d[2], d[3])
    }

    /// The latents now: `[n, C, h, w]` (the final ones once done).
    pub fn latents(&self) -> &Tensor {
        &self.x
    }

    /// The clean latents `[1, C, h, w]` the model predicts for image `i`
    /// at the last step (previews); `None` before the first step.
    pub fn predicted_original(&self, i: usize) -> Option<Tensor> {
        self.scheduler
            .predicted_original()
            .and_then(|x0| x0.narrow(0, i, 1).ok())
    }

    /// The model-call rows this batch adds at its next step: one per image,
    /// two with guidance.
    fn rows(&self) -> usize {
        self.items.iter().map(|c| if c.cfg { 2 } else { 1 }).sum()
    }
}

impl SynthesisModel {
    /// Advance every batch in `batches` by one step with one ControlNet +
    /// UNet call. They must share a latent size and none may be done.
    pub fn step(&self, batches: &mut [&mut Denoising]) -> Result<()> {
        self.step_with(batches, &mut |_, _| Ok(()))
    }

    /// [`Self::step`] with a hook that sees each batch's guided noise
    /// prediction `[n, C, h, w]` (by its index in `batches`) before the
    /// scheduler step; an error from the hook stops the step.
    pub fn step_with(
        &self,
        batches: &mut [&mut Denoising],
        on_noise_pred: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let Some(first) = batches.first() else {
            return Ok(());
        };
        let size = first.latent_size();
        if let Some(b) = batches.iter().find(|b| b.is_done()) {
            return Err(Error::Internal(format!(
                "a finished batch ({} steps) was stepped again",
                b.steps()
            )));
        }
        if batches.iter().any(|b| b.latent_size() != size) {
            return Err(Error::Internal(
                "batches of different latent sizes cannot step together".into(),
            ));
        }
        let rows: usize = batches.iter().map(|b| b.rows()).sum();
        let mut inputs = Vec::with_capacity(rows);
        let mut texts = Vec::with_capacity(rows);
        let mut controls = Vec::with_capacity(rows);
        let mut scales = Vec::with_capacity(rows);
        let mut timesteps = Vec::with_capacity(rows);
        for b in batches.iter() {
            let input = b.scheduler.scale_model_input(&b.x, b.step)?;
            let t = b.timesteps[b.step];
            for (i, c) in b.items.iter().enumerate() {
                let row = input.narrow(0, i, 1)?;
                // With guidance: the unconditional row, then the conditional one.
                for r in 0..c.text.dim(0)? {
                    inputs.push(row.clone());
                    texts.push(c.text.narrow(0, r, 1)?);
                    controls.push(c.control.clone());
                    scales.push(c.control_scale);
                    timesteps.push(t);
                }
            }
        }
        let input = Tensor::cat(&inputs, 0)?;
        let text = Tensor::cat(&texts, 0)?;
        let control = Tensor::cat(&controls, 0)?;
        let control_scale =
            Tensor::from_vec(scales, (rows, 1, 1, 1), self.device())?.to_dtype(self.dtype())?;
        let (down, mid) = self
            .controlnet
            .forward(&input, &timesteps, &text, &control)?;
        let down = down
            .iter()
            .map(|d| d.broadcast_mul(&control_scale))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = mid.broadcast_mul(&control_scale)?;
        let eps = self
            .unet
            .forward(&input, &timesteps, &text, Some(&down), Some(&mid))?;

        let mut row = 0;
        for (bi, b) in batches.iter_mut().enumerate() {
            let mut guided = Vec::with_capacity(b.items.len());
            for c in &b.items {
                if c.cfg {
                    let u = eps.narrow(0, row, 1)?;
                    let cond = eps.narrow(0, row + 1, 1)?;
                    guided.push((&u + (cond - &u)?.broadcast_mul(&c.guidance)?)?);
                    row += 2;
                } else {
                    guided.push(eps.narrow(0, row, 1)?);
                    row += 1;
                }
            }
            let eps_b = Tensor::cat(&guided, 0)?;
            on_noise_pred(bi, &eps_b)?;
            b.x = b.scheduler.step(&eps_b, b.step, &b.x)?;
            b.step += 1;
        }
        Ok(())
    }

    /// Run a batch's remaining steps; `progress(step, steps)` after each,
    /// `on_noise_pred(step, eps)` before each scheduler step.
    pub fn run_to_end(
        &self,
        d: &mut Denoising,
        progress: &mut dyn FnMut(usize, usize),
        on_noise_pred: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        while !d.is_done() {
            let step = d.step_index();
            self.step_with(&mut [&mut *d], &mut |_, eps| on_noise_pred(step, eps))?;
            progress(d.step_index(), d.steps());
        }
        Ok(())
    }

    /// Decode image `i` of a batch (its current latents).
    pub fn decode_one(&self, d: &Denoising, i: usize) -> Result<image::RgbImage> {
        self.decode(&d.latents().narrow(0, i, 1)?)
    }
}
