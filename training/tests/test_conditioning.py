"""The trainer's conditioning, K truncation and output size are lumen's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, run_lumen
from safetensors.torch import load_file

from lumen_train.conditioning import conditioning, output_size, truncate
from lumen_train.data import KSampler, LayoutsExport

KMAX = 16


@pytest.mark.parametrize("k,size", [(5, (64, 48)), (16, (80, 56)), (1, (33, 97))])
def test_conditioning_equals_lumens(lumen, tmp_path, k, size):
    out = tmp_path / "c.safetensors"
    w, h = size
    run_lumen(
        lumen,
        "layout",
        "--image",
        TINY.parent.parent / "tests/fixtures/images/tiny-street.png",
        "-k",
        k,
        "--conditioning",
        f"{w}x{h}",
        "--out",
        out,
    )
    t = load_file(str(out))
    mine = conditioning(t["layout"], KMAX, h, w)
    ref = t["conditioning"]
    assert mine.shape == ref.shape == (KMAX, h, w)
    rel = float((mine - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel
    assert float(mine[k:].abs().sum()) == 0.0


def test_exported_rows_give_lumens_conditioning(lumen, images, layouts, tmp_path):
    export = LayoutsExport(layouts)
    for i, row in enumerate(export.rows):
        out = tmp_path / "c.safetensors"
        run_lumen(
            lumen,
            "layout",
            "--image",
            images / row.source,
            "-k",
            KMAX,
            "--conditioning",
            "64x48",
            "--out",
            out,
        )
        ref = load_file(str(out))["conditioning"]
        mine = conditioning(export.layout(i), KMAX, 48, 64)
        # The export stores f16: within its rounding of lumen's f32.
        assert float((mine - ref).abs().max() / ref.abs().max()) <= 1e-3, row.source


def test_truncation_zeroes_exactly_the_channels_from_k():
    cond = torch.randn(KMAX, 8, 6) + 3.0
    for k in range(1, KMAX + 1):
        t = truncate(cond, k)
        assert torch.equal(t[:k], cond[:k]) and float(t[k:].abs().sum()) == 0.0
    batch = torch.randn(3, KMAX, 4, 4) + 3.0
    t = truncate(batch, torch.tensor([1, 7, 16]))
    for b, k in enumerate([1, 7, 16]):
        assert torch.equal(t[b, :k], batch[b, :k]) and float(t[b, k:].abs().sum()) == 0.0


def test_every_k_is_drawn():
    rng = np.random.default_rng(0)
    for dist in ("uniform", "low", "high"):
        draws = [KSampler(KMAX, dist).draw(rng) for _ in range(4000)]
        assert set(draws) == set(range(1, KMAX + 1)), dist
    low = np.mean([KSampler(KMAX, "low").draw(rng) for _ in range(4000)])
    high = np.mean([KSampler(KMAX, "high").draw(rng) for _ in range(4000)])
    assert low < (KMAX + 1) / 2 < high
    assert {KSampler(KMAX, "full").draw(rng) for _ in range(10)} == {KMAX}


def test_output_size_is_lumens_default(lumen, images, tmp_path):
    for name in ["street/a.png", "c.png", "e.png"]:
        out = tmp_path / "x.png"
        run_lumen(
            lumen,
            "synthesize",
            "--image",
            images / name,
            "--steps",
            "1",
            "--seed",
            "1",
            "--quiet",
            "--out",
            out,
        )
        record = json.loads(run_lumen_record(out))
        from PIL import Image

        w, h = Image.open(images / name).size
        assert output_size(w, h, 512, 16) == (record["width"], record["height"]), name


def run_lumen_record(png) -> str:
    from PIL import Image

    with Image.open(png) as img:
        return img.text["parameters"]
