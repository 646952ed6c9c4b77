"""Does lumen's synthetic data help a downstream model? The study, in the
shapes world (FreeMask's and SegGen's question in miniature).

A user holds N labelled real images (`lumen-train shapes dataset`, split
`POOL_SEED`) and trains a compact segmentation network on them:

- `real`: the N real images alone;
- `real+lumen`: plus `lumen augment` outputs made from those N images, their
  labels carried over (masks and COCO), all of them;
- `real+lumen@S`: the same, keeping outputs whose fidelity score is at least
  S (exactly what `lumen augment --min-score S` keeps; the score is in the
  manifest, so one augment run serves every S);
- `classic`: the N real images with classic augmentation (horizontal flip,
  random resized crop, brightness / contrast / saturation jitter);
- `real+lumen colour@S`: every output, with its colour labels used only
  where the score is at least S (its shape labels always);
- `lumen`: the (filtered) lumen outputs alone;
- `real+recoloured`: the ceiling of any generator that keeps the layout:
  each real image redrawn by the world itself with new colours and
  background (`recoloured`), its labels exact. Not a lumen condition: it
  says how much a layout-keeping augmentation can give here at all.

Every condition trains the same network for the same number of steps and
batch size, from the same initialisation per seed; batches mixing real and
synthetic images draw a fixed fraction from each (`real_fraction`). The
network has two heads, scored separately on held-out real images (split
`TEST_SEED`, never used otherwise):

- colour classes (the masks: 0 background, 1..6 the colours);
- shape classes (the COCO instances: 0 background, 1 circle, 2 square,
  3 triangle), rasterised with pycocotools.

mIoU is over the whole test set (per class intersection and union summed
over images, then averaged over the classes), as segmentation benchmarks
score it. Each finished run is appended to `WORK/runs.jsonl`, so an
interrupted study continues where it stopped; `lumen augment` resumes too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lumen_train.shapes import world
from lumen_train.shapes.dataset import write_dataset
from lumen_train.shapes.evaluate import colour_miou
from lumen_train.shapes.world import recolour_caption, renamed_classes

POOL_SEED, TEST_SEED = 2, 3
IGNORE = -100  # a label the loss skips (cross_entropy's ignore_index)
COLOUR_CLASSES = len(world.CLASS_NAMES)  # background + 6 colours
SHAPE_CLASSES = 1 + len(world.KINDS)  # background + circle, square, triangle


def recoloured_prompts(pool: Path, count: int, ks: int, per_image: int, seed: int) -> list[str]:
    """One prompt per `lumen augment` output in its plan order (source, K,
    variant): the source's caption with its colours renamed by a permutation
    of the six drawn for that output. The guide keeps its colours; the
    layout of a colour-blind encoder does not carry them, so the prompt sets
    them, and `load_augmented` renames the carried colour mask to match."""
    captions = {}
    for line in (pool / "images" / "metadata.jsonl").read_text().splitlines():
        e = json.loads(line)
        captions[e["file_name"]] = e["text"]
    rng = np.random.default_rng([seed, 4242])
    prompts = []
    for name in sorted(captions)[:count]:
        for _ in range(ks * per_image):
            prompts.append(recolour_caption(captions[name], list(rng.permutation(len(world.COLOURS)))))
    return prompts


@dataclass
class Data:
    """Images (B, 3, H, W) in [-1, 1] and both label maps (B, H, W)."""

    images: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    scores: np.ndarray  # fidelity score per image (1 for real images)
    sources: np.ndarray  # index of the real image each came from

    def take(self, keep: np.ndarray) -> Data:
        idx = torch.from_numpy(np.nonzero(keep)[0])
        return Data(
            self.images[idx], self.colour[idx], self.shape[idx], self.scores[keep], self.sources[keep]
        )

    def __len__(self) -> int:
        return len(self.images)


def shape_map(coco, image_id: int, size: tuple[int, int]) -> np.ndarray:
    """The shape-class map of one COCO image: each annotation's pixels get its category."""
    out = np.zeros(size, np.int64)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        out[coco.annToMask(ann) > 0] = ann["category_id"]
    return out


def to_tensors(images: list[np.ndarray], colour: list[np.ndarray], shape: list[np.ndarray]):
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    return x.contiguous(), torch.from_numpy(np.stack(colour)).long(), torch.from_numpy(np.stack(shape))


def load_real(folder: Path, count: int | None = None) -> Data:
    """A `lumen-train shapes dataset` folder: images, masks and coco.json."""
    from pycocotools.coco import COCO

    coco = COCO(str(folder / "coco.json"))
    entries = sorted(coco.dataset["images"], key=lambda e: e["file_name"])[:count]
    images, colour, shape = [], [], []
    for e in entries:
        images.append(np.asarray(Image.open(folder / "images" / e["file_name"]).convert("RGB")))
        colour.append(np.asarray(Image.open(folder / "masks" / e["file_name"])).astype(np.int64))
        shape.append(shape_map(coco, e["id"], (e["height"], e["width"])))
    n = len(entries)
    return Data(*to_tensors(images, colour, shape), np.ones(n), np.arange(n))


def load_augmented(folder: Path, sources: list[str], captions: dict[str, str] | None = None) -> Data:
    """A `lumen augment --masks --coco` output: every manifest line whose
    source is in `sources` (their index there becomes `Data.sources`). With
    the sources' `captions`, an output made with a prompt that renames the
    caption's colours (`recoloured_prompts`) has its carried colour mask
    renamed the same way."""
    from pycocotools.coco import COCO

    coco = COCO(str(folder / "annotations.json"))
    index = {s: i for i, s in enumerate(sources)}
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines() if x]
    lines = sorted((m for m in lines if Path(m["source"]).name in index), key=lambda m: m["output"])
    images, colour, shape, scores, src = [], [], [], [], []
    for m in lines:
        out = np.asarray(Image.open(folder / m["output"]).convert("RGB"))
        mask = next(p for p in m["labels"] if p.startswith("masks/"))
        carried = np.asarray(Image.open(folder / mask)).astype(np.int64)
        if captions is not None:
            table = renamed_classes(captions[Path(m["source"]).name], m["prompt"])
            if table is None:
                what = f"prompt {m['prompt']!r} does not rename its source's colours"
                raise ValueError(f"{m['output']}: {what}")
            carried = table[carried]
        images.append(out)
        colour.append(carried)
        shape.append(shape_map(coco, m["coco_image_id"], out.shape[:2]))
        scores.append(m["score"])
        src.append(index[Path(m["source"]).name])
    return Data(*to_tensors(images, colour, shape), np.asarray(scores, float), np.asarray(src))


def recoloured(real: Data, per_image: int, seed: int) -> Data:
    """Each pool image redrawn `per_image` times with its shapes (kind,
    place, size, drawing order) kept, and every shape's colour and the
    background drawn anew: the colour labels are the new image's own, the
    shape labels the source's."""
    rng = np.random.default_rng([seed, 77])
    images, colour, shape = [], [], []
    for i in range(len(real)):
        _, _, shapes, _ = world.sample(POOL_SEED, int(real.sources[i]))
        for _ in range(per_image):
            image = np.empty((world.SIZE, world.SIZE, 3), np.uint8)
            image[:] = list(world.BACKGROUNDS.values())[rng.integers(len(world.BACKGROUNDS))]
            for sh in shapes:
                image[world.mask(sh)] = list(world.COLOURS.values())[rng.integers(len(world.COLOURS))]
            images.append(image)
            colour.append(world.segment(image))
            shape.append(real.shape[i].numpy())
    n = len(images)
    return Data(*to_tensors(images, colour, shape), np.ones(n), np.repeat(real.sources, per_image))


def geometry_agreement(d: Data) -> np.ndarray:
    """Per image: foreground IoU of its (carried) shape labels against the
    image's own shapes (nearest-palette segmentation, any colour); 1 when
    every shape is where and as large as the label says."""
    pixels = ((d.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    out = []
    for s, p in zip(d.shape.numpy(), pixels, strict=True):
        a, b = s > 0, world.segment(p) > 0
        out.append((a & b).sum() / max((a | b).sum(), 1))
    return np.asarray(out)


def label_agreement(d: Data) -> np.ndarray:
    """Per image: colour mIoU of its (carried) colour mask against the image's
    own nearest-palette segmentation; 1 when the label still applies."""
    pixels = ((d.images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    return np.asarray(
        [colour_miou(c.numpy(), world.segment(p)) for c, p in zip(d.colour, pixels, strict=True)]
    )


def norm_layer(kind: str, c: int) -> nn.Module:
    """`group`: GroupNorm (4 groups), the same at training and test time;
    `batch`: BatchNorm, whose running statistics at test time are those of
    the training batches: real and synthetic images mixed, so a synthetic
    set of other statistics moves how every real test image is normalised."""
    if kind == "group":
        return nn.GroupNorm(4, c)
    if kind == "batch":
        return nn.BatchNorm2d(c)
    raise ValueError(f"norm must be group or batch, not {kind!r}")


class Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str = "group"):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        )


class SegNet(nn.Module):
    """A compact UNet for 64x64 inputs: a strided stem to 32x32, two poolings
    (32-16-8), a decoder back to 32x32 with skips, then bilinear upsampling
    joined with a full-resolution convolution of the input, so that edges
    stay sharp at a seventh of a 64x64 UNet's cost; two 1x1 heads (colour
    classes, shape classes). About 70k parameters at width 12."""

    def __init__(self, width: int = 12, norm: str = "group"):
        super().__init__()
        w = width
        self.full = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), norm_layer(norm, w), nn.ReLU(inplace=True)
        )
        self.e1, self.e2 = Block(w, w, norm), Block(w, 2 * w, norm)
        self.mid = Block(2 * w, 4 * w, norm)
        self.up2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), Block(4 * w, 2 * w, norm)
        self.up1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), Block(2 * w, w, norm)
        self.join = nn.Sequential(nn.Conv2d(w + 8, w, 1), nn.ReLU(inplace=True))
        self.colour = nn.Conv2d(w, COLOUR_CLASSES, 1)
        self.shape = nn.Conv2d(w, SHAPE_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        full = self.full(x)
        e1 = self.e1(self.stem(x))
        e2 = self.e2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(m), e2], 1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], 1))
        up = F.interpolate(d1, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.join(torch.cat([up, full], 1))
        return self.colour(y), self.shape(y)


def classic(x: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, gen: torch.Generator):
    """Classic augmentation of a batch, per sample: horizontal flip (p 0.5),
    random resized crop (area 0.5-1, aspect 3/4-4/3; labels nearest), and
    brightness, contrast, saturation jitter of ±0.2. No hue jitter: hue is
    what the colour classes are."""
    n, _, h, w = x.shape
    xs, cs, ss = [], [], []
    r = torch.rand(n, 8, generator=gen, dtype=torch.float64).numpy()
    for i in range(n):
        xi, ci, si = x[i], colour[i], shape[i]
        if r[i, 0] < 0.5:
            xi, ci, si = xi.flip(-1), ci.flip(-1), si.flip(-1)
        area = 0.5 + 0.5 * r[i, 1]
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[i, 2])
        cw = min(w, max(4, round(math.sqrt(area * h * w * aspect))))
        ch = min(h, max(4, round(math.sqrt(area * h * w / aspect))))
        top, left = int(r[i, 3] * (h - ch + 1)), int(r[i, 4] * (w - cw + 1))
        crop = (slice(top, top + ch), slice(left, left + cw))
        xi = F.interpolate(xi[None, :, crop[0], crop[1]], (h, w), mode="bilinear", align_corners=False)[0]
        ci = F.interpolate(ci[None, None, crop[0], crop[1]].float(), (h, w), mode="nearest")[0, 0].long()
        si = F.interpolate(si[None, None, crop[0], crop[1]].float(), (h, w), mode="nearest")[0, 0].long()
        b, c, s = (1 + 0.4 * (v - 0.5) for v in r[i, 5:8])
        xi = (xi + 1) / 2 * b
        grey = xi.mean(0, keepdim=True)
        xi = grey + (xi - grey) * s
        xi = xi.mean() + (xi - xi.mean()) * c
        xs.append(xi.clamp(0, 1) * 2 - 1)
        cs.append(ci)
        ss.append(si)
    return torch.stack(xs), torch.stack(cs), torch.stack(ss)


@dataclass
class Budget:
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-3
    real_fraction: float = 0.5
    norm: str = "group"


def draw(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (k,), generator=gen)


def train_model(real: Data | None, synthetic: Data | None, augment: bool, seed: int, b: Budget) -> SegNet:
    """The same network, steps and batch for every condition. A batch takes
    round(batch x real_fraction) real images when both kinds are there."""
    torch.manual_seed(seed)
    net = SegNet(norm=b.norm)
    opt = torch.optim.AdamW(net.parameters(), lr=b.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, b.lr, total_steps=b.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1000 + seed)
    n_real = 0 if real is None else (b.batch if synthetic is None else round(b.batch * b.real_fraction))
    net.train()
    for _ in range(b.steps):
        parts = []
        if n_real:
            i = draw(len(real), n_real, gen)
            parts.append((real.images[i], real.colour[i], real.shape[i]))
        if b.batch - n_real:
            i = draw(len(synthetic), b.batch - n_real, gen)
            parts.append((synthetic.images[i], synthetic.colour[i], synthetic.shape[i]))
        x, c, s = (torch.cat(t) for t in zip(*parts, strict=True))
        if augment:
            x, c, s = classic(x, c, s, gen)
        pc, ps = net(x)
        loss = F.cross_entropy(pc, c) + F.cross_entropy(ps, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def miou(confusion: np.ndarray) -> float:
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float((tp[union > 0] / union[union > 0]).mean())


@torch.no_grad()
def score(net: SegNet, test: Data, chunk: int = 250) -> tuple[float, float]:
    """(colour mIoU, shape mIoU) over the test set."""
    cc = np.zeros((COLOUR_CLASSES, COLOUR_CLASSES), np.int64)
    cs = np.zeros((SHAPE_CLASSES, SHAPE_CLASSES), np.int64)
    for start in range(0, len(test), chunk):
        pc, ps = net(test.images[start : start + chunk])
        for conf, pred, truth, k in (
            (cc, pc.argmax(1), test.colour[start : start + chunk], COLOUR_CLASSES),
            (cs, ps.argmax(1), test.shape[start : start + chunk], SHAPE_CLASSES),
        ):
            conf += np.bincount((truth * k + pred).reshape(-1).numpy(), minlength=k * k).reshape(k, k)
    return miou(cc), miou(cs)


@dataclass
class Run:
    condition: str
    n: int
    seed: int
    real: int
    synthetic: int
    colour_miou: float
    shape_miou: float
    seconds: float  # CPU seconds of training and scoring
    key: str = ""  # what the run depended on (see `run_key`): other data, another run


def augment(
    lumen: Path, models: Path | None, pool: Path, out: Path, per_image: int, ks: str, extra: list[str]
):
    """`lumen augment` on the pool (resumes where a previous call stopped)."""
    args = [str(lumen), "augment", "--input", pool / "images", "--masks", pool / "masks"]
    args += ["--coco", pool / "coco.json", "--out", out, "--per-image", str(per_image), "--components", ks]
    args += ["--quiet", *extra]
    if models is not None:
        args += ["--models", models]
    env = {k: v for k, v in os.environ.items() if k != "LUMEN_MODELS"}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"lumen augment failed: {done.stderr}")


def run_key(aug: Path, sources: set[str], budget: Budget, test_count: int) -> str:
    """A digest of everything a run's result depends on besides its condition,
    N and seed: the lumen outputs of its N sources (each output's name, seed
    and score: the score is a function of the pixels, so another model or
    engine that made other images gives another key), the test-set size and
    the training budget. A recorded run with another key is not reused."""
    import hashlib

    h = hashlib.sha256(json.dumps([asdict(budget), test_count]).encode())
    for line in sorted((aug / "manifest.jsonl").read_text().splitlines()):
        m = json.loads(line)
        if Path(m["source"]).name in sources:
            h.update(json.dumps([m["output"], m["seed"], m["score"]]).encode())
    return h.hexdigest()[:16]


def conditions(min_scores: list[float]) -> list[str]:
    names = ["real", "classic", "real+lumen"] + [f"real+lumen@{s:g}" for s in min_scores]
    names += [f"real+lumen colour@{s:g}" for s in min_scores]
    return names + [f"lumen@{min_scores[-1]:g}" if min_scores else "lumen", "real+recoloured"]


def colour_trusted_from(d: Data, min_score: float) -> Data:
    """Every output, its colour labels kept only where the score is at least
    `min_score` (elsewhere ignored by the loss): the geometry of a layout
    survives where its colours may not (FG IoU 0.91 at K = 2 against colour
    mIoU 0.74), so the shape labels of every output still apply."""
    colour = d.colour.clone()
    colour[torch.from_numpy(d.scores < min_score)] = IGNORE
    return Data(d.images, colour, d.shape, d.scores, d.sources)


def names_of(min_scores, only) -> list[str]:
    return [c for c in conditions(list(min_scores)) if only is None or c in only]


def study(
    work: Path,
    lumen: Path,
    models: Path | None = None,
    sizes: tuple[int, ...] = (16, 64, 256),
    seeds: int = 3,
    test_count: int = 500,
    per_image: int = 2,
    components: str = "2,8",
    min_scores: tuple[float, ...] = (0.6,),
    budget: Budget | None = None,
    extra: list[str] | None = None,
    runs_path: Path | None = None,
    only: tuple[str, ...] | None = None,
    log=print,
    prompts: str = "captions",
) -> dict:
    """Runs every (condition, N, seed) not yet in `runs_path` (default
    WORK/runs.jsonl) with this data and budget; returns the runs, the
    per-cell mean and std, and the label agreement of the outputs. `only`:
    these conditions alone (names as `conditions` gives them). `prompts`:
    `captions` (each source's caption, its colour labels carried as they
    are) or `recoloured` (`recoloured_prompts`, the colour labels renamed
    with the prompt's colours; outputs in WORK/augmented-recoloured)."""
    budget = budget or Budget()
    work.mkdir(parents=True, exist_ok=True)
    if prompts not in ("captions", "recoloured"):
        raise ValueError(f"prompts must be captions or recoloured, not {prompts!r}")
    pool, test_dir = work / "pool", work / "test"
    aug = work / ("augmented" if prompts == "captions" else "augmented-recoloured")
    extra = list(extra or [])
    for folder, seed, count in ((pool, POOL_SEED, max(sizes)), (test_dir, TEST_SEED, test_count)):
        if not (folder / "coco.json").is_file() or len(list((folder / "images").glob("*.png"))) != count:
            write_dataset(folder, seed, count)
    captions = None
    if prompts == "recoloured":
        listed = recoloured_prompts(pool, max(sizes), len(components.split(",")), per_image, seed=0)
        (work / "prompts-recoloured.txt").write_text("".join(p + "\n" for p in listed))
        extra += ["--prompts", str(work / "prompts-recoloured.txt")]
        captions = {
            json.loads(x)["file_name"]: json.loads(x)["text"]
            for x in (pool / "images" / "metadata.jsonl").read_text().splitlines()
        }
    started = time.perf_counter()
    augment(lumen, models, pool, aug, per_image, components, extra)
    augment_seconds = time.perf_counter() - started
    real_all, test = load_real(pool), load_real(test_dir)
    names = [f"{i:06d}.png" for i in range(len(real_all))]
    synth_all = load_augmented(aug, names, captions)
    agreement = label_agreement(synth_all)
    geometry = geometry_agreement(synth_all)
    runs_path = runs_path or work / "runs.jsonl"
    keys = {n: run_key(aug, set(names[:n]), budget, test_count) for n in sizes}
    done = {}
    if runs_path.is_file():
        for line in runs_path.read_text().splitlines():
            r = Run(**json.loads(line))
            if keys.get(r.n) == r.key:
                done[(r.condition, r.n, r.seed)] = r
    for n in sizes:
        key = keys[n]
        real = real_all.take(real_all.sources < n)
        synth = synth_all.take(synth_all.sources < n)
        for condition in names_of(min_scores, only):
            for seed in range(seeds):
                if (condition, n, seed) in done:
                    continue
                r, s, classic_aug = real, None, condition == "classic"
                if condition.startswith("real+lumen"):
                    s = synth
                if condition.startswith("real+lumen colour@"):
                    s = colour_trusted_from(synth, float(condition.split("@")[1]))
                elif "@" in condition:
                    s = synth.take(synth.scores >= float(condition.split("@")[1]))
                if condition.startswith("lumen"):
                    r = None
                if condition == "real+recoloured":
                    s = recoloured(real, per_image * len(components.split(",")), seed)
                t0, c0 = time.perf_counter(), time.process_time()
                net = train_model(r, s, classic_aug, seed, budget)
                colour, shape = score(net, test)
                run = Run(
                    condition,
                    n,
                    seed,
                    0 if r is None else len(r),
                    0 if s is None else len(s),
                    colour,
                    shape,
                    round(time.process_time() - c0, 1),
                    key,
                )
                log(
                    f"{condition} N={n} seed={seed}: colour {colour:.3f} shape {shape:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
                runs_path.parent.mkdir(parents=True, exist_ok=True)
                with open(runs_path, "a") as f:
                    f.write(json.dumps(asdict(run)) + "\n")
                done[(condition, n, seed)] = run
    runs = [done[(c, n, s)] for n in sizes for c in names_of(min_scores, only) for s in range(seeds)]
    return {
        "runs": [asdict(r) for r in runs],
        "cells": cells(runs),
        "label_agreement": agreement_table(
            synth_all, agreement, sorted({0.5, 0.6, 0.7, 0.8, 0.9, *min_scores})
        ),
        "geometry_agreement": agreement_table(
            synth_all, geometry, sorted({0.5, 0.6, 0.7, 0.8, 0.9, *min_scores})
        ),
        "augment_seconds": round(augment_seconds, 1),
        "budget": asdict(budget),
    }


def cells(runs: list[Run]) -> list[dict]:
    out: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        out.setdefault((r.condition, r.n), []).append(r)
    rows = []
    for (condition, n), rs in out.items():
        c = np.array([r.colour_miou for r in rs])
        s = np.array([r.shape_miou for r in rs])
        rows.append(
            {
                "condition": condition,
                "n": n,
                "seeds": len(rs),
                "real": rs[0].real,
                "synthetic": rs[0].synthetic,
                "colour_mean": float(c.mean()),
                "colour_std": float(c.std(ddof=1)) if len(c) > 1 else 0.0,
                "shape_mean": float(s.mean()),
                "shape_std": float(s.std(ddof=1)) if len(s) > 1 else 0.0,
                "cpu_seconds": float(np.mean([r.seconds for r in rs])),
            }
        )
    return rows


def agreement_table(d: Data, agreement: np.ndarray, min_scores: list[float]) -> list[dict]:
    """How often the carried colour labels still match their image, by threshold."""
    rows = []
    for s in [None, *min_scores]:
        keep = np.ones(len(d), bool) if s is None else d.scores >= s
        a = agreement[keep]
        rows.append(
            {
                "min_score": s,
                "kept": int(keep.sum()),
                "of": len(d),
                "mean": float(a.mean()) if len(a) else None,
                "worst_decile": float(np.percentile(a, 10)) if len(a) else None,
                "mismatched": int((a < 0.5).sum()),
            }
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        "| N | condition | real + synthetic | colour mIoU | shape mIoU |",
        "|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['n']} | {c['condition']} | {c['real']} + {c['synthetic']} | "
            f"{c['colour_mean']:.3f} ± {c['colour_std']:.3f} | {c['shape_mean']:.3f} ± {c['shape_std']:.3f} |"
        )
    for key, what in (("label_agreement", "colour labels"), ("geometry_agreement", "shape geometry")):
        lines += ["", f"| --min-score | kept | {what} agree: mean | worst decile | mismatched (< 0.5) |"]
        lines += ["|---|---|---|---|---|"]
        for a in result.get(key, []):
            s = "none" if a["min_score"] is None else f"{a['min_score']:g}"
            mean = "-" if a["mean"] is None else f"{a['mean']:.3f}"
            worst = "-" if a["worst_decile"] is None else f"{a['worst_decile']:.3f}"
            lines.append(f"| {s} | {a['kept']} / {a['of']} | {mean} | {worst} | {a['mismatched']} |")
    return "\n".join(lines)
