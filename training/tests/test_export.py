"""The trained folder is a lumen model folder: lumen serves it, and gives the
image diffusers' ControlNet pipeline gives on the same folder and latents."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import SHAPES, base_args, run_lumen, train
from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file


def test_exported_folder_serves_the_diffusers_image(lumen, images, layouts, tmp_path):
    out = tmp_path / "model"
    train(base_args(images, layouts, out, max_steps=5, lr=1e-3))
    for part in ["controlnet", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "encoder"]:
        assert (out / part).is_dir(), part
    assert json.loads((out / "lumen.json").read_text())["layout_size"] == 518

    diff = lumen_vs_diffusers(lumen, out, images / "street/a.png", 6, (64, 48), "a quiet street", tmp_path)
    assert diff.max() <= 3 and diff.mean() <= 0.5


def test_shapes_model_serves_the_diffusers_image(lumen, tmp_path):
    # The committed shapes model (f16 diffusion weights), as lumen embeds it.
    diff = lumen_vs_diffusers(
        lumen,
        SHAPES,
        SHAPES.parent.parent / "tests/fixtures/images/shapes-guide.png",
        8,
        (64, 64),
        "a red triangle and a green circle",
        tmp_path,
    )
    assert diff.max() <= 3 and diff.mean() <= 0.5


def lumen_vs_diffusers(lumen, folder, guide, k, size, prompt, tmp_path) -> np.ndarray:
    """|lumen − diffusers| per pixel (0..255) for one image: same folder, guide
    conditioning (lumen's), latents, DDIM, 5 steps, guidance 7.5, and the
    folder's ControlNet scale (lumen.json `default_control_scale`, else 1),
    which lumen applies by default and diffusers is given."""
    w, h = size
    settings = json.loads((folder / "lumen.json").read_text()) if (folder / "lumen.json").is_file() else {}
    control_scale = settings.get("default_control_scale", 1.0)
    cond_file = tmp_path / "cond.safetensors"
    run_lumen(
        lumen,
        "layout",
        "--models",
        folder,
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
    vae = json.loads((folder / "vae/config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    latents = torch.randn(1, 4, h // factor, w // factor, generator=torch.Generator().manual_seed(3))
    save_file({"latents": latents.contiguous()}, str(tmp_path / "latents.safetensors"))
    png = tmp_path / "lumen.png"
    run_lumen(
        lumen,
        "synthesize",
        "--models",
        folder,
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
        "--guidance",
        7.5,
        "--scheduler",
        "ddim",
        "--prompt",
        prompt,
        "--latents",
        tmp_path / "latents.safetensors",
        "--quiet",
        "--out",
        png,
    )
    ours = np.asarray(Image.open(png).convert("RGB")).astype(int)

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        folder,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        prompt=prompt,
        image=cond,
        height=h,
        width=w,
        num_inference_steps=5,
        guidance_scale=7.5,
        controlnet_conditioning_scale=control_scale,
        latents=latents.clone(),
        output_type="np",
    ).images[0]
    theirs = (img * 255).round().astype(int)
    diff = np.abs(ours - theirs)
    print(f"lumen vs diffusers on {folder}: max {diff.max()}/255, mean {diff.mean():.3f}")
    return diff
