//! Pieces shared by the three schedulers: reading a diffusers
//! `scheduler_config.json` the way `SchedulerClass.from_config` does, the
//! training noise schedule (`betas` → `alphas_cumprod`, float32 like
//! diffusers' tensors), numpy-exact timestep spacing arithmetic
//! (`np.linspace`, `np.arange`, `np.round`, `np.interp`), the Karras sigma
//! ramp with its sigma → timestep inversion, and linear combinations of
//! tensors.
//!
//! Config fields read here: `num_train_timesteps`, `beta_start`, `beta_end`,
//! `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`,
//! `prediction_type`, `timestep_spacing`, `steps_offset`.

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model_folder::DiffusersConfig;

/// `beta_schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// The training-time noise schedule of a config.
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    /// `alphas_cumprod`, float32 as diffusers stores it.
    pub alphas_cumprod: Vec<f32>,
}

impl TrainSchedule {
    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
    /// `trained_betas` (must be absent/null) and `rescale_betas_zero_snr`.
    /// `pin_terminal`: Euler and DPM-Solver replace the last
    /// `alphas_cumprod` by 2^-24 after a zero-terminal-SNR rescale (so that
    /// sigmas stay finite); DDIM keeps the exact zero.
    pub fn read(cfg: &DiffusersConfig, pin_terminal: bool) -> Result<Self> {
        let n = cfg.i64_or("num_train_timesteps", 1000)?;
        if n < 1 {
            return Err(Error::model_file(
                cfg.file(),
                format!("num_train_timesteps must be at least 1, got {n}"),
            ));
        }
        let n = n as usize;
        if !matches!(cfg.get("trained_betas"), None | Some(Value::Null)) {
            return Err(cfg.unsupported(
                "trained_betas",
                "explicit beta arrays are not implemented; use beta_schedule",
            ));
        }
        let beta_start = cfg.f64_or("beta_start", 0.0001)?;
        let beta_end = cfg.f64_or("beta_end", 0.02)?;
        let schedule = match cfg.str_or("beta_schedule", "linear")? {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2,
            other => {
                return Err(cfg.unsupported(
                    "beta_schedule",
                    format!("{other:?} (expected linear, scaled_linear or squaredcos_cap_v2)"),
                ))
            }
        };
        let mut betas: Vec<f32> = match schedule {
            BetaSchedule::Linear => torch_linspace_f32(beta_start as f32, beta_end as f32, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
        };
        let rescale = cfg.bool_or("rescale_betas_zero_snr", false)?;
        if rescale {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod(betas.iter().map(|&b| 1.0f32 - b));
        if rescale && pin_terminal {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        Ok(TrainSchedule {
            num_train_timesteps: n,
            beta_schedule: schedule,
            alphas_cumprod,
        })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, float32, indexed by
    /// training timestep.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: float32 step,
/// the first half counted up from `start`, the second half down from `end`,
/// each value a single fused multiply-add.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Cumulative product, accumulated in f64 and stored as f32 (torch's CPU
/// `cumprod` on float32).
fn cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `squaredcos_cap_v2`: the cosine alpha-bar schedule (Nichol & Dhariwal),
/// betas capped at 0.999, computed in f64 then stored as f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_betas_zero_snr`: shift and scale sqrt(alphas_cumprod) so the last
/// one is exactly zero while the first is unchanged (Lin et al. 2023,
/// Algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cum = cumprod(betas.iter().map(|&b| 1.0f32 - b));
    let mut sqrt: Vec<f32> = cum.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for s in &mut sqrt {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0f32 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0f32 - w[1] / w[0]);
    }
    out
}

/// `prediction_type`: what the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prediction {
    /// "epsilon": the noise.
    Epsilon,
    /// "v_prediction": alpha_t * noise - sigma_t * x0.
    Velocity,
    /// "sample": x0 itself.
    Sample,
}

impl Prediction {
    /// Reads `prediction_type` (default "epsilon"); `extra_sample_alias`
    /// accepts Euler's "original_sample" spelling of "sample".
    pub fn read(cfg: &DiffusersConfig, extra_sample_alias: bool) -> Result<Self> {
        match cfg.str_or("prediction_type", "epsilon")? {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::Velocity),
            "sample" => Ok(Prediction::Sample),
            "original_sample" if extra_sample_alias => Ok(Prediction::Sample),
            other => Err(cfg.unsupported(
                "prediction_type",
                format!("{other:?} (expected epsilon, v_prediction or sample)"),
            )),
        }
    }
}

/// `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    pub fn read(cfg: &DiffusersConfig, default: &'static str) -> Result<Self> {
        match cfg.str_or("timestep_spacing", default)? {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            other => Err(cfg.unsupported(
                "timestep_spacing",
                format!("{other:?} (expected leading, trailing or linspace)"),
            )),
        }
    }
}

/// `steps` must be in 1..=num_train_timesteps.
pub(crate) fn check_steps(steps: usize, num_train_timesteps: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::param("steps", "must be at least 1"));
    }
    if steps > num_train_timesteps {
        return Err(Error::param(
            "steps",
            format!("{steps} is more than the model's num_train_timesteps ({num_train_timesteps})"),
        ));
    }
    Ok(())
}

/// `step_index` must address one of the timesteps.
pub(crate) fn check_index(step_index: usize, len: usize) -> Result<()> {
    if step_index < len {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "scheduler step index {step_index} out of range for {len} timesteps"
        )))
    }
}

/// `np.linspace(start, stop, num)` (float64, endpoint included): `i * step +
/// start` with the last value pinned to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        for v in &mut y {
            *v = if step == 0.0 {
                *v / div as f64 * delta
            } else {
                *v * step
            } + start;
        }
        y[num - 1] = stop;
    } else {
        for v in &mut y {
            *v = *v * delta + start;
        }
    }
    y
}

/// `np.arange(start, stop, step)` in float64: `ceil((stop - start) / step)`
/// values, the second one `start + step`, the rest `start + i * delta` with
/// `delta` re-derived from the first two (numpy's fill).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        out.push(second);
        let delta = second - start;
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// `np.interp(x, arange(len(fp)), fp)`: linear interpolation, clamped to the
/// end values outside the table.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// Leading spacing: `(arange(0, count) * ratio)[::-1] + offset`.
pub(crate) fn leading(count: usize, ratio: usize, offset: i64) -> Vec<f64> {
    (0..count)
        .rev()
        .map(|i| (i * ratio) as f64 + offset as f64)
        .collect()
}

/// Trailing spacing: `round(arange(start, 0, -ratio)) - 1`.
pub(crate) fn trailing(start: f64, ratio: f64) -> Vec<f64> {
    np_arange(start, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// The Karras et al. (2022) sigma ramp, rho = 7: `num` sigmas from
/// `sigma_max` down to `sigma_min`, evenly spaced in sigma^(1/7).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The (fractional) training timestep whose sigma is `sigma`, interpolating
/// linearly in log-sigma between the two neighbouring training timesteps
/// (diffusers' `_sigma_to_t`); `log_sigmas` is float32 like numpy's
/// `np.log` of the float32 sigma table.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // Index of the last log-sigma not above `log_sigma` (0 if none).
    let mut low = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(log_sigmas.len().saturating_sub(2));
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `sum(c_i * t_i)` with candle ops (works on any device); the coefficients
/// are applied in the tensors' dtype.
pub(crate) fn lin_comb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, t) in terms {
        let term = if c == 1.0 {
            t.clone()
        } else {
            t.affine(c, 0.0)?
        };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| Error::Internal("empty linear combination".into()))
}

/// Both tensors as f32 (diffusers upcasts the sample before stepping).
pub(crate) fn as_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_shape() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 1.0, 0), Vec::<f64>::new());
    }

    #[test]
    fn arange_length_is_numpy_ceil() {
        // numpy: len(np.arange(1000, 0, -1000 / 61)) == 62
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
        assert!(np_arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(np_interp(-1.0, &fp), 1.0);
        assert_eq!(np_interp(5.0, &fp), 7.0);
        assert_eq!(np_interp(1.0, &fp), 3.0);
        assert_eq!(np_interp(1.5, &fp), 5.0);
    }

    #[test]
    fn torch_linspace_endpoints() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(0.5, 1.0, 1), vec![0.5]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let betas = torch_linspace_f32(0.0001, 0.02, 1000);
        let r = rescale_zero_terminal_snr(&betas);
        assert_eq!(*r.last().unwrap(), 1.0);
        assert!((r[0] - betas[0]).abs() < 1e-6);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let logs: Vec<f32> = [0.1f32, 0.5, 1.0, 4.0].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.5, &logs) - 1.0).abs() < 1e-6);
        assert!((sigma_to_t(100.0, &logs) - 3.0).abs() < 1e-12);
        assert!(sigma_to_t(0.01, &logs).abs() < 1e-12);
    }
}
