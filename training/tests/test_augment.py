"""`lumen augment` on a labelled shapes dataset, read back the way users'
training code reads it: Hugging Face `datasets` (imagefolder), COCO through
pycocotools, YOLO through ultralytics' dataset check and the format it
documents; and the fidelity score against the labels' colour IoU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lumen_train.shapes import world
from lumen_train.shapes.dataset import rle, score_correlation, spearman, visible_masks, write_dataset


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


def test_dataset_carries_its_class_names(tmp_path):
    write_dataset(tmp_path, 1, 2)
    assert json.loads((tmp_path / "masks" / "classes.json").read_text()) == world.CLASS_NAMES
    assert yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text()) == {
        "names": dict(enumerate(world.KINDS))
    }
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert coco["categories"] == [{"id": i + 1, "name": k} for i, k in enumerate(world.KINDS)]


@pytest.fixture(scope="module")
def augmented(lumen, tmp_path_factory) -> tuple[Path, dict]:
    """3 shapes images augmented at K 2 and 8 with every label kind: OUT and
    its manifest lines by (source, K)."""
    tmp = tmp_path_factory.mktemp("augmented")
    data, out = tmp / "data", tmp / "out"
    write_dataset(data, 1, 3)
    summary = augment(
        lumen,
        *("--input", data / "images", "--out", out, "--masks", data / "masks"),
        *("--coco", data / "coco.json", "--yolo", data / "yolo"),
        *("--per-image", 1, "--components", "2,8", "--steps", 4),
    )
    assert "6 images written" in summary, summary
    lines = {(m["source"], m["components"]): m for m in map(json.loads, (out / "manifest.jsonl").open())}
    assert len(lines) == 6
    return out, lines


def test_classes_json_names_every_value_and_id_from_the_input(augmented):
    out, _ = augmented
    classes = json.loads((out / "classes.json").read_text())
    masks = classes["masks"]["classes"]
    assert [(v["value"], v["name"]) for v in masks] == list(enumerate(world.CLASS_NAMES))
    assert classes["masks"]["names_from"].endswith("masks/classes.json")
    assert classes["masks"]["classes"][1]["colour"] == list(world.COLOURS["red"])
    assert classes["coco"]["classes"] == [{"id": i + 1, "name": k} for i, k in enumerate(world.KINDS)]
    assert classes["yolo"]["classes"] == [{"id": i, "name": k} for i, k in enumerate(world.KINDS)]
    assert classes["yolo"]["names_from"].endswith("yolo/data.yaml")
    assert classes["objects"] == "coco"


def test_output_loads_in_datasets_and_pycocotools(augmented):
    """One row per output in `load_dataset("imagefolder")` (the README's
    command) with image, text, mask and objects, and no mask among the
    images; objects are the COCO boxes; each COCO instance lies on its
    shape's colour class in the carried mask."""
    out, lines = augmented
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 6
    columns = {"image", "mask", "text", "objects", "source", "components", "seed", "score"}
    assert columns <= set(ds.column_names)
    assert isinstance(ds.features["mask"], datasets.Image)
    coco = COCO(str(out / "annotations.json"))
    for row in ds:
        m = lines[(row["source"], row["components"])]
        image, text, shapes, _ = world.sample(1, int(Path(m["source"]).stem))
        assert row["text"] == text == m["prompt"]
        assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
        mask = np.asarray(row["mask"])
        assert (mask == world.segment(image)).all()  # 64 -> 64: the source's classes exactly
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[m["coco_image_id"]]))
        assert row["objects"]["bbox"] == [pytest.approx(a["bbox"]) for a in anns]
        assert row["objects"]["categories"] == [a["category_id"] for a in anns]
        visible = [s for s, v in zip(shapes, visible_masks(shapes), strict=True) if v.any()]
        assert len(anns) == len(visible)
        for a, shape in zip(anns, visible, strict=True):
            pixels = coco.annToMask(a).astype(bool)
            assert pixels.sum() == a["area"] > 0
            assert (mask[pixels] == world.CLASS_NAMES.index(shape.colour)).all()
            assert coco.loadCats([a["category_id"]])[0]["name"] == shape.kind


def test_data_yaml_is_the_documented_yolo_format(augmented):
    """ultralytics' documented format: train/val image folders (labels/ beside
    images/), names covering every class id the labels use; no `path`, so
    the root is the file's folder."""
    out, _ = augmented
    spec = yaml.safe_load((out / "data.yaml").read_text())
    assert spec["train"] == spec["val"] == "images" and "path" not in spec
    assert spec["names"] == dict(enumerate(world.KINDS))
    files = list((out / "labels").glob("*.txt"))
    used = {int(line.split()[0]) for f in files for line in f.read_text().splitlines()}
    assert used and used <= set(spec["names"])
    for path in (out / "images").glob("*.png"):
        assert (out / "labels" / f"{path.stem}.txt").is_file()


def test_data_yaml_passes_ultralytics_dataset_check(augmented, monkeypatch):
    """ultralytics (in the test extra) checks the dataset and reads every label."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    out, _ = augmented
    checked = check_det_dataset(str(out / "data.yaml"))
    assert checked["nc"] == 3 and checked["names"] == dict(enumerate(world.KINDS))
    assert Path(checked["train"]) == out / "images"
    dataset = YOLODataset(img_path=checked["train"], data=checked, task="detect", imgsz=64, augment=False)
    labels = dataset.labels
    assert len(labels) == 6
    for lb in labels:
        text = (out / "labels" / f"{Path(lb['im_file']).stem}.txt").read_text()
        assert lb["cls"].ravel().astype(int).tolist() == [int(line.split()[0]) for line in text.splitlines()]


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
