"""Training of the shapes model's VAE and text-to-image UNet on images drawn
from the world as they are needed (training split, seed 0: batch `b` of a run
holds images `b·B … b·B + B − 1`, so a resumed run sees the same data).

Both loops checkpoint (weights, EMA, optimizer, step) under a temporary name
and rename it, and resume from the newest checkpoint; every random draw of a
step comes from a generator seeded by (seed, step), so a resumed run is the
uninterrupted one. The finished model is written in diffusers' format into
the base folder (`vae/`, `unet/`)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lumen_train.shapes import base, world


def images(step: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` of the training split: pixels in [-1, 1] (B, 3, 64, 64) and captions."""
    drawn = [world.sample(world.TRAIN_SEED, step * batch + j) for j in range(batch)]
    pixels = np.stack([d[0] for d in drawn]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [d[1] for d in drawn]


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Run:
    """A resumable training run in `work/`: the model, its EMA, the optimizer, the step."""

    def __init__(self, work: Path, model: torch.nn.Module, lr: float, ema_decay: float | None):
        self.work, self.model = work, model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
        self.ema_decay = ema_decay or 0.0
        self.step = 0
        self.seconds = 0.0
        ckpt = work / "checkpoint.pt"
        if ckpt.is_file():
            state = torch.load(ckpt, weights_only=True)
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.step, self.seconds = state["step"], state["seconds"]
            print(f"resumed {work} at step {self.step}", flush=True)

    def update(self, loss: torch.Tensor, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if self.ema is not None:
            decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        self.step += 1

    def save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        tmp = self.work / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.rename(self.work / "checkpoint.pt")

    def final(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.model


def loop(run: Run, steps: int, lr: float, every: int, loss_at, log_every: int = 50) -> None:
    """Steps until `steps`, checkpointing every `every` steps and at the end."""
    run.model.train()
    recent: list[float] = []
    while run.step < steps:
        started = time.perf_counter()
        loss = loss_at(run.step, torch.Generator().manual_seed(1_000_003 * run.step + 17))
        run.update(loss, lr_at(run.step, steps, lr))
        run.seconds += time.perf_counter() - started
        recent.append(float(loss.detach()))
        if run.step % log_every == 0 or run.step == steps:
            print(
                json.dumps(
                    {
                        "step": run.step,
                        "loss": round(sum(recent) / len(recent), 5),
                        "seconds": round(run.seconds, 1),
                    }
                ),
                flush=True,
            )
            recent.clear()
        if run.step % every == 0 or run.step == steps:
            run.save()


def save_model(model, folder: Path, extra: dict | None = None) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if extra:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.update(extra)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train_vae(models: Path, work: Path, steps: int, batch: int, lr: float, every: int) -> dict:
    """AutoencoderKL: L1 + MSE reconstruction and a small KL term; the latent
    scaling factor is measured afterwards (1 / std of latents, as SD did)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**base.VAE)
    run = Run(work, vae, lr, ema_decay=None)

    def loss_at(step, gen):
        x, _ = images(step, batch)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        r = vae.decode(z).sample
        kl = dist.kl().mean() / x[0].numel()
        return F.l1_loss(r, x) + F.mse_loss(r, x) + 1e-4 * kl

    loop(run, steps, lr, every, loss_at)
    vae.eval()
    with torch.no_grad():
        x, _ = images(10_000_000, 256)
        z = vae.encode(x).latent_dist.mean
        scale = float(1.0 / z.std())
        r = vae.decode(z).sample
        err = float((r - x).abs().mean() * 127.5)
    save_model(vae, models / "vae", {"scaling_factor": scale})
    return {
        "vae_steps": run.step,
        "vae_seconds": round(run.seconds, 1),
        "scaling_factor": scale,
        "vae_mean_abs_error_255": round(err, 3),
    }


def train_unet(
    models: Path, work: Path, steps: int, batch: int, lr: float, every: int, caption_dropout: float = 0.1
) -> dict:
    """Text-to-image UNet (epsilon or v-prediction, from the scheduler config)
    on VAE latents, frozen text encoder, captions dropped with probability
    `caption_dropout` so that classifier-free guidance works; EMA weights saved."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(models / "vae").eval().requires_grad_(False)
    text = CLIPTextModel.from_pretrained(models / "text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(models / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(models / "scheduler")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**base.UNET)
    run = Run(work, unet, lr, ema_decay=0.999)
    max_len = min(tokenizer.model_max_length, text.config.max_position_embeddings)

    def loss_at(step, gen):
        x, captions = images(step, batch)
        keep = torch.rand(batch, generator=gen) >= caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
            z = z * vae.config.scaling_factor
            ids = tokenizer(
                captions, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
            ).input_ids
            cond = text(ids)[0]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(z, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        v = scheduler.config.prediction_type == "v_prediction"
        target = scheduler.get_velocity(z, noise, t) if v else noise
        return F.mse_loss(pred, target)

    loop(run, steps, lr, every, loss_at)
    save_model(run.final(), models / "unet")
    return {"unet_steps": run.step, "unet_seconds": round(run.seconds, 1)}
