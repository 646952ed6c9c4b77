"""Shared fixtures: the lumen binary, an image folder with captions, its
`lumen layouts` export on the repository's tiny model, and a runner for
`python -m lumen_train` in its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models/tiny"
SHAPES = ROOT / "models/shapes"
FIXTURES = ROOT / "tests/fixtures/images"


@pytest.fixture(scope="session")
def lumen() -> Path:
    """The lumen binary: $LUMEN_BIN, else target/debug/lumen (built if missing)."""
    path = Path(os.environ.get("LUMEN_BIN", ROOT / "target/debug/lumen"))
    if not path.is_file():
        subprocess.run(["cargo", "build", "--locked", "--quiet"], cwd=ROOT, check=True)
    return path


def run_lumen(lumen: Path, *args) -> str:
    """`lumen ARGS`, on models/tiny unless ARGS name other models; checked."""
    env = {**os.environ, "LUMEN_MODELS": str(TINY)}
    out = subprocess.run([str(lumen), *map(str, args)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """Six guides (two nested), with captions from metadata.jsonl and a sidecar."""
    d = tmp_path_factory.mktemp("images")
    (d / "street").mkdir()
    for src, dst in [
        ("tiny-street.png", "street/a.png"),
        ("registers-street.png", "street/b.png"),
        ("tiny-portrait.png", "c.png"),
        ("tiny-room.png", "d.png"),
        ("registers-wide.png", "e.png"),
        ("tiny-square.png", "f.png"),
    ]:
        shutil.copy(FIXTURES / src, d / dst)
    (d / "c.txt").write_text("a portrait\n")
    (d / "street/metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a quiet street"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": "another street"})
        + "\n"
    )
    return d


@pytest.fixture(scope="session")
def layouts(lumen, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    run_lumen(
        lumen, "layouts", "--models", TINY, "--images", images, "--out", out, "--shard-size", "4", "--quiet"
    )
    return out


def train(args: list, launcher: list | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lumen_train controlnet ARGS` (or under `launcher`), checked."""
    cmd = (launcher or [sys.executable]) + ["-m", "lumen_train", "controlnet", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def summaries(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def base_args(images: Path, layouts: Path, output: Path, **extra) -> list:
    args = {
        "models": TINY,
        "data": layouts,
        "images": images,
        "output": output,
        "resolution": 64,
        "batch-size": 2,
        "log-every": 1,
        "checkpoint-every": 0,
    }
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    flat = []
    for k, v in args.items():
        if v is True:
            flat.append(f"--{k}")
        elif v is not None and v is not False:
            flat += [f"--{k}", str(v)]
    return flat
