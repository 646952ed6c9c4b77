//! DPM-Solver++ multistep (Lu et al. 2022), mirroring diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`: the
//! model output is converted to a data prediction x0 at every step and the
//! last `solver_order` of those drive an exponential-integrator update in
//! log-SNR time. With the defaults (`solver_order` 2, `solver_type`
//! "midpoint") this is the "DPM++ 2M" sampler; `use_karras_sigmas` gives
//! "DPM++ 2M Karras".
//!
//! Config fields read (with `DPMSolverMultistepScheduler`'s defaults):
//! `num_train_timesteps` (1000), `beta_start` (0.0001), `beta_end` (0.02),
//! `beta_schedule` ("linear"), `trained_betas` (must be null), `solver_order`
//! (2; 1, 2 and 3 are implemented), `prediction_type` ("epsilon"; also
//! "v_prediction", "sample"), `thresholding` (must be false), `algorithm_type`
//! ("dpmsolver++"; "deis" maps to it as in diffusers), `solver_type`
//! ("midpoint" or "heun"; "logrho"/"bh1"/"bh2" map to midpoint),
//! `lower_order_final` (true), `euler_at_final` (false), `use_karras_sigmas`
//! (false) with `sigma_min` / `sigma_max` when the config has them,
//! `use_exponential_sigmas` / `use_beta_sigmas` / `use_lu_lambdas` /
//! `use_flow_sigmas` (must be false), `final_sigmas_type` ("zero" or
//! "sigma_min"), `lambda_min_clipped` (-inf), `variance_type` (null; the
//! "learned" variants are rejected), `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `rescale_betas_zero_snr` (false).
//!
//! The multistep history (previous x0 predictions) lives in the scheduler,
//! hence `step(&mut self, ..)`; it must be called with step_index 0, 1, 2, ..
//! (index 0 starts a fresh trajectory).

use candle_core::Tensor;
use serde_json::Value;

use super::common::{
    as_f32, check_index, check_steps, karras_sigmas, lin_comb, np_interp, np_linspace, sigma_to_t,
    trailing, BetaSchedule, Prediction, Spacing, TrainSchedule,
};
use super::Scheduler;
use crate::error::{Error, Result};
use crate::model_folder::DiffusersConfig;

/// `solver_type` of the second-order update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++) after `set_timesteps`.
#[derive(Clone, Debug)]
pub struct DpmSolverMultistepScheduler {
    timesteps: Vec<f64>,
    /// One sigma per timestep plus the final one (float32 like diffusers).
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last `solver_order` data predictions, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    next_index: usize,
}

/// alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a noise level
/// `sigma` (diffusers' `_sigma_to_alpha_sigma_t`); lambda is +inf at sigma 0.
fn alpha_sigma_lambda(sigma: f32) -> (f64, f64, f64) {
    let sigma = sigma as f64;
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)` + `set_timesteps(num_inference_steps)`.
    pub fn new(config: &Value, num_inference_steps: usize, file: &str) -> Result<Self> {
        let cfg = DiffusersConfig::new(config.clone(), file)?;
        let train = TrainSchedule::read(&cfg, true)?;
        let prediction = match cfg.str_or("prediction_type", "epsilon")? {
            "flow_prediction" => {
                return Err(cfg.unsupported(
                    "prediction_type",
                    "\"flow_prediction\" (expected epsilon, v_prediction or sample)",
                ))
            }
            _ => Prediction::read(&cfg, false)?,
        };
        let spacing = Spacing::read(&cfg, "linspace")?;
        let solver_order = cfg.i64_or("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(cfg.unsupported(
                "solver_order",
                format!("{solver_order} (expected 1, 2 or 3)"),
            ));
        }
        let solver_order = solver_order as usize;
        cfg.reject_true("thresholding")?;
        match cfg.str_or("algorithm_type", "dpmsolver++")? {
            "dpmsolver++" | "deis" => {}
            other => {
                return Err(cfg.unsupported(
                    "algorithm_type",
                    format!("{other:?} (only dpmsolver++ is implemented)"),
                ))
            }
        }
        let solver_type = match cfg.str_or("solver_type", "midpoint")? {
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(cfg.unsupported(
                    "solver_type",
                    format!("{other:?} (expected midpoint or heun)"),
                ))
            }
        };
        let lower_order_final = cfg.bool_or("lower_order_final", true)?;
        let euler_at_final = cfg.bool_or("euler_at_final", false)?;
        let karras = cfg.bool_or("use_karras_sigmas", false)?;
        for field in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ] {
            cfg.reject_true(field)?;
        }
        let final_sigma_zero = match cfg.str_or("final_sigmas_type", "zero")? {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(cfg.unsupported(
                    "final_sigmas_type",
                    format!("{other:?} (expected zero or sigma_min)"),
                ))
            }
        };
        let lambda_min_clipped = cfg
            .opt_f64("lambda_min_clipped")?
            .unwrap_or(f64::NEG_INFINITY);
        if let Some(Value::String(v)) = cfg.get("variance_type") {
            if v == "learned" || v == "learned_range" {
                return Err(cfg.unsupported(
                    "variance_type",
                    format!("{v:?} (learned-variance model outputs are not implemented)"),
                ));
            }
        }
        let steps_offset = cfg.i64_or("steps_offset", 0)?;
        // Not DPMSolverMultistepScheduler parameters, but from_config keeps
        // them in the config and the Karras ramp reads them when present.
        let sigma_min = cfg.opt_f64("sigma_min")?;
        let sigma_max = cfg.opt_f64("sigma_max")?;

        let n_train = train.num_train_timesteps;
        let n = num_inference_steps;
        check_steps(n, n_train)?;

        // Timesteps whose log-SNR falls below lambda_min_clipped are cut off
        // the top of the range.
        let clipped = train
            .alphas_cumprod
            .iter()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0f32 - a).sqrt().ln();
                (lambda as f64) < lambda_min_clipped
            })
            .count();
        let last_timestep = n_train - clipped;
        let spaced: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio) as f64 + steps_offset as f64)
                    .collect()
            }
            Spacing::Trailing => trailing(last_timestep as f64, n_train as f64 / n as f64),
        };

        let table = train.sigmas();
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f64>) = if karras {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let lo = sigma_min.unwrap_or(table[0] as f64);
            let hi = sigma_max.unwrap_or(table[table.len() - 1] as f64);
            let ks = karras_sigmas(lo, hi, n);
            let round = train.beta_schedule != BetaSchedule::SquaredcosCapV2;
            let ts = ks
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // Rounded, then cast to int64 (which truncates).
                    if round {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            (ts, ks)
        } else {
            let table64: Vec<f64> = table.iter().map(|&s| s as f64).collect();
            let sig = spaced.iter().map(|&t| np_interp(t, &table64)).collect();
            (spaced, sig)
        };
        sigmas.push(if final_sigma_zero {
            0.0
        } else {
            let a0 = train.alphas_cumprod[0];
            ((1.0f32 - a0) / a0).sqrt() as f64
        });
        Ok(DpmSolverMultistepScheduler {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            solver_order,
            solver_type,
            lower_order_final,
            euler_at_final,
            final_sigma_zero,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            next_index: 0,
        })
    }

    /// The sigmas (one per timestep, then the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `convert_model_output` for dpmsolver++: the x0 prediction.
    fn data_prediction(&self, output: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma_t, _) = alpha_sigma_lambda(self.sigmas[index]);
        match self.prediction {
            Prediction::Epsilon => lin_comb(&[(1.0 / alpha, sample), (-sigma_t / alpha, output)]),
            Prediction::Sample => Ok(output.clone()),
            Prediction::Velocity => lin_comb(&[(alpha, sample), (-sigma_t, output)]),
        }
    }

    /// The stored x0 prediction `back` steps ago (0 = this step).
    fn history(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - 1 - back]
            .as_ref()
            .ok_or_else(|| Error::Internal("DPM-Solver history is missing a step".into()))
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        check_index(step_index, len)?;
        if step_index == 0 {
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.lower_order_nums = 0;
        } else if step_index != self.next_index {
            return Err(Error::Internal(format!(
                "DPM-Solver steps must run in order: expected step {}, got {step_index}",
                self.next_index
            )));
        }
        let i = step_index;
        let short = self.lower_order_final && len < 15;
        let lower_final = i == len - 1 && (self.euler_at_final || short || self.final_sigma_zero);
        let lower_second = len >= 2 && i == len - 2 && short;

        let out_dtype = model_output.dtype();
        let sample = as_f32(sample)?;
        let x0 = self.data_prediction(&as_f32(model_output)?, &sample, i)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));

        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        // exp(-h) - 1, shared by every order (-1 when the target sigma is 0).
        let em1 = (-h).exp() - 1.0;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = -alpha_t * em1;
        let m0 = self.history(0)?;

        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_second {
            2
        } else {
            3
        };
        let prev = match order {
            1 => lin_comb(&[(c_sample, &sample), (c_d0, m0)])?,
            2 => {
                let m1 = self.history(1)?;
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = ((m0 - m1)? * (1.0 / r0))?;
                let c_d1 = match self.solver_type {
                    SolverType::Midpoint => -0.5 * alpha_t * em1,
                    SolverType::Heun => alpha_t * (em1 / h + 1.0),
                };
                lin_comb(&[(c_sample, &sample), (c_d0, m0), (c_d1, &d1)])?
            }
            _ => {
                let m1 = self.history(1)?;
                let m2 = self.history(2)?;
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
                let (_, _, lambda_s2) = alpha_sigma_lambda(self.sigmas[i - 2]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let r1 = (lambda_s1 - lambda_s2) / h;
                let d1_0 = ((m0 - m1)? * (1.0 / r0))?;
                let d1_1 = ((m1 - m2)? * (1.0 / r1))?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = lin_comb(&[(1.0, &d1_0), (r0 / (r0 + r1), &diff)])?;
                let d2 = (diff * (1.0 / (r0 + r1)))?;
                let c_d1 = alpha_t * (em1 / h + 1.0);
                let c_d2 = -alpha_t * ((em1 + h) / (h * h) - 0.5);
                lin_comb(&[(c_sample, &sample), (c_d0, m0), (c_d1, &d1), (c_d2, &d2)])?
            }
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index = i + 1;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn predicted_original(&self) -> Option<&Tensor> {
        self.model_outputs.last().and_then(Option::as_ref)
    }
}
