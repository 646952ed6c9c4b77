#!/usr/bin/env python3
"""Side-by-side benchmark of the training-data export: `lumen layouts` vs the
same pipeline in transformers, same weights, same images, one run.

Uses the random-weight DINOv2-L/14 folder of `bench_layout.py` (built once,
cached under scripts/.cache/, never committed) and writes N synthetic photos
(JPEG, 640x480 and 480x640, shapes on noise) once. Then, on this machine:

  * lumen:        `lumen layouts --models DIR --images IMAGES --out OUT`
                  (decode, resize, normalize, encoder, PCA, f16 shards); its
                  summary's images/s counts the export loop, not model loading;
  * transformers: Pillow decode, bicubic resize to the same encoder input
                  (longer side 518, shorter side rounded to 14), ImageNet
                  normalization, `Dinov2Model` eager f32 in batches of the same
                  size, the same PCA projection, f16 safetensors per image;
                  timed over the same loop, model loading excluded.

Prints images/s for both and the ratio. Torch uses the same thread count as
lumen (all cores unless --threads).

Usage: python scripts/bench_layouts.py [--images 32] [--batch 8] [--lumen target/release/lumen]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layout  # the cached DINOv2-L folder

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "scripts/.cache/bench-layouts-images"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def make_images(n: int) -> None:
    if IMAGES.is_dir() and len(list(IMAGES.glob("*.jpg"))) == n:
        return
    shutil.rmtree(IMAGES, ignore_errors=True)
    IMAGES.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (640, 480) if i % 2 == 0 else (480, 640)
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            box = [x0, y0, x0 + int(rng.integers(40, 300)), y0 + int(rng.integers(40, 300))]
            draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(IMAGES / f"img-{i:04d}.jpg", quality=92)


def input_size(w: int, h: int, layout_size: int = 518, patch: int = 14) -> tuple:
    def short(s, long):
        return max(1, round(s * layout_size / long / patch)) * patch

    return (layout_size, short(h, w)) if w >= h else (short(w, h), layout_size)


def run_transformers(batch: int, out: Path) -> float:
    cache = bench_layout.CACHE
    model = Dinov2Model.from_pretrained(cache / "encoder").eval()
    pca = load_file(str(cache / "pca.safetensors"))
    whitened = pca["components"] / pca["explained_variance"].sqrt()[:, None]
    files = sorted(IMAGES.glob("*.jpg"))
    start = time.perf_counter()
    with torch.inference_mode():
        pending = {}

        def flush(size):
            paths, pixels = zip(*pending.pop(size))
            tokens = model(pixel_values=torch.stack(pixels)).last_hidden_state[:, 1:]
            for path, t in zip(paths, tokens):
                layout = ((t - pca["mean"]) @ whitened.T).T
                gh, gw = size[1] // 14, size[0] // 14
                save_file({"layout": layout.reshape(-1, gh, gw).half().contiguous()}, str(out / f"{path.stem}.st"))

        for path in files:
            img = Image.open(path).convert("RGB")
            size = input_size(*img.size)
            x = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
            x = torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy())
            pending.setdefault(size, []).append((path, x))
            if len(pending[size]) == batch:
                flush(size)
        for size in list(pending):
            flush(size)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--lumen", default=str(ROOT / "target/release/lumen"))
    a = p.parse_args()
    bench_layout.build()
    make_images(a.images)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [a.lumen, "layouts", "--models", str(bench_layout.CACHE), "--images", str(IMAGES),
               "--out", str(Path(tmp) / "lumen"), "--batch", str(a.batch), "--quiet"]
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        t = time.perf_counter()
        summary = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        lumen_wall = time.perf_counter() - t
        (Path(tmp) / "torch").mkdir()
        torch_ips = run_transformers(a.batch, Path(tmp) / "torch")
    lumen_ips = summary["images_per_second"]
    report = {
        "images": a.images,
        "batch": a.batch,
        "threads": a.threads,
        "lumen_images_per_second": lumen_ips,
        "lumen_wall_seconds_with_loading": round(lumen_wall, 2),
        "transformers_images_per_second": round(torch_ips, 3),
        "lumen_over_transformers_throughput": round(lumen_ips / torch_ips, 3),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
