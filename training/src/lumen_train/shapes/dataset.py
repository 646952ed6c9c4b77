"""A labelled dataset of the shapes world, in the formats users bring to
`lumen augment`, and the check that its fidelity score tracks label quality.

`write_dataset(out, seed, count)` writes, for image i of split `seed`:

- `images/NNNNNN.png` with its caption in `images/metadata.jsonl`;
- `masks/NNNNNN.png`: an indexed PNG class map (0 background, 1..6 the
  colours, as `world.segment`), palette = the class colours;
- `masks/classes.json`: the mask values' names, `world.CLASS_NAMES` as a
  JSON list (position = value), where `lumen augment --masks` looks;
- `yolo/NNNNNN.txt`: one line per visible shape, class = kind
  (circle, square, triangle), normalised box of its visible pixels;
- `yolo/data.yaml`: the YOLO class names (`names:`, id: kind), where
  `lumen augment --yolo` looks;
- `coco.json`: instances, one per visible shape (category = kind, ids from
  1), with the visible pixels as an uncompressed RLE, their box and area.

`score_correlation(augment_out)` reads a `lumen augment` output made from
such a dataset with `--masks`: each output is segmented by nearest palette
colour and compared with its carried-over mask (colour mIoU, as
`evaluate`), and the manifest's scores are rank-correlated with those IoUs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lumen_train.shapes import world
from lumen_train.shapes.evaluate import colour_miou

# Class colours for the mask palette: background black, then the six colours.
MASK_PALETTE = [0, 0, 0] + [c for rgb in world.COLOURS.values() for c in rgb]


def visible_masks(shapes: list[world.Shape]) -> list[np.ndarray]:
    """Each shape's pixels that no later shape covers."""
    masks = [world.mask(s) for s in shapes]
    out = []
    for i, m in enumerate(masks):
        covered = np.zeros_like(m)
        for later in masks[i + 1 :]:
            covered |= later
        out.append(m & ~covered)
    return out


def rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, zeros first."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def write_dataset(out: Path, seed: int, count: int) -> dict:
    """Images `0..count` of split `seed` with masks, YOLO files and COCO instances."""
    for sub in ("images", "masks", "yolo"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": k} for i, k in enumerate(world.KINDS)]
    images, annotations, captions = [], [], []
    for i in range(count):
        name = f"{i:06d}"
        image, text, shapes, _ = world.sample(seed, i)
        Image.fromarray(image).save(out / "images" / f"{name}.png")
        captions.append(json.dumps({"file_name": f"{name}.png", "text": text}))
        m = Image.fromarray(world.segment(image).astype(np.uint8), mode="P")
        m.putpalette(MASK_PALETTE)
        m.save(out / "masks" / f"{name}.png")
        images.append({"id": i + 1, "file_name": f"{name}.png", "width": world.SIZE, "height": world.SIZE})
        yolo = []
        for shape, vis in zip(shapes, visible_masks(shapes), strict=True):
            if not vis.any():
                continue
            x, y, w, h = box(vis)
            kind = world.KINDS.index(shape.kind)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": kind + 1,
                    "iscrowd": 0,
                    "bbox": [x, y, w, h],
                    "area": int(vis.sum()),
                    "segmentation": {"size": [world.SIZE, world.SIZE], "counts": rle(vis)},
                }
            )
            s = world.SIZE
            yolo.append(f"{kind} {(x + w / 2) / s:.6f} {(y + h / 2) / s:.6f} {w / s:.6f} {h / s:.6f}")
        (out / "yolo" / f"{name}.txt").write_text("".join(line + "\n" for line in yolo))
    (out / "images" / "metadata.jsonl").write_text("".join(c + "\n" for c in captions))
    (out / "masks" / "classes.json").write_text(json.dumps(world.CLASS_NAMES) + "\n")
    names = "".join(f"  {i}: {kind}\n" for i, kind in enumerate(world.KINDS))
    (out / "yolo" / "data.yaml").write_text(f"# shapes world: YOLO class ids\nnames:\n{names}")
    coco = {"info": {"description": f"shapes world, split {seed}"}, "categories": categories}
    coco |= {"images": images, "annotations": annotations}
    (out / "coco.json").write_text(json.dumps(coco))
    return {"images": count, "annotations": len(annotations)}


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
        tied = v == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def score_correlation(augment_out: Path) -> dict:
    """Spearman's rho between the manifest's scores and each output's colour
    mIoU against its carried-over mask: overall and per K."""
    rows = []
    for line in (augment_out / "manifest.jsonl").read_text().splitlines():
        m = json.loads(line)
        masks = [p for p in m["labels"] if p.startswith("masks/")]
        if not masks or m["score"] is None:
            continue
        out = np.asarray(Image.open(augment_out / m["output"]).convert("RGB"))
        truth = np.asarray(Image.open(augment_out / masks[0]))  # indices = classes
        rows.append((m["components"], m["score"], colour_miou(truth, world.segment(out))))
    result = {"outputs": len(rows), "overall": spearman([r[1] for r in rows], [r[2] for r in rows])}
    for k in sorted({r[0] for r in rows}):
        sel = [r for r in rows if r[0] == k]
        result[f"k{k}"] = {
            "outputs": len(sel),
            "rho": spearman([r[1] for r in sel], [r[2] for r in sel]),
            "mean_score": float(np.mean([r[1] for r in sel])),
            "mean_colour_miou": float(np.mean([r[2] for r in sel])),
        }
    return result
