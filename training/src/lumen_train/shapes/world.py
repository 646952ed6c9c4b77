"""The shapes world, exactly: 64×64 RGB images with hard edges, a uniform
background in one of two greys, 1 to 3 filled shapes (circle, axis-aligned
square, upward isosceles triangle) with bounding boxes 14 to 32 pixels on a
side, wholly inside the image, drawn in order over each other, in one of six
colours; the caption names the shapes in drawing order.

Image `i` of a split with seed `s` is drawn from `numpy.random.default_rng([s, i])`,
so any image can be regenerated alone, and splits with different seeds are
disjoint streams (training uses seed 0, held-out evaluation seed 1).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE = 64
BACKGROUNDS = {"light grey": (200, 200, 200), "dark grey": (90, 90, 90)}
COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 50),
    "magenta": (200, 60, 200),
    "cyan": (60, 200, 210),
}
KINDS = ("circle", "square", "triangle")
MIN_BOX, MAX_BOX = 14, 32
TRAIN_SEED, EVAL_SEED = 0, 1

# Segmentation classes: 0 background (either grey), then the colours in order.
PALETTE = np.array(list(BACKGROUNDS.values()) + list(COLOURS.values()), dtype=np.float32)
CLASS_OF_PALETTE = np.array([0, 0] + list(range(1, len(COLOURS) + 1)))
CLASS_NAMES = ["background", *COLOURS]
# Pixel centres (y, x) of the image, shared by every shape's rasterisation.
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # bounding box: left, top, side
    y: int
    size: int


def mask(shape: Shape) -> np.ndarray:
    """The shape's pixels (pixel centres inside the shape), no anti-aliasing."""
    yy, xx = _YY, _XX
    x0, y0, s = shape.x, shape.y, shape.size
    if shape.kind == "square":
        return (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
    if shape.kind == "circle":
        r = s / 2
        return (xx - x0 - r) ** 2 + (yy - y0 - r) ** 2 <= r * r
    # Apex at the top centre, base along the bottom edge of the box.
    t = (yy - y0) / s  # 0 at the apex, 1 at the base
    half = t * s / 2
    return (yy >= y0) & (yy < y0 + s) & (np.abs(xx - (x0 + s / 2)) <= half)


def caption(shapes: list[Shape]) -> str:
    names = [f"a {s.colour} {s.kind}" for s in shapes]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


COLOUR_WORDS = list(COLOURS)
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOUR_WORDS) + r")\b")


def colours_named(text: str) -> list[str]:
    """The colour words of a caption, in order."""
    return _COLOUR_RE.findall(text)


def recolour_caption(caption: str, permutation: list[int]) -> str:
    """The caption with every colour renamed: colour i becomes colour permutation[i]."""
    return _COLOUR_RE.sub(lambda m: COLOUR_WORDS[permutation[COLOUR_WORDS.index(m.group(1))]], caption)


def renamed_classes(source_caption: str, prompt: str) -> np.ndarray | None:
    """The colour-class map (old class → new class, background kept) that
    turns the source's caption into the prompt it was made with, or None
    when the prompt does not rename the caption's colours consistently."""
    old, new = colours_named(source_caption), colours_named(prompt)
    if _COLOUR_RE.sub("", source_caption) != _COLOUR_RE.sub("", prompt) or len(old) != len(new):
        return None
    table = np.arange(len(CLASS_NAMES))
    seen: dict[str, str] = {}
    for o, n in zip(old, new, strict=True):
        if seen.setdefault(o, n) != n:
            return None
        table[1 + COLOUR_WORDS.index(o)] = 1 + COLOUR_WORDS.index(n)
    return table


def sample(seed: int, index: int) -> tuple[np.ndarray, str, list[Shape], str]:
    """Image `index` of split `seed`: (HxWx3 uint8, caption, shapes, background name)."""
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUNDS[background]
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.integers(MIN_BOX, MAX_BOX + 1))
        shape = Shape(
            kind=KINDS[rng.integers(len(KINDS))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            x=int(rng.integers(0, SIZE - size + 1)),
            y=int(rng.integers(0, SIZE - size + 1)),
            size=size,
        )
        image[mask(shape)] = COLOURS[shape.colour]
        shapes.append(shape)
    return image, caption(shapes), shapes, background


def segment(image: np.ndarray) -> np.ndarray:
    """Class map of an RGB image by nearest palette colour (both greys = background)."""
    d = ((image[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return CLASS_OF_PALETTE[d.argmin(-1)]


def write_split(out: Path, seed: int, count: int, start: int = 0) -> None:
    """Images `start..count` of split `seed` as `NNNNNN.png` plus an
    imagefolder `metadata.jsonl`; existing images are kept (resumable)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, count):
        name = f"{i:06d}.png"
        image, text, _, _ = sample(seed, i)
        path = out / name
        if not path.is_file():
            tmp = out / f".{name}.tmp"
            Image.fromarray(image).save(tmp, format="PNG")
            tmp.rename(path)
        lines.append(json.dumps({"file_name": name, "text": text}))
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out / "metadata.jsonl")
