#!/usr/bin/env python3
"""FLOPs of one LUMEN ControlNet training sample at SD1.5 size, counted by
torch.utils.flop_counter on random weights (SD1.5's exact UNet, VAE and
CLIP-L configs from make_big_models.py; no download): VAE encode, text
encoder, ControlNet forward and backward (weight and input gradients), UNet
forward and backward to its inputs (frozen: no weight gradients). Prints the
total and, as an estimate, GPU-hours per 10k steps at a stated batch size,
peak throughput and utilisation.

Usage: python scripts/train_cost.py [--resolution 512] [--kmax 64] [--batch 8]
       [--peak-tflops 312] [--utilisation 0.4]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_big_models import CLIP_L_TEXT, UNET_SD15, VAE_SD15  # the SD1.5 configs


def count(fn) -> int:
    with FlopCounterMode(display=False) as m:
        fn()
    return m.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--kmax", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=312.0, help="A100 bf16 dense")
    p.add_argument("--utilisation", type=float, default=0.4)
    a = p.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_SD15).eval().requires_grad_(False)
    vae = AutoencoderKL(**{k: v for k, v in VAE_SD15.items() if k != "scaling_factor"}).eval()
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=a.kmax).train()
    r, f = a.resolution, 8
    pixels = torch.randn(1, 3, r, r)
    cond = torch.randn(1, a.kmax, r, r)
    ids = torch.randint(0, 1000, (1, 77))
    latents = torch.randn(1, 4, r // f, r // f)
    t = torch.tensor([500])
    with torch.no_grad():
        vae_flops = count(lambda: vae.encode(pixels).latent_dist.mean)
        text_flops = count(lambda: text(ids)[0])
        emb = text(ids)[0]

    def step():
        noisy = latents.clone().requires_grad_(False)
        down, mid = controlnet(noisy, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        out = unet(noisy, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        out.float().pow(2).mean().backward()

    train_flops = count(step)
    total = vae_flops + text_flops + train_flops
    steps = 10_000
    seconds = total * a.batch * steps / (a.peak_tflops * 1e12 * a.utilisation)
    print(json.dumps({
        "resolution": r, "kmax": a.kmax,
        "tflops_per_sample": {"vae_encode": round(vae_flops / 1e12, 3), "text_encoder": round(text_flops / 1e12, 4),
                              "controlnet_and_unet_fwd_bwd": round(train_flops / 1e12, 3),
                              "total": round(total / 1e12, 3)},
        "estimate": {"batch": a.batch, "steps": steps, "peak_tflops": a.peak_tflops,
                     "utilisation": a.utilisation, "gpu_hours": round(seconds / 3600, 1)},
    }, indent=2))


if __name__ == "__main__":
    main()
