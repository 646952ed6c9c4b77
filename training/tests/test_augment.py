"""`lumen augment` on a labelled shapes dataset, read back the way users'
training code reads it: COCO through pycocotools, masks and YOLO files as
files; and the fidelity score against the labels' colour IoU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumen_train.shapes import world
from lumen_train.shapes.dataset import rle, score_correlation, spearman, visible_masks, write_dataset

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402


def augment(lumen: Path, *args) -> str:
    """`lumen augment ARGS` on the embedded shapes model; checked."""
    env = {k: v for k, v in os.environ.items() if k != "LUMEN_MODELS"}
    cmd = [str(lumen), "augment", "--quiet", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dataset_labels_are_the_world_exactly(tmp_path):
    write_dataset(tmp_path, 1, 5)
    coco = COCO(str(tmp_path / "coco.json"))
    for i in range(5):
        image, _, shapes, _ = world.sample(1, i)
        classes = np.asarray(Image.open(tmp_path / "masks" / f"{i:06d}.png"))
        assert (classes == world.segment(image)).all()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i + 1]))
        visible = [v for v in visible_masks(shapes) if v.any()]
        assert len(anns) == len(visible)
        for a, v in zip(anns, visible, strict=True):
            assert (coco.annToMask(a) == v).all()
            assert a["area"] == v.sum()
        assert len((tmp_path / "yolo" / f"{i:06d}.txt").read_text().splitlines()) == len(visible)
    # The uncompressed RLE is pycocotools' own.
    m = visible_masks(world.sample(1, 0)[2])[0]
    assert mask_utils.area(mask_utils.frPyObjects({"size": [64, 64], "counts": rle(m)}, 64, 64)) == m.sum()
    assert spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)


def test_augmented_coco_loads_and_matches_the_carried_masks(lumen, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 1, 4)
    summary = augment(
        lumen,
        *("--input", data / "images", "--out", out, "--masks", data / "masks"),
        *("--coco", data / "coco.json", "--yolo", data / "yolo"),
        *("--per-image", 2, "--components", "2,8", "--steps", 6, "--width", 96, "--height", 96),
    )
    assert "16 images written" in summary, summary
    source = COCO(str(data / "coco.json"))
    coco = COCO(str(out / "annotations.json"))
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 16 == len(coco.getImgIds())
    for m in lines:
        img = coco.loadImgs([m["coco_image_id"]])[0]
        assert f"images/{img['file_name']}" == m["output"]
        assert (img["width"], img["height"]) == (96, 96) == Image.open(out / m["output"]).size
        src_id = int(Path(m["source"]).stem) + 1
        src_anns = source.loadAnns(source.getAnnIds(imgIds=[src_id]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert [a["category_id"] for a in anns] == [a["category_id"] for a in src_anns]
        name = Path(m["output"]).relative_to("images")
        carried = np.asarray(Image.open(out / "masks" / name.with_suffix(".png")))
        assert carried.shape == (96, 96)
        union = np.zeros((96, 96), bool)
        for a, s in zip(anns, src_anns, strict=True):
            # Boxes scale by 96/64; instance masks are the nearest-resized source masks.
            assert a["bbox"] == pytest.approx([v * 1.5 for v in s["bbox"]])
            union |= coco.annToMask(a).astype(bool)
        # The instances cover exactly the mask's foreground (both resized the same way).
        assert (union == (carried > 0)).all()
        yolo = out / "labels" / name.with_suffix(".txt")
        assert yolo.read_text() == (data / "yolo" / f"{Path(m['source']).stem}.txt").read_text()


def test_score_ranks_outputs_like_their_colour_iou(lumen, tmp_path):
    """A higher score goes with a higher colour mIoU against the carried-over
    mask (Spearman's rho; 0.88 over 576 outputs in the README's measurement,
    asserted loosely here on 32), and, like the IoU, it rises with K."""
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, 1, 8)
    augment(
        lumen,
        *("--input", data / "images", "--out", out, "--masks", data / "masks"),
        *("--per-image", 2, "--components", "1,8", "--seed", 5),
    )
    r = score_correlation(out)
    assert r["outputs"] == 32
    assert r["overall"] > 0.5, r
    assert r["k1"]["mean_colour_miou"] < r["k8"]["mean_colour_miou"], r
    assert r["k1"]["mean_score"] < r["k8"]["mean_score"], r
