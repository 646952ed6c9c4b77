#!/usr/bin/env python3
"""Side-by-side benchmark of the layout encoder: lumen vs transformers.

Builds (once, cached under scripts/.cache/, never committed) a random-weight
DINOv2-L/14 model folder from transformers' configuration, then in one run on
this machine times

  * lumen:        `lumen bench layout --size 518` (its own process, peak RSS from
                  /proc VmHWM as the binary reports it), and
  * transformers: `Dinov2Model` eager f32 (its default SDPA attention), same
                  weights, same input size, same thread count,

and prints the medians, the ratio lumen / transformers and both peak RSS.

Usage: python scripts/bench_layout.py [--size 518] [--batch 1] [--runs 5]
       [--lumen target/release/lumen]
"""

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "scripts/.cache/dinov2-large-random"


def build() -> None:
    if (CACHE / "encoder/model.safetensors").exists():
        return
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                       patch_size=14, image_size=518, layerscale_value=1.0)
    Dinov2Model(cfg).eval().save_pretrained(CACHE / "encoder", safe_serialization=True)
    k = 64
    q, _ = torch.linalg.qr(torch.randn(1024, k))
    save_file({"mean": torch.zeros(1024), "components": q.T.contiguous(),
               "explained_variance": torch.linspace(2.0, 1.0, k)}, str(CACHE / "pca.safetensors"))


def bench_transformers(size: int, batch: int, warmup: int, runs: int) -> list:
    model = Dinov2Model.from_pretrained(CACHE / "encoder").eval()
    x = torch.randn(batch, 3, size, size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t = time.perf_counter()
            model(pixel_values=x)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lumen", default=str(ROOT / "target/release/lumen"))
    a = ap.parse_args()
    build()
    out = subprocess.run(
        [a.lumen, "bench", "layout", "--models", str(CACHE), "--size", str(a.size), "--batch", str(a.batch),
         "--warmup", str(a.warmup), "--runs", str(a.runs)],
        check=True, capture_output=True, text=True)
    ours = json.loads(out.stdout)
    ours_ms = ours["timings"][0]["median_ms"]
    ref = bench_transformers(a.size, a.batch, a.warmup, a.runs)
    ref_ms = statistics.median(ref)
    ref_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "stage": f"DINOv2-L/14 encoder {a.size}x{a.size} batch {a.batch} f32 ({torch.get_num_threads()} threads)",
        "lumen_median_ms": round(ours_ms, 1),
        "transformers_median_ms": round(ref_ms, 1),
        "ratio_lumen_over_transformers": round(ours_ms / ref_ms, 3),
        "lumen_runs_ms": [round(t, 1) for t in ours["timings"][0]["runs_ms"]],
        "transformers_runs_ms": [round(t, 1) for t in ref],
        "lumen_peak_rss_mib": round(ours["peak_rss_bytes"] / 2**20),
        "transformers_peak_rss_mib": round(ref_rss / 2**20),
    }, indent=2))


if __name__ == "__main__":
    main()
