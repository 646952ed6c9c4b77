"""Training samples from a `lumen layouts` export and its image folder.

A sample is one exported row: the guide image (the training target) resized
to lumen's default output size for it (its aspect, longer side =
`--resolution`, sides multiples of the model's size multiple), the
conditioning built from its layout at that size and truncated to a random K,
and its caption (dropped to "" with probability `caption_dropout`).

With a second export of colour-jittered copies of the same images
(`jitter`), a sample whose K is at most `jitter_below` takes its layout from
its jittered copy while the target stays the original image: the coarse
layouts then say nothing reliable about colour, so the ControlNet learns to
take colour from the prompt at low K and from the layout only at high K
(DINOv2's colour-jitter invariance, applied to the conditioning of an
encoder that lacks it).

Everything random is derived from (seed, micro-batch index, sample), never
from global state, so a resumed run draws exactly what the uninterrupted one
would have, and every process draws its own batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from lumen_train.conditioning import conditioning, output_size, truncate

FORMAT = "lumen-layouts/1"


class ExportError(ValueError):
    """The layouts export or the image folder is not usable; names the file."""


@dataclass(frozen=True)
class Row:
    shard: str
    row: int
    source: str
    caption: str
    width: int
    height: int


class LayoutsExport:
    """`dataset.json` + `index.jsonl` + shards of a `lumen layouts` export."""

    def __init__(self, root: Path):
        self.root = Path(root)
        manifest = self.root / "dataset.json"
        index = self.root / "index.jsonl"
        for f in (manifest, index):
            if not f.is_file():
                raise ExportError(f"{f}: missing (is {self.root} a `lumen layouts --out` folder?)")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ExportError(f"{manifest}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.kmax: int = int(self.manifest["components"])
        self.rows: list[Row] = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
                self.rows.append(
                    Row(
                        r["shard"],
                        int(r["row"]),
                        r["source"],
                        r.get("caption") or "",
                        int(r["width"]),
                        int(r["height"]),
                    )
                )
            except (ValueError, KeyError) as e:
                raise ExportError(f"{index} line {n}: {e}") from e
        if not self.rows:
            raise ExportError(f"{index}: no rows")
        self._open: dict[str, object] = {}

    def layout(self, i: int) -> torch.Tensor:
        """Row `i`'s layout [Kmax, h, w] as float32."""
        r = self.rows[i]
        f = self._open.get(r.shard)
        if f is None:
            f = safe_open(str(self.root / r.shard), framework="pt")
            self._open[r.shard] = f
        return f.get_tensor(str(r.row)).to(torch.float32)


@dataclass(frozen=True)
class KSampler:
    """How K is drawn for a sample: `uniform` over 1..Kmax, `low` (1/K
    weights: favours coarse layouts and diversity), `high` (K weights:
    favours fidelity), or `full` (always Kmax, no truncation)."""

    kmax: int
    distribution: str = "uniform"

    def draw(self, rng: np.random.Generator) -> int:
        ks = np.arange(1, self.kmax + 1)
        if self.distribution == "full":
            return self.kmax
        weights = {"uniform": np.ones(self.kmax), "low": 1.0 / ks, "high": ks.astype(float)}
        if self.distribution not in weights:
            raise ValueError(f"unknown K distribution {self.distribution!r}: uniform, low, high or full")
        w = weights[self.distribution]
        return int(rng.choice(ks, p=w / w.sum()))


def image_tensor(path: Path, width: int, height: int) -> torch.Tensor:
    """An RGB image resized to width x height (bicubic), [3, H, W] in [-1, 1]."""
    with Image.open(path) as img:
        x = np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(x / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class Samples:
    """Training samples: sizes, batches per epoch, and the tensors of a batch."""

    def __init__(
        self,
        export: LayoutsExport,
        images: Path,
        resolution: int,
        multiple: int,
        ksampler: KSampler,
        caption_dropout: float,
        seed: int,
        jitter: LayoutsExport | None = None,
        jitter_below: int = 0,
    ):
        self.export = export
        self.images = Path(images)
        self.ksampler = ksampler
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.jitter_below = jitter_below if jitter is not None else 0
        self.jitter, self.jitter_row = jitter, {}
        if jitter is not None:
            if jitter.kmax != export.kmax:
                raise ExportError(
                    f"{jitter.root / 'dataset.json'}: {jitter.kmax} components, "
                    f"the layouts have {export.kmax} (export both with the same model)"
                )
            rows = {r.source: i for i, r in enumerate(jitter.rows)}
            for r in export.rows:
                if r.source not in rows:
                    raise ExportError(f"{jitter.root / 'index.jsonl'}: no row for {r.source}")
                j = jitter.rows[rows[r.source]]
                if (j.width, j.height) != (r.width, r.height):
                    raise ExportError(
                        f"{jitter.root / 'index.jsonl'}: {r.source} is {j.width}x{j.height}, "
                        f"the original {r.width}x{r.height}"
                    )
            self.jitter_row = rows
        self.sizes = [output_size(r.width, r.height, resolution, multiple) for r in export.rows]
        for r in export.rows:
            if not (self.images / r.source).is_file():
                raise ExportError(f"{self.images / r.source}: missing (the export lists {r.source})")

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """This epoch's batches: a seeded shuffle, grouped by output size
        (same-size samples only), partial batches kept, batch order shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        buckets: dict[tuple[int, int], list[int]] = {}
        batches: list[list[int]] = []
        for i in rng.permutation(len(self.sizes)).tolist():
            b = buckets.setdefault(self.sizes[i], [])
            b.append(i)
            if len(b) == batch_size:
                batches.append(b.copy())
                b.clear()
        batches.extend(b for b in buckets.values() if b)
        order = rng.permutation(len(batches)).tolist()
        return [batches[j] for j in order]

    def batch(self, indices: list[int], micro: int, tokenize) -> dict[str, torch.Tensor]:
        """The tensors of one micro-batch (`micro`: its global index, for the randomness)."""
        w, h = self.sizes[indices[0]]
        pixels, conds, ks, captions = [], [], [], []
        for j, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, micro, j, 1])
            row = self.export.rows[i]
            k = self.ksampler.draw(rng)
            if k <= self.jitter_below:
                layout = self.jitter.layout(self.jitter_row[row.source])
            else:
                layout = self.export.layout(i)
            cond = conditioning(layout, self.export.kmax, h, w)
            conds.append(truncate(cond, k))
            pixels.append(image_tensor(self.images / row.source, w, h))
            ks.append(k)
            captions.append("" if rng.random() < self.caption_dropout else row.caption)
        return {
            "pixel_values": torch.stack(pixels),
            "conditioning": torch.stack(conds),
            "k": torch.tensor(ks),
            "input_ids": tokenize(captions),
        }


class Plan:
    """Which micro-batch each process runs: process `rank` of `world` takes
    every world-th batch of each epoch (the same count on every process)."""

    def __init__(self, samples: Samples, batch_size: int, rank: int, world: int):
        self.samples, self.batch_size, self.rank, self.world = samples, batch_size, rank, world
        self.per_epoch = len(samples.epoch_batches(0, batch_size)) // world
        if self.per_epoch == 0:
            raise ExportError(
                f"{len(samples.sizes)} samples make fewer batches than the {world} processes need"
            )
        self._epoch, self._batches = -1, []

    def indices(self, micro: int) -> list[int]:
        """The sample indices of this process' micro-batch number `micro`."""
        epoch, pos = divmod(micro, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.samples.epoch_batches(epoch, self.batch_size)
        return self._batches[self.rank :: self.world][pos]
