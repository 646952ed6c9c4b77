"""The training loop: a diffusers ControlNet made from the base UNet with
Kmax conditioning channels, trained with the base scheduler's loss (epsilon
or v-prediction) while the UNet, VAE and text encoder stay frozen; run by
accelerate (one CPU or GPU process, or many under `accelerate launch`).

Checkpoints (`OUT/checkpoints/step-NNNNNN/`) hold accelerate's state (model,
optimizer, gradient scaler, RNG) and `train_state.json` (the step, and the
wall and CPU seconds spent to reach it over every resumed run); they are written
under a temporary name and renamed, so a resumed run starts from the last
complete one. The data and the noise of micro-batch m come from (seed, m,
rank) alone, so a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lumen_train.data import ExportError, KSampler, LayoutsExport, Plan, Samples


@dataclass
class Options:
    models: Path
    data: Path
    images: Path
    output: Path
    resolution: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    max_steps: int = 1000
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    resume: bool = False
    validate_every: int = 0
    validation_steps: int = 20
    k_distribution: str = "uniform"
    caption_dropout: float = 0.5
    timestep_sampling: str = "uniform"
    init_controlnet: Path | None = None
    jitter_data: Path | None = None
    jitter_below: int = 0
    seed: int = 0
    log_every: int = 10


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of a model's parameters (to compare processes and runs)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Frozen:
    """The base model's frozen parts, the tokenizer and the noise schedule."""

    def __init__(self, models: Path, device: torch.device):
        self.tokenizer = CLIPTokenizer.from_pretrained(models / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(models / "text_encoder").to(device)
        self.vae = AutoencoderKL.from_pretrained(models / "vae").to(device)
        self.unet = UNet2DConditionModel.from_pretrained(models / "unet").to(device)
        for m in (self.text_encoder, self.vae, self.unet):
            m.requires_grad_(False)
            m.eval()
        self.scheduler = DDPMScheduler.from_pretrained(models / "scheduler")
        self.max_len = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        # Output sides are multiples of the VAE factor x the UNet's downsampling.
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def cast(self, dtype: torch.dtype) -> None:
        """The frozen weights in `dtype` (mixed precision); loaded in float32."""
        if dtype != torch.float32:
            for m in (self.text_encoder, self.vae, self.unet):
                m.to(dtype)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions, padding="max_length", max_length=self.max_len, truncation=True, return_tensors="pt"
        ).input_ids

    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        shift = self.vae.config.get("shift_factor") or 0.0
        return (z - shift) * self.vae.config.scaling_factor


def conditioning_embedding_channels(vae_factor: int) -> tuple[int, ...]:
    """ControlNet's conditioning embedding downsamples once per entry after the
    first and must land on the latent grid: diffusers' (16, 32, 96, 256) for
    SD's factor 8, its first log2(factor) + 1 entries for smaller factors."""
    downsamples = vae_factor.bit_length() - 1
    if vae_factor != 1 << downsamples or not 1 <= downsamples <= 3:
        raise ExportError(f"VAE factor {vae_factor}: the trainer supports 2, 4 and 8")
    return (16, 32, 96, 256)[: downsamples + 1]


def new_controlnet(frozen: Frozen, kmax: int) -> ControlNetModel:
    """A ControlNet initialised from the frozen UNet, taking Kmax layout channels."""
    return ControlNetModel.from_unet(
        frozen.unet,
        conditioning_channels=kmax,
        conditioning_embedding_out_channels=conditioning_embedding_channels(frozen.vae_factor),
    )


def timesteps(n: int, steps: int, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """`n` training timesteps in 0..steps-1. `uniform`: each equally likely.
    `cubic`: t = (1 - u^3) * steps for uniform u, which favours the noisy
    end (P(t >= steps/2) = 0.79) where sampling decides the layout, as
    T2I-Adapter trains its adapters; every timestep keeps some weight."""
    if sampling == "uniform":
        return torch.randint(0, steps, (n,), generator=generator)
    if sampling == "cubic":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return ((1 - u**3) * steps).long().clamp(0, steps - 1)
    raise ValueError(f"timestep sampling {sampling!r}: uniform or cubic")


def initial_controlnet(frozen: Frozen, kmax: int, init: Path | None) -> ControlNetModel:
    """From the frozen UNet, or from a trained ControlNet (`--init-controlnet`:
    to train an existing model further, e.g. with another timestep sampling)."""
    if init is None:
        return new_controlnet(frozen, kmax)
    if not (init / "config.json").is_file():
        raise ExportError(f"{init}: not a diffusers ControlNet folder (no config.json)")
    net = ControlNetModel.from_pretrained(init, torch_dtype=torch.float32)
    if net.config.conditioning_channels != kmax:
        raise ExportError(
            f"{init / 'config.json'}: conditioning_channels {net.config.conditioning_channels}, "
            f"but the layouts have Kmax {kmax}"
        )
    return net


def loss_of(
    frozen: Frozen,
    controlnet: ControlNetModel,
    batch: dict,
    generator: torch.Generator,
    sampling: str = "uniform",
):
    """The denoising loss of one micro-batch, with noise and timesteps from `generator`."""
    device = frozen.unet.device
    latents = frozen.latents(batch["pixel_values"], generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = timesteps(latents.shape[0], frozen.scheduler.config.num_train_timesteps, sampling, generator)
    t = t.to(device)
    noisy = frozen.scheduler.add_noise(latents, noise, t)
    text = frozen.text_encoder(batch["input_ids"].to(device))[0]
    cond = batch["conditioning"].to(device)  # float32, as the trainable ControlNet
    # The trainable net keeps float32 weights: its inputs follow them (under
    # mixed precision accelerate's autocast, where the device has one, picks
    # the compute dtype; without it, half inputs would meet float32 weights).
    down, mid = controlnet(
        noisy.float(), t, encoder_hidden_states=text.float(), controlnet_cond=cond, return_dict=False
    )
    pred = frozen.unet(
        noisy,
        t,
        encoder_hidden_states=text,
        down_block_additional_residuals=[d.to(frozen.unet.dtype) for d in down],
        mid_block_additional_residual=mid.to(frozen.unet.dtype),
    ).sample
    kind = frozen.scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = frozen.scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"scheduler prediction_type {kind!r}: only epsilon and v_prediction train here")
    return F.mse_loss(pred.float(), target.float())


def micro_generator(seed: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + micro * 7919 + rank) % (2**63))


def latest_checkpoint(output: Path) -> Path | None:
    done = sorted(p for p in (output / "checkpoints").glob("step-*") if p.is_dir() and not p.suffix)
    return done[-1] if done else None


def check_basis(export: LayoutsExport, models: Path) -> None:
    """The layouts must come from this folder's PCA basis."""
    pca = models / "pca.safetensors"
    if not pca.is_file():
        raise ExportError(f"{pca}: missing (the model folder must hold the basis the layouts used)")
    if sha256_file(pca) != export.manifest["pca_sha256"]:
        raise ExportError(
            f"{export.root / 'dataset.json'}: the layouts were made with another PCA basis than {pca}"
        )


def train(o: Options) -> dict:
    """Train; returns the final summary (also written to OUT/logs/rank-R.json)."""
    accelerator = Accelerator(gradient_accumulation_steps=o.grad_accum, mixed_precision=o.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    export = LayoutsExport(o.data)
    check_basis(export, o.models)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(o.mixed_precision, torch.float32)
    frozen = Frozen(o.models, accelerator.device)
    samples = Samples(
        export,
        o.images,
        o.resolution,
        frozen.multiple,
        KSampler(export.kmax, o.k_distribution),
        o.caption_dropout,
        o.seed,
        LayoutsExport(o.jitter_data) if o.jitter_data else None,
        o.jitter_below,
    )
    plan = Plan(samples, o.batch_size, rank, world)

    torch.manual_seed(o.seed)
    controlnet = initial_controlnet(frozen, export.kmax, o.init_controlnet)
    frozen.cast(weight_dtype)
    if o.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=o.lr)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)

    o.output.mkdir(parents=True, exist_ok=True)
    step, before = 0, {"seconds": 0.0, "cpu_seconds": 0.0}
    if o.resume:
        ckpt = latest_checkpoint(o.output)
        if ckpt is not None:
            accelerator.load_state(str(ckpt))
            state = json.loads((ckpt / "train_state.json").read_text())
            step = state["step"]
            before = {k: state.get(k, 0.0) for k in before}
            accelerator.print(f"resumed from {ckpt} at step {step}")

    losses: list[float] = []
    started, cpu_started = time.perf_counter(), time.process_time()

    def spent() -> dict:
        """Training time up to now, over every run that led to this step
        (wall and this process's CPU seconds; checkpoints carry them)."""
        return {
            "seconds": round(before["seconds"] + time.perf_counter() - started, 1),
            "cpu_seconds": round(before["cpu_seconds"] + time.process_time() - cpu_started, 1),
        }

    steps_this_run = 0
    while step < o.max_steps:
        for j in range(o.grad_accum):
            micro = step * o.grad_accum + j
            batch = samples.batch(plan.indices(micro), micro, frozen.tokenize)
            with accelerator.accumulate(controlnet):
                generator = micro_generator(o.seed, micro, rank)
                loss = loss_of(frozen, controlnet, batch, generator, o.timestep_sampling)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(loss.detach()))
        step += 1
        steps_this_run += 1
        if step % o.log_every == 0 or step == o.max_steps:
            recent = losses[-o.log_every * o.grad_accum :]
            accelerator.print(f"step {step}/{o.max_steps} loss {sum(recent) / len(recent):.5f}")
        if o.checkpoint_every and (step % o.checkpoint_every == 0 or step == o.max_steps):
            save_checkpoint(accelerator, o.output, step, spent())
        if o.validate_every and step % o.validate_every == 0 and accelerator.is_main_process:
            from lumen_train.validate import validation_grid

            validation_grid(frozen, accelerator.unwrap_model(controlnet), samples, o, step)
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(controlnet)
    summary = {
        "rank": rank,
        "processes": world,
        "step": step,
        "steps_this_run": steps_this_run,
        "seconds": round(seconds, 3),
        "steps_per_second": round(steps_this_run / seconds, 4) if seconds > 0 else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "weights_sha256": weights_sha256(net),
        "total": spent(),
        "options": {k: str(v) for k, v in asdict(o).items()},
    }
    logs = o.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"rank-{rank}.json").write_text(json.dumps(summary, indent=2))
    if accelerator.is_main_process:
        from lumen_train.export import export_folder

        export_folder(net, o.models, export, o.output)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def save_checkpoint(accelerator: Accelerator, output: Path, step: int, spent: dict | None = None) -> None:
    """accelerate's state plus the step, under a temporary name, then renamed."""
    final = output / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_suffix(".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps({"step": step, **(spent or {})}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
