"""A trained model folder as the committed one: the diffusion parts (UNet,
ControlNet, VAE, text encoder) stored in float16, the encoder and the PCA
basis kept in float32 (the basis was fitted on the float32 encoder's tokens),
the configs, tokenizer and scheduler copied, lumen.json with the serving
settings of `base.SETTINGS` over the trained folder's (its layout size kept);
training leftovers (checkpoints, logs, validation grids) left out. Written
next to `out` and renamed over it when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HALF = {"unet", "controlnet", "vae", "text_encoder"}
LEFT_OUT = {"checkpoints", "logs", "validation"}


def pack(model: Path, out: Path) -> dict:
    model, out = Path(model), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sizes: dict[str, int] = {}
    for src in sorted(model.rglob("*")):
        rel = src.relative_to(model)
        if src.is_dir() or rel.parts[0] in LEFT_OUT:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("lumen.json"):
            from lumen_train.shapes.base import SETTINGS

            settings = {**SETTINGS, **{"layout_size": json.loads(src.read_text())["layout_size"]}}
            dst.write_text(json.dumps(settings, indent=2) + "\n")
        elif src.name == "config.json" and "_name_or_path" in (config := json.loads(src.read_text())):
            del config["_name_or_path"]  # where training loaded it from: not part of the model
            dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif src.suffix == ".safetensors" and rel.parts[0] in HALF:
            tensors = {
                k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(src).items()
            }
            save_file(tensors, dst, metadata={"format": "pt"})
        else:
            shutil.copy2(src, dst)
        sizes[rel.parts[0]] = sizes.get(rel.parts[0], 0) + dst.stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"out": str(out), "bytes": sum(sizes.values()), "by_part": sizes}


def unpack(model: Path, out: Path, leave_out: frozenset[str] = frozenset({"controlnet"})) -> dict:
    """The reverse for training on: a packed model folder's parts (less
    `leave_out`) with every floating-point weight in float32 (exact: f16 ->
    f32 loses nothing), for a ControlNet retrained on the committed base."""
    model, out = Path(model), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = set()
    for src in sorted(model.rglob("*")):
        rel = src.relative_to(model)
        if src.is_dir() or rel.parts[0] in leave_out | LEFT_OUT:
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tensors = load_file(src) if src.suffix == ".safetensors" else {}
        if any(v.is_floating_point() and v.dtype != torch.float32 for v in tensors.values()):
            tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, dst, metadata={"format": "pt"})
        else:
            shutil.copy2(src, dst)
        parts.add(rel.parts[0])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"out": str(out), "parts": sorted(parts)}
