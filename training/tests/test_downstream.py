"""The downstream study's own measures, on real shapes data (no lumen run):
the recoloured ceiling keeps the geometry and relabels the colours exactly,
and both label checks give 1 where the labels apply and less where they do
not."""

from __future__ import annotations

import numpy as np
import torch

from lumen_train.shapes import world
from lumen_train.shapes.dataset import write_dataset
from lumen_train.shapes.downstream import (
    POOL_SEED,
    Data,
    geometry_agreement,
    label_agreement,
    load_real,
    recolour_caption,
    recoloured,
    recoloured_prompts,
    renamed_classes,
)


def test_recoloured_prompts_rename_colours_and_the_masks_follow(tmp_path):
    write_dataset(tmp_path, POOL_SEED, 5)
    prompts = recoloured_prompts(tmp_path, 5, ks=2, per_image=2, seed=0)
    assert len(prompts) == 20  # the plan order: source, K, variant
    captions = [world.sample(POOL_SEED, i)[1] for i in range(5)]
    assert sum(p != captions[i // 4] for i, p in enumerate(prompts)) >= 15
    for i, p in enumerate(prompts):
        table = renamed_classes(captions[i // 4], p)
        assert table is not None and table[0] == 0
        # The table maps the source's colour classes onto the prompt's colours, in order.
        _, _, shapes, _ = world.sample(POOL_SEED, i // 4)
        named = [w for w in p.split() if w in world.COLOURS]
        for shape, colour in zip(shapes, named, strict=True):
            old = 1 + list(world.COLOURS).index(shape.colour)
            assert world.CLASS_NAMES[table[old]] == colour
    # A prompt for another source (other kinds) or an inconsistent renaming is refused.
    assert renamed_classes("a red circle", "a red square") is None
    assert renamed_classes("a red circle and a red square", "a blue circle and a green square") is None
    assert recolour_caption("a red circle and a cyan square", [5, 1, 2, 3, 4, 0]) == (
        "a cyan circle and a red square"
    )


def test_recoloured_keeps_geometry_and_relabels_colour(tmp_path):
    write_dataset(tmp_path, POOL_SEED, 6)
    real = load_real(tmp_path)
    assert (geometry_agreement(real) == 1).all() and (label_agreement(real) == 1).all()
    r = recoloured(real, 3, seed=0)
    assert len(r) == 18 and (r.sources == np.repeat(np.arange(6), 3)).all()
    assert (geometry_agreement(r) == 1).all() and (label_agreement(r) == 1).all()
    for i in range(len(r)):
        assert torch.equal(r.shape[i], real.shape[r.sources[i]])
    # The colours changed somewhere: the colour labels are not the source's.
    changed = [not torch.equal(r.colour[i], real.colour[r.sources[i]]) for i in range(len(r))]
    assert sum(changed) >= 12
    # Labels moved by 8 pixels no longer fit: both checks fall.
    shifted = Data(r.images, r.colour.roll(8, -1), r.shape.roll(8, -1), r.scores, r.sources)
    assert geometry_agreement(shifted).mean() < 0.7
    assert label_agreement(shifted).mean() < 0.7
    assert world.SIZE == r.images.shape[-1]


def test_lumen_outputs_keep_their_labels_as_the_study_measured(lumen, tmp_path):
    """The two label checks of the study on a small `lumen augment` run
    (8 pool images × 2 variants × K 2, 8, the study's settings). Measured
    (control scale 4) over 64 outputs of 16 images: geometry 0.933 on
    average, colour labels above score 0.85 agree 0.930; on these 32: 0.915
    and 0.916 (24 kept). At control scale 2: 0.85 / 0.906; 0.833 / 0.862 (19).
    Guarded with margin, so that a model or pipeline change that moves
    shapes further from their labels fails here."""
    from lumen_train.shapes.downstream import augment, load_augmented

    pool, out = tmp_path / "pool", tmp_path / "augmented"
    write_dataset(pool, POOL_SEED, 8)
    augment(lumen, None, pool, out, 2, "2,8", [])
    synth = load_augmented(out, [f"{i:06d}.png" for i in range(8)])
    assert len(synth) == 32
    geometry, colour = geometry_agreement(synth), label_agreement(synth)
    assert geometry.mean() >= 0.86, geometry
    kept = synth.scores >= 0.85
    assert kept.sum() >= 16, synth.scores
    assert colour[kept].mean() >= 0.86, (colour[kept], synth.scores[kept])
