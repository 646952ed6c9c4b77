//! Euler sampling in sigma space (Karras et al. 2022, Algorithm 2 without
//! churn), mirroring diffusers' `EulerDiscreteScheduler` stepped with
//! `s_churn = 0` (deterministic).
//!
//! Config fields read (with `EulerDiscreteScheduler`'s defaults):
//! `num_train_timesteps` (1000), `beta_start` (0.0001), `beta_end` (0.02),
//! `beta_schedule` ("linear"), `trained_betas` (must be null),
//! `prediction_type` ("epsilon"; also "v_prediction", "sample"),
//! `interpolation_type` ("linear" only), `use_karras_sigmas` (false),
//! `use_exponential_sigmas` / `use_beta_sigmas` (must be false), `sigma_min` /
//! `sigma_max` (null; bounds of the Karras ramp), `timestep_spacing`
//! ("linspace"), `timestep_type` ("discrete"; "continuous" only changes the
//! timesteps of v-prediction models), `steps_offset` (0),
//! `rescale_betas_zero_snr` (false), `final_sigmas_type` ("zero" or
//! "sigma_min").
//!
//! Timesteps are float32 and may be fractional (linspace spacing, Karras
//! sigmas); sigmas are the training sigmas interpolated at them.

use candle_core::Tensor;
use serde_json::Value;

use super::common::{
    as_f32, check_index, check_steps, karras_sigmas, leading, lin_comb, np_interp, np_linspace,
    sigma_to_t, trailing, Prediction, Spacing, TrainSchedule,
};
use super::Scheduler;
use crate::error::Result;
use crate::model_folder::DiffusersConfig;

/// diffusers' `EulerDiscreteScheduler` after `set_timesteps`.
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final one (float32 like diffusers).
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The last step's x0 prediction.
    last_x0: Option<Tensor>,
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)` + `set_timesteps(num_inference_steps)`.
    pub fn new(config: &Value, num_inference_steps: usize, file: &str) -> Result<Self> {
        let cfg = DiffusersConfig::new(config.clone(), file)?;
        let train = TrainSchedule::read(&cfg, true)?;
        let prediction = Prediction::read(&cfg, true)?;
        let spacing = Spacing::read(&cfg, "linspace")?;
        match cfg.str_or("interpolation_type", "linear")? {
            "linear" => {}
            other => {
                return Err(cfg.unsupported(
                    "interpolation_type",
                    format!("{other:?} (only linear is implemented)"),
                ))
            }
        }
        let karras = cfg.bool_or("use_karras_sigmas", false)?;
        cfg.reject_true("use_exponential_sigmas")?;
        cfg.reject_true("use_beta_sigmas")?;
        let sigma_min = cfg.opt_f64("sigma_min")?;
        let sigma_max = cfg.opt_f64("sigma_max")?;
        let continuous = match cfg.str_or("timestep_type", "discrete")? {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(cfg.unsupported(
                    "timestep_type",
                    format!("{other:?} (expected discrete or continuous)"),
                ))
            }
        };
        let final_sigma_min = match cfg.str_or("final_sigmas_type", "zero")? {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(cfg.unsupported(
                    "final_sigmas_type",
                    format!("{other:?} (expected zero or sigma_min)"),
                ))
            }
        };
        let steps_offset = cfg.i64_or("steps_offset", 0)?;

        let n_train = train.num_train_timesteps;
        let n = num_inference_steps;
        check_steps(n, n_train)?;

        // Float32 timesteps of the chosen spacing.
        let spaced: Vec<f32> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            Spacing::Leading => leading(n, n_train / n, 0)
                .into_iter()
                .map(|t| t as f32 + steps_offset as f32)
                .collect(),
            Spacing::Trailing => trailing(n_train as f64, n_train as f64 / n as f64)
                .into_iter()
                .map(|t| t as f32)
                .collect(),
        };
        let table = train.sigmas();
        let table64: Vec<f64> = table.iter().map(|&s| s as f64).collect();
        let interp: Vec<f64> = spaced
            .iter()
            .map(|&t| np_interp(t as f64, &table64))
            .collect();
        let (mut timesteps, mut sigmas): (Vec<f32>, Vec<f64>) = if karras {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let lo = sigma_min.unwrap_or(interp[interp.len() - 1]);
            let hi = sigma_max.unwrap_or(interp[0]);
            let ks = karras_sigmas(lo, hi, n);
            let ts = ks
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
            (ts, ks)
        } else {
            (spaced, interp)
        };
        let last = if final_sigma_min {
            let a0 = train.alphas_cumprod[0];
            ((1.0f32 - a0) / a0).sqrt() as f64
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if continuous && prediction == Prediction::Velocity {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|s| 0.25f32 * s.ln())
                .collect();
        }
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        } as f64;
        Ok(EulerDiscreteScheduler {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            init_noise_sigma,
            prediction,
            last_x0: None,
        })
    }

    /// The sigmas (one per timestep, then the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let denom = (sigma * sigma + 1.0).sqrt() as f64;
        Ok((sample / denom)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let sample = as_f32(sample)?;
        let output = as_f32(model_output)?;
        // s_churn = 0, so gamma = 0 and sigma_hat = sigma.
        let sigma = self.sigmas[step_index];
        let pred_x0 = match self.prediction {
            Prediction::Epsilon => lin_comb(&[(1.0, &sample), (-(sigma as f64), &output)])?,
            Prediction::Velocity => {
                let s2 = sigma * sigma + 1.0;
                let c_out = -sigma / s2.sqrt();
                lin_comb(&[(c_out as f64, &output), (1.0 / s2 as f64, &sample)])?
            }
            Prediction::Sample => output,
        };
        let derivative = ((&sample - &pred_x0)? / sigma as f64)?;
        let dt = self.sigmas[step_index + 1] - sigma;
        let prev = lin_comb(&[(1.0, &sample), (dt as f64, &derivative)])?;
        self.last_x0 = Some(pred_x0);
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.last_x0.as_ref()
    }
}
