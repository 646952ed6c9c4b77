#!/usr/bin/env python3
"""Build a full-size random-weight lumen model folder (SD1.5-sized), no download.

Dev-only; the output is large (~7 GB of f32 weights) and lives under
scripts/.cache/ (git-ignored), never committed. It needs torch, diffusers,
transformers, safetensors and numpy (see scripts/README.md); no network and
no model hub: every weight is random, every config is written out below.

What it writes, in scripts/.cache/sd15-random/:

  encoder/              Dinov2Model with DINOv2-L/14's config (copied from
                        scripts/.cache/dinov2-large-random/encoder when
                        scripts/bench_layout.py has built it)
  pca.safetensors       mean zeros [1024], orthonormal random components
                        [64, 1024], explained_variance linspace(2, 1, 64)
  lumen.json            {"layout_size": 518, "default_components": 32}
  unet/                 UNet2DConditionModel, Stable Diffusion 1.5's config
  controlnet/           ControlNetModel.from_unet(unet, conditioning_channels=64),
                        its zero-initialised convolutions made random
  vae/                  AutoencoderKL, SD1.5's config (scaling_factor 0.18215)
  text_encoder/         CLIPTextModel, CLIP ViT-L/14's text config, keys saved
                        with the `text_model.` prefix as in SD1.5's checkpoint
  tokenizer/            copied from models/tiny/tokenizer/ (a small CLIP BPE
                        vocabulary; its ids are < 49408)
  scheduler/scheduler_config.json
                        SD1.5's PNDMScheduler config (models/tiny's copy)
  model_index.json      as StableDiffusionControlNetPipeline.save_config writes it

Weights are diffusers' / transformers' default random initialisation, f32
(`--dtype f16` saves them in f16, ~3.5 GB). `--device cuda` builds the
modules on the GPU, where the initialisation takes seconds, not minutes
(scripts/gpu_check.sh makes its SD1.5-size folder so).
Components are built one at a time (the UNet and its ControlNet together,
~5 GB) and freed before the next. Each is written to `<name>.tmp/` and renamed
when complete, and an existing component is skipped, so the script is
idempotent and resumes after an interruption; `--force` rebuilds everything.

Usage: python scripts/make_big_models.py [--force] [--out DIR] [--device cpu|cuda] [--dtype f32|f16]
"""

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts/.cache/sd15-random"
DINO_CACHE = ROOT / "scripts/.cache/dinov2-large-random/encoder"
TINY = ROOT / "models/tiny"

KMAX = 64
SEED = 15
# Where the modules are built and the dtype they are saved in (main() sets them).
DEVICE = torch.device("cpu")
DTYPE = torch.float32

# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0 era), in full.
UNET_SD15 = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# runwayml/stable-diffusion-v1-5 vae/config.json, in full (+ its scaling factor).
VAE_SD15 = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

# openai/clip-vit-large-patch14 text_config (SD1.5's text_encoder/config.json).
# bos/eos/pad ids are taken from the tokenizer copied in (models/tiny's small
# vocabulary) instead of SD1.5's 0/2/1, so that transformers' pooled output
# finds the real end-of-text token; the last hidden state does not use them.
CLIP_L_TEXT = {
    "attention_dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# facebook/dinov2-large (ViT-L/14), as scripts/bench_layout.py builds it.
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                patch_size=14, image_size=518, layerscale_value=1.0)

MODEL_INDEX = {
    "_class_name": "StableDiffusionControlNetPipeline",
    "controlnet": ["diffusers", "ControlNetModel"],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def free(*_) -> None:
    gc.collect()


class Builder:
    def __init__(self, out: Path):
        self.out = out
        self.report = {}

    def tmp(self, name: str) -> Path:
        t = self.out / (name + ".tmp")
        shutil.rmtree(t, ignore_errors=True)
        return t

    def done(self, name: str) -> bool:
        return (self.out / name).exists()

    def commit(self, name: str, t0: float, **info) -> None:
        src, dst = self.out / (name + ".tmp"), self.out / name
        if src.is_dir():
            src.rename(dst)
        else:
            src.replace(dst)
        self.report[name] = {"seconds": round(time.perf_counter() - t0, 1), **info}
        print(f"  {name}: {self.report[name]}", flush=True)


def build_unet_controlnet(b: Builder) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = None
    if not b.done("unet"):
        t0 = time.perf_counter()
        torch.manual_seed(SEED + 1)
        with DEVICE:
            unet = UNet2DConditionModel(**UNET_SD15).eval().to(DTYPE)
        unet.save_pretrained(b.tmp("unet"), safe_serialization=True)
        b.commit("unet", t0, parameters=nparams(unet))
    if b.done("controlnet"):
        return
    t0 = time.perf_counter()
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(b.out / "unet", torch_dtype=DTYPE).eval().to(DEVICE)
    torch.manual_seed(SEED + 2)
    # Copies the UNet's encoder half; conditioning embedding (16, 32, 96, 256), i.e. /8.
    with DEVICE:
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=KMAX).eval().to(DTYPE)
    del unet
    free()
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    # diffusers zero-initialises these (zero_module); random, small, so the
    # residual path is exercised.
    gen = torch.Generator().manual_seed(SEED + 3)
    zeroed = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
              *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zeroed:
            assert not conv.weight.any(), "expected a zero-initialised convolution"
            conv.weight.copy_(0.02 * torch.randn(conv.weight.shape, generator=gen, device="cpu"))
            conv.bias.copy_(0.01 * torch.randn(conv.bias.shape, generator=gen, device="cpu"))
    controlnet.save_pretrained(b.tmp("controlnet"), safe_serialization=True)
    b.commit("controlnet", t0, parameters=nparams(controlnet), randomized_zero_convs=len(zeroed))
    del controlnet
    free()


def build_vae(b: Builder) -> None:
    from diffusers import AutoencoderKL

    if b.done("vae"):
        return
    t0 = time.perf_counter()
    torch.manual_seed(SEED + 4)
    with DEVICE:
        vae = AutoencoderKL(**VAE_SD15).eval().to(DTYPE)
    vae.save_pretrained(b.tmp("vae"), safe_serialization=True)
    b.commit("vae", t0, parameters=nparams(vae))
    del vae
    free()


def build_tokenizer(b: Builder) -> dict:
    if not b.done("tokenizer"):
        t0 = time.perf_counter()
        shutil.copytree(TINY / "tokenizer", b.tmp("tokenizer"))
        b.commit("tokenizer", t0, source="models/tiny/tokenizer")
    vocab = json.loads((b.out / "tokenizer/vocab.json").read_text(encoding="utf-8"))
    assert max(vocab.values()) < CLIP_L_TEXT["vocab_size"]
    return vocab


def build_text_encoder(b: Builder, vocab: dict) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    if b.done("text_encoder"):
        return
    t0 = time.perf_counter()
    torch.manual_seed(SEED + 5)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPTextConfig(bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
                         **CLIP_L_TEXT)
    with DEVICE:
        text = CLIPTextModel(cfg).eval().to(DTYPE)
    t = b.tmp("text_encoder")
    text.save_pretrained(t, safe_serialization=True)
    n = nparams(text)
    del text
    free()
    # transformers 5 saves without the `text_model.` prefix that SD1.5's
    # checkpoint carries (and loads both); rewrite with it, as make_sd_fixtures.py does.
    f = t / "model.safetensors"
    sd = load_file(str(f))
    assert not any(k.startswith("text_model.") for k in sd), sorted(sd)[:4]
    save_file({"text_model." + k: v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    del sd
    free()
    b.commit("text_encoder", t0, parameters=n, key_prefix="text_model.")


def build_encoder(b: Builder) -> None:
    if b.done("encoder"):
        return
    t0 = time.perf_counter()
    t = b.tmp("encoder")
    if (DINO_CACHE / "model.safetensors").exists() and (DINO_CACHE / "config.json").exists():
        cfg = json.loads((DINO_CACHE / "config.json").read_text())
        assert all(cfg[k] == v for k, v in DINOV2_L.items()), cfg
        shutil.copytree(DINO_CACHE, t)
        b.commit("encoder", t0, source=str(DINO_CACHE.relative_to(ROOT)))
        return
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(SEED + 6)
    with DEVICE:
        enc = Dinov2Model(Dinov2Config(**DINOV2_L)).eval().to(DTYPE)
    enc.save_pretrained(t, safe_serialization=True)
    b.commit("encoder", t0, parameters=nparams(enc))
    del enc
    free()


def build_small_files(b: Builder) -> None:
    import diffusers

    if not b.done("pca.safetensors"):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(SEED + 7)
        q, _ = torch.linalg.qr(torch.randn(1024, KMAX, generator=gen, device="cpu"))
        save_file({"mean": torch.zeros(1024), "components": q.T.contiguous(),
                   "explained_variance": torch.linspace(2.0, 1.0, KMAX)}, str(b.tmp("pca.safetensors")))
        b.commit("pca.safetensors", t0, kmax=KMAX)
    if not b.done("lumen.json"):
        t0 = time.perf_counter()
        b.tmp("lumen.json").write_text(json.dumps({"layout_size": 518, "default_components": 32},
                                                  indent=2) + "\n")
        b.commit("lumen.json", t0)
    if not b.done("scheduler"):
        t0 = time.perf_counter()
        t = b.tmp("scheduler")
        t.mkdir()
        shutil.copy(TINY / "scheduler/scheduler_config.json", t / "scheduler_config.json")
        assert json.loads((t / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
        b.commit("scheduler", t0, source="models/tiny/scheduler")
    if not b.done("model_index.json"):
        t0 = time.perf_counter()
        index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__,
                 **{k: v for k, v in MODEL_INDEX.items() if k != "_class_name"}}
        b.tmp("model_index.json").write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        b.commit("model_index.json", t0)


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="delete the folder and rebuild everything")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default="cpu", help="where the modules are built: cpu or cuda")
    ap.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="the dtype the weights are saved in")
    a = ap.parse_args()
    global DEVICE, DTYPE
    DEVICE = torch.device(a.device)
    DTYPE = {"f32": torch.float32, "f16": torch.float16}[a.dtype]
    torch.set_num_threads(2 if DEVICE.type == "cpu" else max(1, os.cpu_count() or 1))
    out = a.out.resolve()
    if a.force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    b = Builder(out)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        build_small_files(b)
        vocab = build_tokenizer(b)
        build_text_encoder(b, vocab)
        build_vae(b)
        build_unet_controlnet(b)
        build_encoder(b)
    if not b.report:
        print(f"{out}: already built (use --force to rebuild)")
    print(json.dumps({"folder": str(out), "bytes": folder_bytes(out),
                      "gib": round(folder_bytes(out) / 2**30, 2),
                      "seconds": round(time.perf_counter() - t0, 1), "built": b.report}, indent=2))


if __name__ == "__main__":
    main()
