//! DDIM (Song et al. 2021), mirroring diffusers' `DDIMScheduler` with
//! eta = 0 (deterministic) and `use_clipped_model_output = False`.
//!
//! Config fields read (with `DDIMScheduler`'s defaults): `num_train_timesteps`
//! (1000), `beta_start` (0.0001), `beta_end` (0.02), `beta_schedule`
//! ("linear"), `trained_betas` (must be null), `clip_sample` (**true**),
//! `clip_sample_range` (1.0), `set_alpha_to_one` (true), `steps_offset` (0),
//! `prediction_type` ("epsilon"), `thresholding` (must be false),
//! `timestep_spacing` ("leading"), `rescale_betas_zero_snr` (false).
//!
//! As in diffusers, the "previous" timestep of every step is
//! `t - num_train_timesteps // num_inference_steps` whatever the spacing, and
//! a negative one uses `final_alpha_cumprod` (1 with `set_alpha_to_one`, else
//! `alphas_cumprod[0]`).

use candle_core::Tensor;
use serde_json::Value;

use super::common::{
    as_f32, check_index, check_steps, leading, lin_comb, np_linspace, trailing, Prediction,
    Spacing, TrainSchedule,
};
use super::Scheduler;
use crate::error::{Error, Result};
use crate::model_folder::DiffusersConfig;

/// diffusers' `DDIMScheduler` after `set_timesteps`.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// Integer timesteps (indices into `alphas_cumprod`).
    steps: Vec<usize>,
    timesteps: Vec<f64>,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: usize,
    prediction: Prediction,
    /// `clip_sample_range` when `clip_sample` is on.
    clip: Option<f64>,
    /// The last step's x0 prediction.
    last_x0: Option<Tensor>,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)` + `set_timesteps(num_inference_steps)`.
    pub fn new(config: &Value, num_inference_steps: usize, file: &str) -> Result<Self> {
        let cfg = DiffusersConfig::new(config.clone(), file)?;
        let train = TrainSchedule::read(&cfg, false)?;
        let prediction = Prediction::read(&cfg, false)?;
        let spacing = Spacing::read(&cfg, "leading")?;
        cfg.reject_true("thresholding")?;
        let clip = if cfg.bool_or("clip_sample", true)? {
            Some(cfg.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        let set_alpha_to_one = cfg.bool_or("set_alpha_to_one", true)?;
        let steps_offset = cfg.i64_or("steps_offset", 0)?;

        let n_train = train.num_train_timesteps;
        let n = num_inference_steps;
        check_steps(n, n_train)?;
        let timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            Spacing::Leading => leading(n, n_train / n, steps_offset),
            Spacing::Trailing => trailing(n_train as f64, n_train as f64 / n as f64),
        };
        let steps = timesteps
            .iter()
            .map(|&t| {
                if t >= 0.0 && t < n_train as f64 {
                    Ok(t as usize)
                } else {
                    // diffusers would wrap a -1 around to the noisiest
                    // alpha (wrecking the last step) or raise IndexError.
                    Err(Error::param(
                        "steps",
                        format!(
                            "DDIM with {n} steps ({spacing:?} timestep_spacing, steps_offset \
                             {steps_offset}) reaches timestep {t}, outside the model's training \
                             range 0..{n_train}; choose another step count"
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        Ok(DdimScheduler {
            alphas_cumprod: train.alphas_cumprod,
            final_alpha_cumprod,
            steps,
            timesteps,
            step_ratio: n_train / n,
            prediction,
            clip,
            last_x0: None,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.steps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_index(step_index, self.steps.len())?;
        // In f32 whatever the model's dtype, as Euler and DPM-Solver++ (and
        // their diffusers counterparts) do; diffusers' DDIM stays in the
        // model's dtype, which in f16 rounds 1/sqrt(alpha) near t = 999.
        let out_dtype = model_output.dtype();
        let sample = &as_f32(sample)?;
        let model_output = &as_f32(model_output)?;
        let t = self.steps[step_index];
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        // Float32 like diffusers' 0-d tensors, then widened for the ops.
        let beta_t = 1.0f32 - alpha_t;
        let (sa, sb) = (alpha_t.sqrt() as f64, beta_t.sqrt() as f64);
        let sa_prev = alpha_prev.sqrt() as f64;
        let sb_prev = (1.0f32 - alpha_prev).sqrt() as f64;

        let (pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => (
                lin_comb(&[(1.0 / sa, sample), (-sb / sa, model_output)])?,
                model_output.clone(),
            ),
            Prediction::Sample => (
                model_output.clone(),
                lin_comb(&[(1.0 / sb, sample), (-sa / sb, model_output)])?,
            ),
            Prediction::Velocity => (
                lin_comb(&[(sa, sample), (-sb, model_output)])?,
                lin_comb(&[(sa, model_output), (sb, sample)])?,
            ),
        };
        let pred_x0 = match self.clip {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        let prev = lin_comb(&[(sa_prev, &pred_x0), (sb_prev, &pred_eps)])?;
        self.last_x0 = Some(pred_x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.last_x0.as_ref()
    }
}
