"""The layout encoder's training views and objective (lumen_train.shapes.encoder)."""

from __future__ import annotations

import torch
from transformers import Dinov2Config, Dinov2Model

from lumen_train.shapes import base, encoder, fit


def batch(n: int = 4) -> torch.Tensor:
    x, _ = fit.images(0, n)
    return (x + 1) / 2


def test_colour_index_ranks_the_most_common_colour_first():
    x = batch()
    index = encoder.colour_index(x)
    for i in range(len(x)):
        counts = torch.bincount(index[i].reshape(-1))
        assert counts[0] == counts.max()
        # Pixels of one index share one colour, and different indices differ.
        colours = [x[i][:, index[i] == c] for c in range(len(counts))]
        assert all((c == c[:, :1]).all() for c in colours)
        assert len({tuple(c[:, 0].tolist()) for c in colours}) == len(colours)


def test_views_correspond_patch_for_patch_and_recolour_every_colour():
    x = batch()
    gen = torch.Generator().manual_seed(3)
    patch = base.ENCODER["patch_size"]
    v1, v2, corr, mixed = encoder.views(x, step=10_000, gen=gen, patch=patch, curriculum=500, max_shift=3)
    b, _, h, w = x.shape
    g = h // patch
    index = encoder.colour_index(x)

    def patches(t):  # (B·g·g, C·p·p)
        c = t.shape[1]
        return t.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, -1)

    i1 = patches(index.unsqueeze(1).float())
    i2 = patches(encoder.colour_index(v2).unsqueeze(1).float())
    ok = corr >= 0
    assert ok.sum() >= b * (g - 3) ** 2  # a shift of at most 3 patches keeps that much
    # The content under each correspondence is the same partition of pixels.
    same = [
        len(torch.unique(torch.stack([a, c], 1), dim=0)) == len(torch.unique(a))
        for a, c in zip(i1[ok], i2[corr[ok]], strict=True)
    ]
    assert all(same)
    assert mixed.sum() > 0 and (~mixed).sum() > 0
    # Full random colours: no colour of the original survives in view 1.
    original = {tuple(c) for c in x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    recoloured = {tuple(c) for c in v1.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert not original & recoloured
    assert index.max() < 8


def test_the_objective_learns_on_a_tiny_encoder():
    torch.manual_seed(0)
    cfg = dict(base.ENCODER, hidden_size=32, num_attention_heads=2, num_hidden_layers=1)
    obj = encoder.Objective(Dinov2Model(Dinov2Config(**cfg)))
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    x = batch(8)
    losses = []
    for step in range(30):
        gen = torch.Generator().manual_seed(step)
        loss = encoder.loss_of(obj, x, step, gen, curriculum=10_000, anchors=256)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # Start: a random encoder's tokens hold colour, so some patches are found
    # already; the end must be below it (measured: 5.5 → 4.1 in 30 steps).
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_geometry_targets_are_the_edges_and_the_largest_region():
    x = batch(2)
    index = encoder.colour_index(x)
    patch = base.ENCODER["patch_size"]
    t = encoder.geometry_targets(index, patch)
    g = x.shape[-1] // patch
    assert t.shape == (2, g * g, 3 * patch * patch)
    maps = t.reshape(2, g, g, 3, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, g * patch, g * patch)
    assert torch.equal(maps[:, 2].bool(), index == 0)
    assert torch.equal(maps[:, 0, :, :-1].bool(), index[:, :, :-1] != index[:, :, 1:])
    assert torch.equal(maps[:, 1, :-1].bool(), index[:, :-1] != index[:, 1:])
    assert not maps[:, 0, :, -1].any() and not maps[:, 1, -1].any()
    # Colour-blind: any renaming of the colours gives the same targets.
    gen = torch.Generator().manual_seed(0)
    v = encoder.remap(x, index, 1.0, gen)
    assert torch.equal(encoder.geometry_targets(encoder.colour_index(v), patch), t)


def test_jitter_folder_keeps_the_regions_in_new_colours(tmp_path):
    import numpy as np
    from PIL import Image

    from lumen_train.shapes import world

    src = tmp_path / "images"
    world.write_split(src, world.TRAIN_SEED, 6)
    out = tmp_path / "jitter"
    assert encoder.jitter_folder(src, out, seed=0) == {"images": 6, "made": 6, "out": str(out)}
    assert (out / "metadata.jsonl").read_text() == (src / "metadata.jsonl").read_text()

    def pixels(path):
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]

    for f in sorted(src.glob("*.png")):
        a, b = pixels(f), pixels(out / f.name)
        ia, ib = encoder.colour_index(a.float() / 255), encoder.colour_index(b.float() / 255)
        # The same partition into regions (up to the labelling of each region) ...
        pairs = set(zip(ia.reshape(-1).tolist(), ib.reshape(-1).tolist(), strict=True))
        assert len(pairs) == len(ia.unique()) == len(ib.unique()), f.name
        # ... in colours that moved.
        assert (a.float() - b.float()).abs().mean() > 10, f.name
    # Resumable and seeded: a rerun makes nothing; another seed, other colours.
    assert encoder.jitter_folder(src, out, seed=0)["made"] == 0
    other = tmp_path / "other"
    encoder.jitter_folder(src, other, seed=1)
    first = sorted(src.glob("*.png"))[0].name
    assert (out / first).read_bytes() != (other / first).read_bytes()
