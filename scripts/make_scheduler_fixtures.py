"""Reference trajectories for lumen's noise schedulers (src/models/schedulers/).

Dev-only: needs torch + diffusers (0.42.x) + numpy, none of which lumen itself
uses.  Run from the repository root:

    /root/venv/bin/python scripts/make_scheduler_fixtures.py

It writes two files that tests/schedulers.rs compares against:

* tests/fixtures/reference/schedulers.json — a manifest.  ``cases`` maps a case
  name to ``{kind, steps, config, timesteps, init_noise_sigma}``; each of those
  has a trajectory in the safetensors file.  ``timestep_cases`` is a list of
  ``{kind, steps, config, timesteps, init_noise_sigma}`` entries checked for the
  schedule only (no trajectory), to cover many step counts cheaply.
* tests/fixtures/reference/schedulers.safetensors — per trajectory case:
    ``<case>.x0``        fixed N(0, 1) noise, shape [1, 4, 3, 5], float32;
    ``<case>.eps.<i>``   the fixed N(0, 1) "model output" base of step i;
    ``<case>.scaled.<i>`` ``scale_model_input(x, t_i)``;
    ``<case>.x.<i>``     the sample after step i (``step(...).prev_sample``).

The recurrence, reproduced by the Rust test with its own scaled inputs:

    x = x0 * init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        model_output = eps_i + 0.1 * scaled
        x = scheduler.step(model_output, t, x).prev_sample

Each scheduler is built with ``Class.from_config(config)``, i.e. the way a
pipeline turns a model folder's ``scheduler/scheduler_config.json`` (whatever
class it names) into the scheduler the user asked for.
"""

import json
import os

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "reference")
SHAPE = (1, 4, 3, 5)

CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}

# Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDM config).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

SCALED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# (name, kind, config, steps)
TRAJECTORIES = [
    ("sd15_ddim", "ddim", SD15, 6),
    ("sd15_euler", "euler", SD15, 6),
    ("sd15_dpm", "dpmpp-2m", SD15, 6),
    # Every DDIM default: linear betas, leading spacing, clip_sample=True,
    # set_alpha_to_one=True.
    ("ddim_defaults_clip", "ddim", {"_class_name": "DDIMScheduler"}, 5),
    (
        "ddim_trailing_v",
        "ddim",
        {
            **SCALED,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "clip_sample": False,
            "set_alpha_to_one": False,
        },
        4,
    ),
    (
        "ddim_linspace_zsnr_v",
        "ddim",
        {
            "beta_schedule": "linear",
            "prediction_type": "v_prediction",
            "timestep_spacing": "linspace",
            "steps_offset": 1,
            "rescale_betas_zero_snr": True,
            "clip_sample": True,
            "clip_sample_range": 2.0,
        },
        7,
    ),
    (
        "ddim_sample_pred",
        "ddim",
        {**SCALED, "prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample": False},
        4,
    ),
    (
        "euler_leading_v",
        "euler",
        {**SCALED, "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1},
        5,
    ),
    ("euler_trailing_linear", "euler", {"beta_schedule": "linear", "timestep_spacing": "trailing"}, 7),
    ("euler_karras", "euler", {**SCALED, "use_karras_sigmas": True}, 8),
    (
        "euler_continuous_v_sigma_min",
        "euler",
        {
            **SCALED,
            "prediction_type": "v_prediction",
            "timestep_type": "continuous",
            "final_sigmas_type": "sigma_min",
        },
        4,
    ),
    (
        "dpm_leading_v",
        "dpmpp-2m",
        {**SCALED, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
        8,
    ),
    (
        "dpm_trailing_heun",
        "dpmpp-2m",
        {"beta_schedule": "linear", "timestep_spacing": "trailing", "solver_type": "heun"},
        7,
    ),
    ("dpm_order1_sample", "dpmpp-2m", {**SCALED, "solver_order": 1, "prediction_type": "sample"}, 5),
    ("dpm_order3", "dpmpp-2m", {**SCALED, "solver_order": 3}, 8),
    ("dpm_karras", "dpmpp-2m", {**SCALED, "use_karras_sigmas": True}, 8),
    (
        "dpm_cosine_order3_16",
        "dpmpp-2m",
        {
            "beta_schedule": "squaredcos_cap_v2",
            "solver_order": 3,
            "final_sigmas_type": "sigma_min",
            "lambda_min_clipped": -5.1,
        },
        16,
    ),
    (
        "dpm_euler_at_final_16",
        "dpmpp-2m",
        {**SCALED, "euler_at_final": True, "final_sigmas_type": "sigma_min", "lower_order_final": False},
        16,
    ),
]


def build(kind, config, steps):
    scheduler = CLASSES[kind].from_config(dict(config))
    scheduler.set_timesteps(steps)
    return scheduler


def init_sigma(scheduler):
    return float(scheduler.init_noise_sigma)


def randn(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def trajectory(index, name, kind, config, steps, tensors):
    scheduler = build(kind, config, steps)
    sigma0 = init_sigma(scheduler)
    x0 = randn(10_000 + index)
    tensors[f"{name}.x0"] = x0
    x = x0 * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        eps = randn(20_000 + 100 * index + i)
        x = scheduler.step(eps + 0.1 * scaled, t, x).prev_sample
        tensors[f"{name}.eps.{i}"] = eps
        tensors[f"{name}.scaled.{i}"] = scaled.detach().clone()
        tensors[f"{name}.x.{i}"] = x.detach().clone()
    return {
        "kind": kind,
        "steps": steps,
        "config": config,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "init_noise_sigma": sigma0,
    }


def timestep_cases():
    out = []
    for kind in CLASSES:
        for spacing in ("leading", "trailing", "linspace"):
            config = {**SCALED, "timestep_spacing": spacing, "steps_offset": 1}
            counts = [1, 2, 3, 25, 61, 103, 1000]
            for steps in counts:
                out.append((kind, config, steps))
        if kind != "ddim":
            for steps in (1, 3, 30, 61):
                out.append((kind, {**SCALED, "use_karras_sigmas": True}, steps))
    out.append(("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 20))
    out.append(("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 25))
    out.append(("euler", {**SCALED, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 10))
    # sigma_min / sigma_max are not DPMSolverMultistepScheduler parameters, but
    # from_config keeps them in the config and its Karras conversion reads them.
    out.append(("dpmpp-2m", {**SCALED, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 10))
    result = []
    for kind, config, steps in out:
        scheduler = build(kind, config, steps)
        entry = {
            "kind": kind,
            "steps": steps,
            "config": config,
            "timesteps": [float(t) for t in scheduler.timesteps],
            "init_noise_sigma": init_sigma(scheduler),
        }
        # DDIM indexes alphas_cumprod with the timestep itself: trailing
        # spacing can end on -1 (numpy's arange yields one value too many for
        # e.g. 61 steps) and leading spacing with steps_offset=1 at 1000 steps
        # reaches 1000. diffusers then wraps around (-1 -> 999, a ~15x blow-up
        # of the final sample) or raises IndexError; lumen refuses the step
        # count instead, so the test expects Error::param("steps").
        if kind == "ddim":
            n_train = scheduler.config.num_train_timesteps
            if any(t < 0 or t >= n_train for t in entry["timesteps"]):
                entry["error"] = "steps"
        result.append(entry)
    return result


def main():
    tensors = {}
    cases = {}
    for index, (name, kind, config, steps) in enumerate(TRAJECTORIES):
        cases[name] = trajectory(index, name, kind, config, steps, tensors)
    manifest = {"shape": list(SHAPE), "cases": cases, "timestep_cases": timestep_cases()}
    os.makedirs(OUT_DIR, exist_ok=True)
    tensor_path = os.path.join(OUT_DIR, "schedulers.safetensors")
    save_file(tensors, tensor_path)
    os.chmod(tensor_path, 0o644)  # safetensors writes 0600
    with open(os.path.join(OUT_DIR, "schedulers.json"), "w") as f:
        json.dump(manifest, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} trajectories, {len(manifest['timestep_cases'])} schedules, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
