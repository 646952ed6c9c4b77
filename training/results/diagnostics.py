"""The one-off diagnostics of the downstream study (README, "Does the data
help a downstream model?"), run with the study's own functions on its
work folder: `python training/results/diagnostics.py WORK OUT.jsonl SPEC...`.

A SPEC is `condition:N:steps:norm:lr:seed`, the condition one of `real`,
`classic`, `real+lumen`, `real+lumen@S`, `real+lumen colour@S`,
`real+lumen shape[@S]` (synthetic colour labels all ignored, outputs kept
at score >= S), `real+recoloured`, `real+recoloured-vae` (the recoloured
images encoded and decoded by the shapes model's VAE), `lumen@S`. $AUG
names the augment folder under WORK (default `augmented`). Each result is
appended to OUT as a JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from lumen_train.shapes.downstream import (
    IGNORE,
    Budget,
    Data,
    colour_trusted_from,
    load_augmented,
    load_real,
    recoloured,
    score,
    train_model,
)

ROOT = Path(__file__).resolve().parents[2]


def through_vae(d: Data) -> Data:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(ROOT / "models/shapes/vae")).eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(d.images).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round() / 127.5 - 1
    return Data(rec.contiguous(), d.colour, d.shape, d.scores, d.sources)


def main(work: Path, out: Path, specs: list[str]) -> None:
    test = load_real(work / "test")
    real_all = load_real(work / "pool")
    names = [f"{i:06d}.png" for i in range(len(real_all))]
    synth_all = load_augmented(work / os.environ.get("AUG", "augmented"), names)
    for spec in specs:
        cond, n, steps, norm, lr, seed = spec.split(":")
        n, steps, seed = int(n), int(steps), int(seed)
        real = real_all.take(real_all.sources < n)
        synth = synth_all.take(synth_all.sources < n)
        at = float(cond.split("@")[1]) if "@" in cond else None
        r, s = real, None
        if cond == "real+lumen":
            s = synth
        elif cond.startswith("real+lumen colour@"):
            s = colour_trusted_from(synth, at)
        elif cond.startswith("real+lumen shape"):
            kept = synth if at is None else synth.take(synth.scores >= at)
            colour = torch.full_like(kept.colour, IGNORE)
            s = Data(kept.images, colour, kept.shape, kept.scores, kept.sources)
        elif cond.startswith("real+lumen@"):
            s = synth.take(synth.scores >= at)
        elif cond.startswith("real+recoloured"):
            s = recoloured(real, 4, seed)
            if cond.endswith("-vae"):
                s = through_vae(s)
        elif cond.startswith("lumen@"):
            r, s = None, synth.take(synth.scores >= at)
        elif cond not in ("real", "classic"):
            raise SystemExit(f"unknown condition {cond!r}")
        t = time.perf_counter()
        net = train_model(r, s, cond == "classic", seed, Budget(steps, 32, float(lr), 0.5, norm))
        colour, shape = score(net, test)
        row = {"spec": spec, "aug": os.environ.get("AUG", "augmented"), "colour": round(colour, 4)}
        row |= {"shape": round(shape, 4), "seconds": round(time.perf_counter() - t, 1)}
        print(row, flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
