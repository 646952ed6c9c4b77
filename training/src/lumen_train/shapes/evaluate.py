"""The paper's evaluation in miniature, in the shapes world: for held-out
guides (split seed 1, never seen in training) lumen synthesizes images at
each K, with and without the caption as prompt; each output is segmented by
nearest palette colour (both greys are background) and compared with the
guide's exact segmentation.

- foreground IoU: any shape vs background, guide vs output;
- colour mIoU: IoU per colour present in the guide, averaged;
- diversity: mean per-pixel RGB distance (/255) between outputs of
  different seeds for the same guide, averaged over pairs.

Each row gives the mean over its (guide, seed) pairs and, beside it, the
worst decile (the 10th percentile: a tenth of the outputs do worse) and the
count of outputs that lost the guide (colour mIoU below 0.5): a mean hides
the failures users meet.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lumen_train.shapes import world


@dataclass
class Row:
    components: int
    prompt: bool | str  # True: the caption; False: none; "recoloured" (see `evaluate`)
    foreground_iou: float
    colour_miou: float
    diversity: float
    images: int
    foreground_iou_p10: float = 0.0
    colour_miou_p10: float = 0.0
    failures: int = 0  # outputs with colour mIoU below FAILURE


FAILURE = 0.5


def foreground_iou(guide: np.ndarray, out: np.ndarray) -> float:
    g, o = guide > 0, out > 0
    union = (g | o).sum()
    return float((g & o).sum() / union) if union else 1.0


def colour_miou(guide: np.ndarray, out: np.ndarray) -> float:
    ious = []
    for c in np.unique(guide[guide > 0]):
        g, o = guide == c, out == c
        ious.append((g & o).sum() / (g | o).sum())
    return float(np.mean(ious)) if ious else 1.0


def diversity(images: list[np.ndarray]) -> float:
    pairs = list(itertools.combinations(images, 2))
    if not pairs:
        return 0.0
    d = [np.sqrt(((a.astype(np.float32) - b.astype(np.float32)) ** 2).sum(-1)).mean() / 255 for a, b in pairs]
    return float(np.mean(d))


def synthesize(
    lumen: Path,
    models: Path | None,
    guide: Path,
    k: int,
    prompt: str,
    seeds: int,
    out: Path,
    extra: list[str],
) -> list[np.ndarray]:
    """`lumen synthesize` for one guide, K and prompt: `seeds` images (seeds 0 … seeds − 1)."""
    args = [
        str(lumen),
        "synthesize",
        "--image",
        str(guide),
        "-k",
        str(k),
        "--prompt",
        prompt,
        "--seed",
        "0",
        "--num-images",
        str(seeds),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    if models is not None:
        args += ["--models", str(models)]
    env = {name: value for name, value in os.environ.items() if name != "LUMEN_MODELS"}
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {run.stderr}")
    paths = [out] if seeds == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(seeds)]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def evaluate(
    lumen: Path,
    models: Path | None = None,
    guides: int = 50,
    seeds: int = 2,
    ks: list[int] | None = None,
    prompts: tuple[bool, ...] = (True, False),
    extra: list[str] | None = None,
    keep: Path | None = None,
) -> list[Row]:
    """The table over `ks` (default 1 … 8) × `prompts`, averaged over
    `guides` held-out guides and `seeds` seeds each. A prompt is True (the
    caption), False (none) or "recoloured": the caption with its colours
    renamed by a permutation drawn per guide, the output then scored against
    the guide's segmentation with its colours renamed the same way (does
    the prompt set the colours while the layout keeps the shapes?)."""
    ks = ks or list(range(1, 9))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drawn = []
        for i in range(guides):
            image, caption, _, _ = world.sample(world.EVAL_SEED, i)
            path = tmp / f"guide-{i:03d}.png"
            Image.fromarray(image).save(path)
            drawn.append((path, caption, world.segment(image)))
        rng = np.random.default_rng(5)
        renamings = [list(rng.permutation(len(world.COLOURS))) for _ in drawn]
        for k, with_prompt in itertools.product(ks, prompts):
            fg, miou, div, n = [], [], [], 0
            for i, (path, caption, seg) in enumerate(drawn):
                out = tmp / f"out-{i:03d}.png"
                prompt = caption if with_prompt else ""
                if with_prompt == "recoloured":
                    prompt = world.recolour_caption(caption, renamings[i])
                    seg = world.renamed_classes(caption, prompt)[seg]
                outs = synthesize(lumen, models, path, k, prompt, seeds, out, extra or [])
                for o in outs:
                    if o.shape != seg.shape + (3,):  # another output size: compared at the guide's
                        o = np.asarray(Image.fromarray(o).resize(seg.shape[::-1], Image.NEAREST))
                    s = world.segment(o)
                    fg.append(foreground_iou(seg, s))
                    miou.append(colour_miou(seg, s))
                    n += 1
                div.append(diversity(outs))
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.concatenate(outs, 1)).save(
                        keep / f"guide-{i:03d}-k{k}-{label(with_prompt)}.png"
                    )
            rows.append(
                Row(
                    k,
                    with_prompt,
                    float(np.mean(fg)),
                    float(np.mean(miou)),
                    float(np.mean(div)),
                    n,
                    float(np.percentile(fg, 10)),
                    float(np.percentile(miou, 10)),
                    int((np.asarray(miou) < FAILURE).sum()),
                )
            )
    return rows


def label(prompt: bool | str) -> str:
    return {True: "caption", False: "none"}.get(prompt, str(prompt))


def markdown(rows: list[Row]) -> str:
    lines = [
        "| K | prompt | images | foreground IoU: mean | worst decile | colour mIoU: mean | worst decile "
        f"| lost (< {FAILURE}) | diversity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.components} | {label(r.prompt)} | {r.images} | {r.foreground_iou:.3f} | "
            f"{r.foreground_iou_p10:.3f} | {r.colour_miou:.3f} | {r.colour_miou_p10:.3f} | {r.failures} | "
            f"{r.diversity:.3f} |"
        )
    return "\n".join(lines)


def to_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows])
