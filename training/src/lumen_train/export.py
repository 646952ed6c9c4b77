"""The trained model as a complete lumen model folder: the new
`controlnet/`, and everything else of the base folder (encoder, PCA basis,
UNet, VAE, text encoder, tokenizer, scheduler) hard-linked where possible,
else copied; `lumen.json` says the layout size the layouts were made at, so
serving computes the layouts training saw."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusers import ControlNetModel

from lumen_train.data import LayoutsExport

SKIP = {"controlnet", "checkpoints", "logs", "validation"}


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_folder(controlnet: ControlNetModel, models: Path, export: LayoutsExport, out: Path) -> None:
    models, out = Path(models), Path(out)
    for src in sorted(models.rglob("*")):
        rel = src.relative_to(models)
        if src.is_dir() or rel.parts[0] in SKIP or rel.name == "lumen.json":
            continue
        link_or_copy(src, out / rel)
    tmp = out / "controlnet.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    controlnet.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out / "controlnet", ignore_errors=True)
    tmp.rename(out / "controlnet")
    settings = {}
    if (models / "lumen.json").is_file():
        settings = json.loads((models / "lumen.json").read_text())
    settings["layout_size"] = int(export.manifest["layout_size"])
    (out / "lumen.json").write_text(json.dumps(settings, indent=2) + "\n")
