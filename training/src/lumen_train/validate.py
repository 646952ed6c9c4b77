"""Validation images during training: a few guides of the training set, each
synthesized at a few K, written as one PNG grid per step
(`OUT/validation/step-NNNNNN.png`: a row per guide, the guide first, then one
image per K). The loop is diffusers' ControlNet loop (DDIM, guidance 7.5 with
the caption, seeded latents)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from lumen_train.conditioning import conditioning, truncate
from lumen_train.data import Samples

GUIDES = 3


def ks_for(kmax: int) -> list[int]:
    return sorted({1, max(1, kmax // 4), max(1, kmax // 2), kmax})


@torch.no_grad()
def synthesize(frozen, controlnet, cond: torch.Tensor, caption: str, steps: int, seed: int) -> np.ndarray:
    """One image [H, W, 3] uint8 for conditioning [Kmax, H, W]."""
    device, dtype = frozen.unet.device, frozen.unet.dtype
    sched = DDIMScheduler.from_config(frozen.scheduler.config)
    sched.set_timesteps(steps)
    h, w = cond.shape[1:]
    f = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frozen.unet.config.in_channels, h // f, w // f, generator=g).to(device, dtype)
    x = x * sched.init_noise_sigma
    ids = frozen.tokenize(["", caption]).to(device)
    text = frozen.text_encoder(ids)[0]
    control = cond[None].repeat(2, 1, 1, 1).to(device, dtype)
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        down, mid = controlnet(
            inp,
            t,
            encoder_hidden_states=text,
            controlnet_cond=control.to(controlnet.dtype),
            return_dict=False,
        )
        eps = frozen.unet(
            inp,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[d.to(dtype) for d in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample
        u, c = eps.chunk(2)
        x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
    shift = frozen.vae.config.get("shift_factor") or 0.0
    img = frozen.vae.decode(x / frozen.vae.config.scaling_factor + shift).sample
    img = ((img[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


def validation_grid(frozen, controlnet, samples: Samples, o, step: int) -> Path:
    was_training = controlnet.training
    controlnet.eval()
    export = samples.export
    rows = []
    for i in range(min(GUIDES, len(export.rows))):
        w, h = samples.sizes[i]
        row = export.rows[i]
        guide = np.asarray(Image.open(samples.images / row.source).convert("RGB").resize((w, h)))
        cond = conditioning(export.layout(i), export.kmax, h, w)
        cells = [guide] + [
            synthesize(frozen, controlnet, truncate(cond, k), row.caption, o.validation_steps, o.seed)
            for k in ks_for(export.kmax)
        ]
        height = max(c.shape[0] for c in cells)
        rows.append(np.concatenate([np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0))) for c in cells], 1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], 0)
    out = o.output / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    controlnet.train(was_training)
    return out
