"""Training of the shapes model's layout encoder without labels, so that its
neural layout says where which shapes are and not what colour they have.

A random DINOv2 keeps colour as the dominant variation of its tokens: the
PCA layout of an image redrawn in new colours correlates with the
original's less than two unrelated images' layouts do, so the caption
cannot set the colours of the output and LUMEN's diversity is lost. DINOv2
itself learns to ignore colour from colour jitter between views; this is
that recipe in the shapes world's terms, a dense (per-patch) contrastive
objective over two views of each unlabelled training image:

- every distinct colour of the image (background included) is remapped to a
  colour of its own per view, blended from the original towards a uniform
  random colour over the first `curriculum` steps (with full random colours
  from the start the random encoder's tokens are all colour and nothing is
  learned: the loss stays at chance);
- the second view is shifted by whole patches (up to `max_shift`, the
  vacated border filled with the image's most common colour), so that a
  patch is told apart by what is around it, not by where it is;
- the first (student) view has a fraction of its patches replaced by
  DINOv2's mask token (iBOT's masked-patch prediction);
- InfoNCE over corresponding patches through a small projection head: each
  anchor (a patch of view 1 that view 2 also holds) must pick its own patch
  among every patch of view 2 in the batch. Anchors are drawn from patches
  that hold more than one colour (edges, corners, small shapes) with weight
  1 and from single-colour patches with weight `flat_weight`: a flat
  background patch can only be told from another by its distance to the
  nearest shape, which is position, not shape;
- optionally (`geometry_weight` > 0) a colour-blind reconstruction term: a
  linear decoder on each student token predicts, per pixel of its patch,
  whether the colour changes to the right and below and whether the pixel
  belongs to the image's largest colour region. Colour invariance alone
  lets the encoder drop where an outline runs inside a patch; this keeps it,
  and the targets come from the pixels, not from labels.

The encoder keeps its architecture (the base's config); the trained weights
replace `MODELS/encoder`. The run is resumable (`fit.Run`). `probe` judges
an encoder the way the layout is used (PCA to K components), with the
world's labels used only for that judgement."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lumen_train.shapes import fit, world

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalize(rgb01: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] → the encoder's input (ImageNet statistics, as lumen feeds it)."""
    return (rgb01 - MEAN) / STD


def colour_index(x: torch.Tensor) -> torch.Tensor:
    """Per image, each pixel's index among the image's distinct colours (B, H, W),
    0 being the most common colour."""
    b, _, h, w = x.shape
    out = torch.empty(b, h, w, dtype=torch.long)
    for i in range(b):
        colours, inv, counts = torch.unique(
            x[i].reshape(3, -1).T, dim=0, return_inverse=True, return_counts=True
        )
        rank = torch.empty_like(counts)
        rank[counts.argsort(descending=True)] = torch.arange(len(counts))
        out[i] = rank[inv].view(h, w)
    return out


def remap(x: torch.Tensor, index: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Each distinct colour blended towards its own uniform random colour by `alpha`."""
    b = x.shape[0]
    n = int(index.max()) + 1
    new = torch.rand(b, n, 3, generator=gen)
    target = torch.stack([new[i][index[i]] for i in range(b)]).permute(0, 3, 1, 2)
    return (1 - alpha) * x + alpha * target


def shift(x: torch.Tensor, index: torch.Tensor, dy: int, dx: int, patch: int):
    """Move image content by (dy, dx) patches; vacated pixels take colour 0's value."""
    b, _, h, w = x.shape
    fill = torch.stack([x[i][:, index[i] == 0][:, 0] for i in range(b)])  # (B, 3)
    out = fill.view(b, 3, 1, 1).expand(b, 3, h, w).clone()
    oi = torch.zeros(b, h, w, dtype=torch.long)
    py, px = dy * patch, dx * patch
    ys, yd = (slice(0, h - py), slice(py, h)) if py >= 0 else (slice(-py, h), slice(0, h + py))
    xs, xd = (slice(0, w - px), slice(px, w)) if px >= 0 else (slice(-px, w), slice(0, w + px))
    out[:, :, yd, xd] = x[:, :, ys, xs]
    oi[:, yd, xd] = index[:, ys, xs]
    return out, oi


def jitter_folder(images: Path, out: Path, seed: int = 0) -> dict:
    """Colour-jittered copies of a folder of flat-colour images (the shapes
    world's): every distinct colour of an image, background included, becomes
    a uniform random colour of its own, seeded by (seed, file name), so the
    copy has the same regions in new colours. File names and
    `metadata.jsonl` are kept; no labels are read. Resumable: existing copies
    are kept."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in images.iterdir() if p.suffix.lower() == ".png")
    made = 0
    for f in files:
        target = out / f.name
        if target.is_file():
            continue
        with Image.open(f) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        digest = hashlib.sha256(f"{seed}/{f.name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        y = remap(x, colour_index(x), 1.0, gen)[0].permute(1, 2, 0).numpy()
        tmp = out / (f.name + ".tmp")
        Image.fromarray((y * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        tmp.rename(target)
        made += 1
    if (images / "metadata.jsonl").is_file():
        shutil.copyfile(images / "metadata.jsonl", out / "metadata.jsonl")
    return {"images": len(files), "made": made, "out": str(out)}


class Head(nn.Sequential):
    def __init__(self, d: int, hidden: int = 128, out: int = 64):
        super().__init__(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out))


class Objective(nn.Module):
    """The encoder, its projection head and its geometry decoder (only the
    encoder is kept)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = Head(encoder.config.hidden_size)
        p = encoder.config.patch_size
        self.geometry = nn.Linear(encoder.config.hidden_size, 3 * p * p)

    def tokens(self, pixels: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(pixel_values=pixels, bool_masked_pos=masked).last_hidden_state
        return hidden[:, 1:]  # (B, h·w, D): no CLS (the base has no registers)


def geometry_targets(index: torch.Tensor, patch: int) -> torch.Tensor:
    """Per patch, three colour-blind maps of its pixels (B, h·w, 3·p·p): the
    pixel differs from its right neighbour, from the one below, and belongs
    to the image's largest colour region. They say where the edges run and
    which side is the surrounding region, whatever the colours."""
    b, h, w = index.shape
    right = torch.zeros(b, h, w, dtype=torch.bool)
    right[:, :, :-1] = index[:, :, :-1] != index[:, :, 1:]
    below = torch.zeros(b, h, w, dtype=torch.bool)
    below[:, :-1] = index[:, :-1] != index[:, 1:]
    maps = torch.stack([right, below, index == 0], 1).float()  # (B, 3, H, W)
    g, q = h // patch, w // patch
    return maps.reshape(b, 3, g, patch, q, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, g * q, -1)


def views(x01: torch.Tensor, step: int, gen: torch.Generator, patch: int, curriculum: int, max_shift: int):
    """Two views of a batch and the patch correspondence: for each patch of
    view 1 (flattened index over the batch) the index of the same content in
    view 2, or -1, and whether the patch holds more than one colour."""
    b, _, h, w = x01.shape
    gh, gw = h // patch, w // patch
    alpha = min(1.0, step / max(1, curriculum))
    index = colour_index(x01)
    v1 = remap(x01, index, alpha, gen)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    v2, _ = shift(remap(x01, index, alpha, gen), index, dy, dx, patch)
    pi = index.view(b, gh, patch, gw, patch)
    mixed = (pi.amax((2, 4)) != pi.amin((2, 4))).reshape(b, -1)
    gy, gx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ty, tx = gy + dy, gx + dx
    inside = ((ty >= 0) & (ty < gh) & (tx >= 0) & (tx < gw)).reshape(-1)
    target = (ty.clamp(0, gh - 1) * gw + tx.clamp(0, gw - 1)).reshape(-1)
    base = (torch.arange(b) * gh * gw).view(b, 1)
    corr = torch.where(inside.view(1, -1), base + target.view(1, -1), torch.full((b, gh * gw), -1))
    return v1, v2, corr.reshape(-1), mixed.reshape(-1)


def loss_of(
    obj: Objective,
    x01: torch.Tensor,
    step: int,
    gen: torch.Generator,
    *,
    curriculum: int = 500,
    max_shift: int = 3,
    mask_ratio: float = 0.3,
    anchors: int = 1024,
    flat_weight: float = 0.1,
    tau: float = 0.1,
    geometry_weight: float = 0.0,
) -> torch.Tensor:
    patch = obj.encoder.config.patch_size
    v1, v2, corr, mixed = views(x01, step, gen, patch, curriculum, max_shift)
    b, n = x01.shape[0], corr.numel() // x01.shape[0]
    masked = torch.rand(b, n, generator=gen) < mask_ratio
    t1 = obj.tokens(normalize(v1), masked)
    z1 = F.normalize(obj.head(t1).reshape(b * n, -1), dim=-1)
    z2 = F.normalize(obj.head(obj.tokens(normalize(v2))).reshape(b * n, -1), dim=-1)
    weight = torch.where(mixed, 1.0, flat_weight) * (corr >= 0)
    pick = torch.multinomial(weight, min(anchors, int((weight > 0).sum())), generator=gen)
    logits = z1[pick] @ z2.T / tau
    loss = F.cross_entropy(logits, corr[pick])
    if geometry_weight:
        target = geometry_targets(colour_index(x01), patch)
        loss = loss + geometry_weight * F.binary_cross_entropy_with_logits(obj.geometry(t1), target)
    return loss


def train_encoder(
    models: Path,
    work: Path,
    steps: int,
    batch: int,
    lr: float,
    every: int,
    **objective,
) -> dict:
    """Train `MODELS/encoder` in place (its config kept); resumable in `work`."""
    from transformers import Dinov2Model

    encoder = Dinov2Model.from_pretrained(models / "encoder")
    torch.manual_seed(2)
    obj = Objective(encoder)
    run = fit.Run(work, obj, lr, ema_decay=None)

    def loss_at(step, gen):
        x, _ = fit.images(step, batch)
        return loss_of(obj, (x + 1) / 2, step, gen, **objective)

    fit.loop(run, steps, lr, every, loss_at)
    obj.encoder.eval()
    fit.save_model(obj.encoder, models / "encoder")
    return {"encoder_steps": run.step, "encoder_seconds": round(run.seconds, 1)}


# ---- judging an encoder (the world's labels are used here only) ----


def patch_labels(seed: int, index: int, patch: int):
    """Per patch of image `index`: its majority colour class, the kind of its
    majority shape (-1 where background wins) and its foreground fraction."""
    image, _, shapes, _ = world.sample(seed, index)
    kind = np.full((world.SIZE, world.SIZE), -1)
    for s in shapes:
        kind[world.mask(s)] = world.KINDS.index(s.kind)
    colour = world.segment(image)
    g = world.SIZE // patch

    def blocks(a):
        return a.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)

    def majority(a, classes, offset=0):
        counts = np.stack([(a == c).sum(-1) for c in range(-offset, classes)], -1)
        return counts.argmax(-1) - offset

    cb, kb = blocks(colour), blocks(kind)
    return (
        image,
        majority(cb, len(world.CLASS_NAMES)),
        majority(kb, len(world.KINDS), offset=1),
        (kb >= 0).mean(-1),
    )


def layout_tokens(encoder, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        return encoder(pixel_values=normalize(x)).last_hidden_state[:, 1:]


def linear_probe(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, classes: int) -> float:
    """Accuracy on (xt, its labels) of multinomial logistic regression fitted on (x, y)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    lin = nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin(xt).argmax(-1)


def probe(models: Path, components: int = 8, count: int = 200, seed: int = 2) -> dict:
    """The encoder judged as the layout uses it: tokens of `count` images of
    split `seed` projected on their PCA basis (fitted on half of them) to
    `components`, then linear probes fitted on that half and scored on the
    other: colour class per patch (lower is better: the caption should set
    colours), shape kind on foreground patches and foreground fraction
    (higher is better: the layout should say where which shape is); and the
    layout's correlation with the same shapes redrawn in new colours (near 1
    is better) and with an unrelated image."""
    from transformers import Dinov2Model

    encoder = Dinov2Model.from_pretrained(models / "encoder").eval()
    patch = encoder.config.patch_size
    rows = [patch_labels(seed, i, patch) for i in range(count)]
    tokens = layout_tokens(encoder, np.stack([r[0] for r in rows]))  # (N, P, D)
    colour = torch.from_numpy(np.stack([r[1] for r in rows]))
    kind = torch.from_numpy(np.stack([r[2] for r in rows]))
    fg = torch.from_numpy(np.stack([r[3] for r in rows])).float()
    half = count // 2
    flat = tokens[:half].reshape(-1, tokens.shape[-1])
    mean = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
    proj = (tokens - mean) @ v[:components].T  # (N, P, K)
    tr, te = proj[:half].reshape(-1, components), proj[half:].reshape(-1, components)
    c_tr, c_te = colour[:half].reshape(-1), colour[half:].reshape(-1)
    k_tr, k_te = kind[:half].reshape(-1), kind[half:].reshape(-1)
    f_tr, f_te = fg[:half].reshape(-1), fg[half:].reshape(-1)
    # Colour of foreground patches only: the background's grey is not a colour class.
    on_tr, on_te = c_tr > 0, c_te > 0
    colour_acc = (linear_probe(tr[on_tr], c_tr[on_tr] - 1, te[on_te], 6) == c_te[on_te] - 1).float().mean()
    kk_tr, kk_te = k_tr >= 0, k_te >= 0
    kind_acc = (linear_probe(tr[kk_tr], k_tr[kk_tr], te[kk_te], 3) == k_te[kk_te]).float().mean()
    a = torch.cat([tr, torch.ones(len(tr), 1)], 1)
    coef = torch.linalg.lstsq(a, f_tr.unsqueeze(1)).solution
    pred = torch.cat([te, torch.ones(len(te), 1)], 1) @ coef
    r2 = 1 - ((pred.squeeze(1) - f_te) ** 2).mean() / f_te.var()
    # Layout correlation (Pearson over patches × components, per image) of
    # each scored image with the same shapes redrawn in new colours, and
    # with the next image (unrelated).
    rng = np.random.default_rng([seed, 99])
    redrawn = []
    for i in range(half, count):
        _, _, shapes, _ = world.sample(seed, i)
        image = np.empty((world.SIZE, world.SIZE, 3), np.uint8)
        image[:] = list(world.BACKGROUNDS.values())[rng.integers(len(world.BACKGROUNDS))]
        for sh in shapes:
            image[world.mask(sh)] = list(world.COLOURS.values())[rng.integers(len(world.COLOURS))]
        redrawn.append(image)
    other = (layout_tokens(encoder, np.stack(redrawn)) - mean) @ v[:components].T

    def corr(a, b):
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    recol = corr(proj[half:], other)
    unrelated = corr(proj[half:], proj[half:].roll(1, 0))
    # Chance: the most common class of the scored half.
    chance_c = float(torch.bincount(c_te[on_te] - 1).max() / on_te.sum())
    chance_k = float(torch.bincount(k_te[kk_te]).max() / kk_te.sum())
    return {
        "components": components,
        "colour_accuracy": round(float(colour_acc), 3),
        "colour_chance": round(chance_c, 3),
        "kind_accuracy": round(float(kind_acc), 3),
        "kind_chance": round(chance_k, 3),
        "foreground_r2": round(float(r2), 3),
        "recoloured_correlation": round(float(recol.mean()), 3),
        "recoloured_correlation_p10": round(float(recol.quantile(0.1)), 3),
        "unrelated_correlation": round(float(unrelated.mean()), 3),
    }
