//! Noise schedulers for the denoising loop, ported from diffusers so that a
//! model folder's `scheduler/scheduler_config.json` gives the same timesteps
//! and the same updates as the Python pipelines:
//!
//! - [`ddim`]: `DDIMScheduler` (deterministic, eta = 0),
//! - [`euler`]: `EulerDiscreteScheduler` (s_churn = 0),
//! - [`dpm_solver`]: `DPMSolverMultistepScheduler` (DPM-Solver++ 2M and
//!   friends: solver_order 1–3).
//!
//! [`build`] mirrors `TargetClass.from_config(config)`: whichever scheduler
//! class the JSON names (SD1.5 ships a `PNDMScheduler` config), the fields the
//! target class knows are read, missing ones take that class's defaults and
//! the rest are ignored. Timestep spacing, sigma tables and step coefficients
//! are computed on the host in f64 from the float32 tables diffusers keeps;
//! tensor arithmetic uses candle ops, so samples can live on any device.

mod common;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;

use candle_core::Tensor;

use crate::error::{Error, Result};

pub use ddim::DdimScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;

/// Which scheduler drives the denoising loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SchedulerKind {
    /// `DDIMScheduler`, CLI name "ddim".
    #[serde(rename = "ddim")]
    Ddim,
    /// `EulerDiscreteScheduler`, CLI name "euler".
    #[serde(rename = "euler")]
    Euler,
    /// `DPMSolverMultistepScheduler`, CLI name "dpmpp-2m".
    #[serde(rename = "dpmpp-2m")]
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// Every kind, in CLI order.
    pub const ALL: [SchedulerKind; 3] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// Parses a CLI/API name: "ddim", "euler" or "dpmpp-2m".
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                Error::param(
                    "scheduler",
                    format!("unknown scheduler {name:?}, expected one of ddim, euler, dpmpp-2m"),
                )
            })
    }

    /// The CLI/API name.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::DpmSolverMultistep => "dpmpp-2m",
        }
    }

    /// The kind whose diffusers class is `class` (a config's `_class_name`).
    pub fn from_class_name(class: &str) -> Option<Self> {
        match class {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmSolverMultistep),
            _ => None,
        }
    }

    /// The diffusers class this kind mirrors.
    pub fn class_name(&self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// A scheduler after diffusers' `set_timesteps(num_inference_steps)`.
pub trait Scheduler: Send {
    /// The denoising loop's timesteps in order, exactly as diffusers'
    /// `scheduler.timesteps` (as f64; Euler's may be fractional).
    fn timesteps(&self) -> &[f64];

    /// diffusers' `init_noise_sigma`: the initial latent noise is scaled by it.
    fn init_noise_sigma(&self) -> f64;

    /// diffusers' `scale_model_input(sample, timesteps[step_index])`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// diffusers' `step(model_output, timesteps[step_index], sample).prev_sample`.
    /// Called once per step, in order, step_index = 0, 1, 2, ...
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor)
        -> Result<Tensor>;

    /// diffusers' `pred_original_sample` of the last [`Scheduler::step`]:
    /// the clean latents the model predicts (previews), `None` before the
    /// first step.
    fn predicted_original(&self) -> Option<&Tensor>;
}

/// Builds a scheduler of `kind` from a diffusers `scheduler_config.json`
/// (of any scheduler class) as `DiffusersClass.from_config(config)` followed
/// by `set_timesteps(num_inference_steps)` would. `file` names the config in
/// errors.
///
/// Errors: `Error::param("steps", ..)` when `num_inference_steps` is 0 or
/// above `num_train_timesteps`; `Error::model_file(file, "unsupported
/// <field>: ..")` for options this port does not implement.
pub fn build(
    kind: SchedulerKind,
    config: &serde_json::Value,
    num_inference_steps: usize,
    file: &str,
) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps, file)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(
            config,
            num_inference_steps,
            file,
        )?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            config,
            num_inference_steps,
            file,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::parse(kind.name()).unwrap(), kind);
            assert_eq!(
                SchedulerKind::from_class_name(kind.class_name()),
                Some(kind)
            );
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
        }
        assert!(SchedulerKind::parse("pndm").is_err());
        assert_eq!(SchedulerKind::from_class_name("PNDMScheduler"), None);
    }
}
