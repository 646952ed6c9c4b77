"""The shapes world is exactly the one the issue defines, reproducible from
seeds, with disjoint training and evaluation splits; its segmentation and
metrics are right on known cases."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from lumen_train.shapes import world
from lumen_train.shapes.evaluate import colour_miou, diversity, foreground_iou

ALLOWED = {tuple(c) for c in world.PALETTE.astype(int).tolist()}
CAPTION = re.compile(
    r"^a (red|green|blue|yellow|magenta|cyan) (circle|square|triangle)"
    r"((, a \w+ \w+)* and a (red|green|blue|yellow|magenta|cyan) (circle|square|triangle))?$"
)


def test_images_follow_the_rules():
    counts = {1: 0, 2: 0, 3: 0}
    kinds, colours, backgrounds = set(), set(), set()
    for i in range(300):
        image, caption, shapes, background = world.sample(world.TRAIN_SEED, i)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        pixels = {tuple(p) for p in image.reshape(-1, 3).tolist()}
        assert pixels <= ALLOWED, "hard edges: only palette colours"
        assert tuple(image[0, 0]) in {world.BACKGROUNDS[background]} | set(world.COLOURS.values())
        counts[len(shapes)] += 1
        backgrounds.add(background)
        for s in shapes:
            assert world.MIN_BOX <= s.size <= world.MAX_BOX
            assert 0 <= s.x and s.x + s.size <= 64 and 0 <= s.y and s.y + s.size <= 64
            kinds.add(s.kind)
            colours.add(s.colour)
        assert CAPTION.match(caption), caption
        assert caption == world.caption(shapes)
        # Later shapes are drawn over earlier ones: the last shape's pixels show its colour.
        assert (image[world.mask(shapes[-1])] == world.COLOURS[shapes[-1].colour]).all()
        # Nearest-palette segmentation of a guide is exact.
        expected = np.zeros((64, 64), int)
        for s in shapes:
            expected[world.mask(s)] = 1 + list(world.COLOURS).index(s.colour)
        assert (world.segment(image) == expected).all()
    assert all(counts.values()) and kinds == set(world.KINDS) and colours == set(world.COLOURS)
    assert backgrounds == set(world.BACKGROUNDS)


def test_shape_geometry():
    circle = world.mask(world.Shape("circle", "red", 10, 10, 20))
    square = world.mask(world.Shape("square", "red", 10, 10, 20))
    triangle = world.mask(world.Shape("triangle", "red", 10, 10, 20))
    assert square.sum() == 400
    assert abs(circle.sum() - np.pi * 100) < 12
    assert abs(triangle.sum() - 200) < 12
    assert triangle[10:12].sum() < triangle[28:30].sum(), "apex up"
    assert circle.sum() < square.sum() and (circle & ~square).sum() == 0


def test_splits_are_reproducible_and_disjoint():
    a, b = world.sample(0, 7)[0], world.sample(0, 7)[0]
    assert np.array_equal(a, b)

    def digest(seed, i):
        return hashlib.sha256(world.sample(seed, i)[0].tobytes()).hexdigest()

    train = {digest(world.TRAIN_SEED, i) for i in range(2000)}
    held_out = {digest(world.EVAL_SEED, i) for i in range(200)}
    assert not train & held_out


def test_write_split_is_an_imagefolder(tmp_path):
    world.write_split(tmp_path, world.EVAL_SEED, 3)
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"file_name": "000002.png"' in lines[2]
    from PIL import Image

    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "000001.png")), world.sample(world.EVAL_SEED, 1)[0]
    )


def test_metrics():
    g = np.zeros((4, 4), int)
    g[:2, :2] = 1  # red, 4 pixels
    g[2:, 2:] = 3  # blue, 4 pixels
    assert foreground_iou(g, g) == colour_miou(g, g) == 1.0
    o = g.copy()
    o[2:, 2:] = 1  # blue region drawn red
    assert foreground_iou(g, o) == 1.0
    assert colour_miou(g, o) == (4 / 8 + 0.0) / 2
    o = np.zeros_like(g)
    assert foreground_iou(g, o) == 0.0 and colour_miou(g, o) == 0.0
    x = np.zeros((2, 2, 3), np.uint8)
    y = np.full((2, 2, 3), 255, np.uint8)
    assert diversity([x, x]) == 0.0
    assert abs(diversity([x, y]) - np.sqrt(3)) < 1e-6
