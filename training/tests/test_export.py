"""The trained folder is a lumen model folder: lumen serves it, and gives the
image diffusers' ControlNet pipeline gives on the same folder and latents."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import base_args, run_lumen, train
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file


def test_exported_folder_serves_the_diffusers_image(lumen, images, layouts, tmp_path):
    out = tmp_path / "model"
    train(base_args(images, layouts, out, max_steps=5, lr=1e-3))
    for part in ["controlnet", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "encoder"]:
        assert (out / part).is_dir(), part
    assert json.loads((out / "lumen.json").read_text())["layout_size"] == 518

    guide, k, (w, h) = images / "street/a.png", 6, (64, 48)
    cond_file = tmp_path / "cond.safetensors"
    run_lumen(
        lumen,
        "layout",
        "--models",
        out,
        "--image",
        guide,
        "-k",
        k,
        "--conditioning",
        f"{w}x{h}",
        "--out",
        cond_file,
    )
    cond = load_file(str(cond_file))["conditioning"][None]
    latents = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(3))
    save_file({"latents": latents.contiguous()}, str(tmp_path / "latents.safetensors"))
    png = tmp_path / "lumen.png"
    run_lumen(
        lumen,
        "synthesize",
        "--models",
        out,
        "--image",
        guide,
        "-k",
        k,
        "--width",
        w,
        "--height",
        h,
        "--steps",
        5,
        "--scheduler",
        "ddim",
        "--prompt",
        "a quiet street",
        "--latents",
        tmp_path / "latents.safetensors",
        "--quiet",
        "--out",
        png,
    )
    ours = np.asarray(Image.open(png).convert("RGB")).astype(int)

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        out, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        prompt="a quiet street",
        image=cond,
        height=h,
        width=w,
        num_inference_steps=5,
        guidance_scale=7.5,
        latents=latents.clone(),
        output_type="np",
    ).images[0]
    theirs = (img * 255).round().astype(int)
    diff = np.abs(ours - theirs)
    print(f"lumen vs diffusers on the exported folder: max {diff.max()}/255, mean {diff.mean():.3f}")
    assert diff.max() <= 3 and diff.mean() <= 0.5
