#!/usr/bin/env python3
"""Side-by-side benchmark of the synthesis stages: lumen vs diffusers.

Uses the full-size random-weight SD1.5-sized folder that
scripts/make_big_models.py builds under scripts/.cache/sd15-random/ (built
here first if missing; never committed). In one run on this machine, with the
same weights, f32 and the same thread count (torch.set_num_threads and
RAYON_NUM_THREADS for lumen), it times

  * lumen:     `lumen bench synthesis --models DIR --stages ... --sizes ...
               --warmup W --runs N` (its own process; peak RSS is the VmHWM
               the binary reports), and
  * diffusers: eager modules (transformers' CLIPTextModel, diffusers'
               ControlNetModel, UNet2DConditionModel, AutoencoderKL with their
               default attention processor, SDPA) under torch.inference_mode,

and prints per stage the lumen median, the diffusers median and the ratio
lumen / diffusers, plus each side's peak RSS (a table on stderr, JSON on
stdout).

Stages (identical on both sides; inputs are synthetic, timestep 500):

  text_encoder    tokenise [negative, prompt] to 2 x 77 ids + CLIP text
                  encoder forward (batch 2)
  cfg_step_S      one classifier-free-guidance step at S x S output:
                  ControlNet forward (latents [2, 4, S/8, S/8], text states
                  [2, 77, 768], conditioning [2, 64, S, S], scale 1.0), then
                  the UNet forward with its residuals
  vae_decode_S    vae.decode of one [1, 4, S/8, S/8] latent
  image_S         (only when named) one whole S x S image: the guide's layout
                  (DINOv2 forward at the model's layout size, PCA projection
                  to the default K, zero-padded to Kmax, bilinear to S x S),
                  then diffusers' StableDiffusionControlNetPipeline with the
                  model's scheduler, --steps steps (default 20), guidance 7.5,
                  negative prompt, decode to an image; lumen runs
                  `lumen bench synthesis --stages image`, the same request
                  path as `lumen synthesize`

Python loads only what a stage needs (text encoder; ControlNet + UNet; VAE)
and frees it before the next, and reports both its process peak
(getrusage ru_maxrss, kept across the resets) and a per-stage peak (VmHWM,
reset through /proc/self/clear_refs before each stage). lumen loads the whole
model set (DINOv2 encoder included) in every call, so its peak RSS is not per
stage and not comparable with the per-stage figures.

`--mode peak-rss` (or `all`) also runs one real 512 x 512 CFG image,
`/usr/bin/time -v lumen synthesize --models DIR --image
tests/fixtures/images/tiny-street.png --prompt ... --width 512 --height 512
--steps 1 --out TMP/x.png` (default guidance 7.5, so CFG),
and reports its "Maximum resident set size" against the 8 GB target.

The report also gives, per side, the average number of cores that other
processes used meanwhile (`other_load_cores`, from /proc/stat) and warns when
it exceeds 0.1: on a shared machine a concurrent build silently halves a side.

Defaults (warm-up 1, runs 3, all five stages) finish in a few minutes per
side on 2 cores; a 512 x 512 CFG step takes tens of seconds.

On a GPU (`--device cuda`, with `--dtype f16` or `bf16`) both sides run on
the device in that dtype: lumen's `--device/--dtype`, torch modules moved
there (diffusers' default attention processor, SDPA), timings synchronised;
`--batch 1,8` adds `cfg_step_S_bN` stages (N images, 2N rows); each side's
peak device memory is what nvidia-smi reports used (sampled every 50 ms,
less the memory used before the side started), and for diffusers also
torch.cuda.max_memory_allocated per stage. scripts/gpu_check.sh runs it so.

Usage: python scripts/bench_synthesis.py [--stages text_encoder,vae_decode_256]
       [--sizes 256,512] [--warmup 1] [--runs 3] [--threads 2]
       [--side both|lumen|python] [--mode bench|peak-rss|all]
       [--models scripts/.cache/sd15-random] [--lumen target/release/lumen]
       [--device cpu|cuda] [--dtype f32|f16|bf16] [--batch 1,8] [--json FILE]
"""

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ROOT / "scripts/.cache/sd15-random"
FAMILIES = ("text_encoder", "cfg_step", "vae_decode", "image")
PROMPT = "a red house by the sea"  # as lumen's bench
NEGATIVE = "blurry, dark"
TIMESTEP = 500.0
CONTROL_SCALE = 1.0
GUIDE = ROOT / "tests/fixtures/images/tiny-street.png"
RSS_TARGET_BYTES = 8 * 10**9
OTHER_LOAD_WARN = 0.1  # average cores used by other processes during a side before warning


# ---------------------------------------------------------------------------
# Stage selection


def cfg_name(size: int, batch: int) -> str:
    return f"cfg_step_{size}" if batch == 1 else f"cfg_step_{size}_b{batch}"


def select_stages(spec: str, sizes: list[int], batches: list[int] = (1,)) -> list[str]:
    """Full stage names in canonical order from 'text_encoder,cfg_step,vae_decode_256,...'
    (the cfg_step family at every size and every batch in `batches`)."""
    wanted = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in FAMILIES:
            if item == "text_encoder":
                names = [item]
            elif item == "cfg_step":
                names = [cfg_name(s, b) for s in sizes for b in batches]
            else:
                names = [f"{item}_{s}" for s in sizes]
        else:
            m = re.fullmatch(r"(cfg_step|vae_decode|image)_(\d+)(_b\d+)?", item)
            if not m or (m.group(3) and m.group(1) != "cfg_step"):
                raise SystemExit(f"unknown stage {item!r}: use text_encoder, cfg_step[_S[_bN]], vae_decode[_S], "
                                 "image[_S]")
            names = [item]
        wanted += [n for n in names if n not in wanted]
    keys = [split(n) for n in wanted if n != "text_encoder"]
    fam_order = {"cfg_step": 0, "vae_decode": 1, "image": 2}
    ordered = sorted(set(keys), key=lambda k: (fam_order[k[0]], k[1], k[2]))
    return [n for n in ["text_encoder"] if n in wanted] + [
        cfg_name(s, b) if f == "cfg_step" else f"{f}_{s}" for f, s, b in ordered]


def split(stage: str) -> tuple[str, int | None, int]:
    """(family, size, batch) of a stage name."""
    if stage == "text_encoder":
        return stage, None, 1
    m = re.fullmatch(r"(cfg_step|vae_decode|image)_(\d+)(?:_b(\d+))?", stage)
    return m.group(1), int(m.group(2)), int(m.group(3) or 1)


def lumen_calls(stages: list[str]) -> list[tuple[list[str], list[int], list[int]]]:
    """Group the stages into `lumen bench synthesis` calls (--stages families x --sizes
    x --batch): lumen runs every selected family at every given size (and cfg_step at
    every batch), so sizes that need different families or batches go to different
    calls (each call loads the models)."""
    by_size: dict[int, tuple[set, set]] = {}
    for st in stages:
        fam, s, b = split(st)
        if s is not None:
            fams, bs = by_size.setdefault(s, (set(), set()))
            fams.add(fam)
            if fam == "cfg_step":
                bs.add(b)
    groups: dict[tuple, list[int]] = {}
    for s, (fams, bs) in by_size.items():
        groups.setdefault((tuple(sorted(fams)), tuple(sorted(bs)) or (1,)), []).append(s)
    calls = [(list(f), sz, list(b)) for (f, b), sz in groups.items()]
    if "text_encoder" in stages:
        if calls:
            calls[0][0].insert(0, "text_encoder")
        else:
            calls.append((["text_encoder"], [], [1]))
    return calls


class GpuMemWatch:
    """Peak device memory used while a side runs, as nvidia-smi reports it (MiB,
    sampled every 50 ms, less what was used when the watch started); None off
    the GPU or without nvidia-smi."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.peak_mib = None

    @staticmethod
    def used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True, timeout=5).stdout
            return int(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _poll(self):
        while not self.stop.is_set():
            u = self.used()
            if u is not None:
                self.max = max(self.max, u)
            self.stop.wait(0.05)

    def __enter__(self):
        if self.enabled and (base := self.used()) is not None:
            self.base = self.max = base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        else:
            self.enabled = False
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.peak_mib = self.max - self.base
        return False


# ---------------------------------------------------------------------------
# Other load on the machine


class CpuWatch:
    """CPU time the rest of the machine used while a side ran (from /proc/stat minus
    this process' and its waited-for children's own CPU time), in average cores."""

    CLK = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _snap():
        try:
            v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CpuWatch.CLK  # all but idle, iowait
        except (OSError, ValueError, IndexError):
            busy = None
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self.start = self._snap()
        return self

    def __exit__(self, *exc):
        (w0, b0, o0), (w1, b1, o1) = self.start, self._snap()
        self.other_cores = None if b0 is None or b1 is None else max(0.0, (b1 - b0) - (o1 - o0)) / (w1 - w0)
        return False


# ---------------------------------------------------------------------------
# lumen


def run_lumen(a, stages: list[str], env: dict) -> dict:
    timings, peaks, cmds = {}, [], []
    for fams, sizes, batches in lumen_calls(stages):
        cmd = [a.lumen, "bench", "synthesis", "--models", str(a.models), "--stages", ",".join(fams),
               "--warmup", str(a.warmup), "--runs", str(a.runs), "--device", a.device, "--dtype", a.dtype,
               "--batch", ",".join(map(str, batches))]
        if sizes:
            cmd += ["--sizes", ",".join(map(str, sizes))]
        if "image" in fams:
            cmd += ["--steps", str(a.steps)]
        cmds.append(" ".join(cmd))
        print(f"[lumen] {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as e:
            return {"error": f"{a.lumen}: {e}", "commands": cmds}
        if p.returncode != 0:
            return {"error": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}", "commands": cmds}
        rep = json.loads(p.stdout)
        for t in rep["timings"]:
            if t["stage"] in stages:
                timings[t["stage"]] = t
        if rep.get("peak_rss_bytes") is not None:
            peaks.append(rep["peak_rss_bytes"])
    missing = [s for s in stages if s not in timings]
    out = {"timings": timings, "peak_rss_bytes": max(peaks) if peaks else None, "commands": cmds}
    if missing:
        out["error"] = f"lumen reported no timing for {missing}"
    return out


def run_peak_rss(a, env: dict) -> dict:
    """Peak RSS of one real 512x512 CFG image (1 step) under /usr/bin/time -v."""
    with tempfile.TemporaryDirectory() as tmp:
        out_png = Path(tmp) / "x.png"
        cmd = ["/usr/bin/time", "-v", a.lumen, "synthesize", "--models", str(a.models), "--image", str(GUIDE),
               "--prompt", PROMPT, "--width", "512", "--height", "512", "--steps", "1", "--out", str(out_png)]
        print(f"[peak-rss] {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as e:
            return {"command": " ".join(cmd), "error": str(e)}
        res = {"command": " ".join(cmd), "returncode": p.returncode, "wrote_png": out_png.exists()}
        m = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        w = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr)
        if p.returncode != 0:
            res["error"] = p.stderr.strip()[-2000:]
        if m:
            rss = int(m[-1]) * 1024
            res.update(max_rss_bytes=rss, max_rss_gib=round(rss / 2**30, 2), max_rss_gb=round(rss / 1e9, 2),
                       target_bytes=RSS_TARGET_BYTES, under_target=rss < RSS_TARGET_BYTES)
        if w:
            res["wall_clock"] = w[-1]
        return res


# ---------------------------------------------------------------------------
# diffusers / transformers


def vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_PEAK_BEFORE_RESET = 0


def reset_hwm() -> bool:
    """Reset this process' peak RSS to its current RSS (Linux >= 4.0). This also
    resets getrusage's ru_maxrss, so the peak so far is kept in _PEAK_BEFORE_RESET."""
    global _PEAK_BEFORE_RESET
    _PEAK_BEFORE_RESET = max(_PEAK_BEFORE_RESET, vm_hwm() or 0,
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synthetic(shape) -> torch.Tensor:
    """Uniform in [-2, 2), like lumen's bench inputs (values do not affect timing)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=g) * 4 - 2


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_runs(f, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        f()
        sync()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def timing(stage: str, runs_ms: list[float]) -> dict:
    return {"stage": stage, "runs_ms": runs_ms, "median_ms": statistics.median(runs_ms),
            "min_ms": min(runs_ms), "mean_ms": statistics.fmean(runs_ms)}


def processors(*modules) -> list[str]:
    return sorted({type(p).__name__ for m in modules for p in m.attn_processors.values()})


def run_python(a, stages: list[str]) -> dict:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()

    per_stage_rss = reset_hwm()
    timings, rss, info, gpu = {}, {}, {}, {}
    models = a.models
    dev = torch.device(a.device)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    on_gpu = dev.type == "cuda"

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, dt)

    def stage_done(name, runs_ms):
        timings[name] = timing(name, runs_ms)
        if per_stage_rss:
            rss[name] = vm_hwm()
        if on_gpu:
            gpu[name] = torch.cuda.max_memory_allocated() // 2**20
            torch.cuda.reset_peak_memory_stats()
        print(f"[diffusers] {name}: median {timings[name]['median_ms']:.1f} ms", file=sys.stderr, flush=True)

    with torch.inference_mode():
        if "text_encoder" in stages:
            tok = CLIPTokenizer.from_pretrained(models / "tokenizer")
            text = CLIPTextModel.from_pretrained(models / "text_encoder", torch_dtype=dt).eval().to(dev)
            info["text_encoder_attention"] = text.config._attn_implementation

            def f():
                ids = tok([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
                assert ids.shape == (2, 77)
                return text(ids.to(dev)).last_hidden_state

            stage_done("text_encoder", time_runs(f, a.warmup, a.runs))
            del tok, text, f
            gc.collect()

        cfg = [s for s in stages if s.startswith("cfg_step_")]
        if cfg:
            reset_hwm()
            controlnet = ControlNetModel.from_pretrained(models / "controlnet", torch_dtype=dt).eval().to(dev)
            unet = UNet2DConditionModel.from_pretrained(models / "unet", torch_dtype=dt).eval().to(dev)
            info["unet_controlnet_attention"] = processors(unet, controlnet)
            c = unet.config.in_channels
            kmax = controlnet.config.conditioning_channels
            f8 = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
            t = torch.tensor(TIMESTEP, device=dev)
            for i, name in enumerate(cfg):
                if i:
                    reset_hwm()
                _, s, n = split(name)
                emb = place(synthetic((2, 77, unet.config.cross_attention_dim))).repeat(n, 1, 1)
                lat = place(synthetic((2 * n, c, s // f8, s // f8)))
                cond = place(synthetic((2 * n, kmax, s, s)))

                def f():
                    down, mid = controlnet(lat, t, encoder_hidden_states=emb, controlnet_cond=cond,
                                           conditioning_scale=CONTROL_SCALE, guess_mode=False, return_dict=False)
                    return unet(lat, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample

                stage_done(name, time_runs(f, a.warmup, a.runs))
                del lat, cond, emb, f
                gc.collect()
            del controlnet, unet
            gc.collect()

        dec = [s for s in stages if s.startswith("vae_decode_")]
        if dec:
            reset_hwm()
            vae = AutoencoderKL.from_pretrained(models / "vae", torch_dtype=dt).eval().to(dev)
            info["vae_attention"] = processors(vae)
            f8 = 2 ** (len(vae.config.block_out_channels) - 1)
            for i, name in enumerate(dec):
                if i:
                    reset_hwm()
                s = split(name)[1]
                z = place(synthetic((1, vae.config.latent_channels, s // f8, s // f8)))

                def f():
                    return vae.decode(z).sample

                stage_done(name, time_runs(f, a.warmup, a.runs))
                del z, f
                gc.collect()
            del vae
            gc.collect()

        imgs = [s for s in stages if s.startswith("image_")]
        if imgs and (on_gpu or dt != torch.float32):
            raise SystemExit("image_S stages run on the CPU in f32 only")
        if imgs:
            reset_hwm()
            run_images(a, imgs, stage_done, info)

    return {"timings": timings,
            "peak_rss_bytes": max(_PEAK_BEFORE_RESET, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "stage_peak_rss_bytes": rss if per_stage_rss else None,
            "stage_peak_gpu_allocated_mib": gpu if on_gpu else None, **info}


def run_images(a, stages: list[str], stage_done, info: dict) -> None:
    """image_S: layout (transformers' Dinov2Model + the PCA basis) and the diffusers
    ControlNet pipeline, from the same model folder lumen reads."""
    import json as _json

    import diffusers
    import numpy as np
    import torch.nn.functional as F
    from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer, Dinov2Model

    models = a.models
    lumen_cfg = _json.loads((models / "lumen.json").read_text()) if (models / "lumen.json").exists() else {}
    layout_size = int(lumen_cfg.get("layout_size", 518))
    pca = load_file(models / "pca.safetensors")
    kmax = pca["components"].shape[0]
    k = int(lumen_cfg.get("default_components", kmax))
    encoder = Dinov2Model.from_pretrained(models / "encoder", torch_dtype=torch.float32).eval()
    patch = encoder.config.patch_size
    sched_cfg = _json.loads((models / "scheduler/scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_pretrained(models / "scheduler")
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(models / "vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(models / "text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(models / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(models / "unet", torch_dtype=torch.float32),
        controlnet=ControlNetModel.from_pretrained(models / "controlnet", torch_dtype=torch.float32),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    info["image_pipeline"] = f"StableDiffusionControlNetPipeline + {sched_cfg['_class_name']}, K {k} of {kmax}"
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for name in stages:
        s = split(name)[1]
        guide = Image.fromarray(synthetic_guide(s, s))

        def f():
            # The guide at the layout size (shorter side, patch multiples), as lumen prepares it.
            side = layout_size // patch * patch
            g = guide.resize((side, side), Image.BICUBIC)
            px = torch.from_numpy(np.asarray(g, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            hidden = encoder(pixel_values=(px - mean) / std).last_hidden_state[:, 1:]
            proj = (hidden[0] - pca["mean"]) @ pca["components"][:k].T
            grid = side // patch
            lay = proj.T.reshape(1, k, grid, grid)
            lay = torch.cat([lay, torch.zeros(1, kmax - k, grid, grid)], 1)
            cond = F.interpolate(lay, size=(s, s), mode="bilinear", align_corners=False)
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=cond, height=s, width=s,
                        num_inference_steps=a.steps, guidance_scale=7.5, controlnet_conditioning_scale=1.0,
                        generator=torch.Generator().manual_seed(0), output_type="np").images

        stage_done(name, time_runs(f, a.warmup, a.runs))


def synthetic_guide(width: int, height: int):
    """lumen's bench guide (src/bench.rs synthetic_guide): colour regions with a ripple."""
    import numpy as np

    base = np.array([[200, 60, 40], [40, 160, 70], [50, 80, 200], [220, 210, 90], [120, 120, 120]], np.int32)
    u = (np.arange(width, dtype=np.float32) / width)[None, :]
    v = (np.arange(height, dtype=np.float32) / height)[:, None]
    region = ((u * 3).astype(np.int32) + 2 * (v * 3).astype(np.int32)) % 5
    ripple = np.clip((16 * np.sin(u * 20)).astype(np.int32), 0, None)
    return np.clip(base[region] + ripple[..., None], 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------


def mib(b) -> int | None:
    return None if b is None else round(b / 2**20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--lumen", default=str(ROOT / "target/release/lumen"))
    ap.add_argument("--stages", default="text_encoder,cfg_step,vae_decode",
                    help="comma-separated: text_encoder, cfg_step, vae_decode, image (at every --sizes) "
                         "or cfg_step_S / vae_decode_S / image_S")
    ap.add_argument("--sizes", default="256,512", help="output sides for the cfg_step / vae_decode / image families")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of each image_S run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    ap.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32", help="diffusion weights' dtype (both sides)")
    ap.add_argument("--batch", default="1", help="images per cfg_step, comma-separated (N > 1: cfg_step_S_bN)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")
    ap.add_argument("--side", choices=("both", "lumen", "python"), default="both")
    ap.add_argument("--mode", choices=("bench", "peak-rss", "all"), default="bench",
                    help="peak-rss: only the `lumen synthesize` 512x512 peak-RSS run; all: both")
    a = ap.parse_args()
    if a.runs < 1:
        raise SystemExit("--runs must be at least 1")
    a.models = a.models.resolve()
    if not (a.models / "unet").is_dir() or not (a.models / "model_index.json").exists():
        if a.models != DEFAULT_MODELS.resolve():
            raise SystemExit(f"{a.models} is not a complete model folder")
        subprocess.run([sys.executable, str(ROOT / "scripts/make_big_models.py")], check=True)

    torch.set_num_threads(a.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    batches = [int(b) for b in a.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise SystemExit("--batch: every batch must be at least 1")
    stages = select_stages(a.stages, sizes, batches)
    on_gpu = a.device.startswith("cuda")
    report = {"models": str(a.models), "device": a.device, "dtype": a.dtype, "threads": a.threads,
              "torch": torch.__version__}
    if on_gpu:
        report["gpu"] = torch.cuda.get_device_name(torch.device(a.device))
    if a.mode != "peak-rss":
        report.update(warmup=a.warmup, runs=a.runs, stages=stages)
    failed = False
    t0 = time.perf_counter()

    if a.mode in ("bench", "all") and stages:
        lum = py = None
        load = {}
        gpu_peak = {}
        if a.side in ("both", "lumen"):
            with CpuWatch() as w, GpuMemWatch(on_gpu) as g:
                lum = run_lumen(a, stages, env)
            load["lumen"] = w.other_cores
            gpu_peak["lumen"] = g.peak_mib
        if a.side in ("both", "python"):
            with CpuWatch() as w, GpuMemWatch(on_gpu) as g:
                py = run_python(a, stages)
            load["diffusers"] = w.other_cores
            gpu_peak["diffusers"] = g.peak_mib
        if on_gpu:
            report["peak_gpu_used_mib"] = gpu_peak
        report["other_load_cores"] = {k: None if v is None else round(v, 2) for k, v in load.items()}
        failed |= bool(lum and "error" in lum)
        rows = []
        for st in stages:
            lt = (lum or {}).get("timings", {}).get(st)
            pt = (py or {}).get("timings", {}).get(st)
            row = {"stage": st,
                   "lumen_median_ms": round(lt["median_ms"], 1) if lt else None,
                   "diffusers_median_ms": round(pt["median_ms"], 1) if pt else None,
                   "ratio_lumen_over_diffusers": round(lt["median_ms"] / pt["median_ms"], 3) if lt and pt else None,
                   "lumen_runs_ms": [round(x, 1) for x in lt["runs_ms"]] if lt else None,
                   "diffusers_runs_ms": [round(x, 1) for x in pt["runs_ms"]] if pt else None}
            if py and py.get("stage_peak_rss_bytes"):
                row["diffusers_stage_peak_rss_mib"] = mib(py["stage_peak_rss_bytes"].get(st))
            if py and py.get("stage_peak_gpu_allocated_mib"):
                row["diffusers_stage_peak_gpu_allocated_mib"] = py["stage_peak_gpu_allocated_mib"].get(st)
            rows.append(row)
        report["results"] = rows
        if lum is not None:
            report["lumen"] = {"peak_rss_mib": mib(lum.get("peak_rss_bytes")), "commands": lum.get("commands")}
            if "error" in lum:
                report["lumen"]["error"] = lum["error"]
        if py is not None:
            report["diffusers"] = {"peak_rss_mib": mib(py["peak_rss_bytes"]),
                                   **{k: v for k, v in py.items() if k.endswith("_attention")}}

        where = report.get("gpu", f"{a.threads} threads")
        print(f"\nsynthesis stages, {a.device} {a.dtype}, {where}, warm-up {a.warmup}, runs {a.runs} (medians, ms)",
              file=sys.stderr)
        print(f"{'stage':<16}{'lumen':>12}{'diffusers':>12}{'ratio':>8}{'py stage RSS MiB':>18}", file=sys.stderr)
        fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        for r in rows:
            print(f"{r['stage']:<16}{fmt(r['lumen_median_ms'], 1):>12}{fmt(r['diffusers_median_ms'], 1):>12}"
                  f"{fmt(r['ratio_lumen_over_diffusers'], 3):>8}{fmt(r.get('diffusers_stage_peak_rss_mib'), 0):>18}",
                  file=sys.stderr)
        if lum is not None:
            print(f"lumen peak RSS: {fmt(report['lumen']['peak_rss_mib'], 0)} MiB"
                  + (f"  (ERROR: {lum['error'][:300]})" if "error" in lum else ""), file=sys.stderr)
        if py is not None:
            print(f"diffusers peak RSS (process): {report['diffusers']['peak_rss_mib']} MiB", file=sys.stderr)
        for side, v in load.items():
            if v is not None and v > OTHER_LOAD_WARN:
                print(f"WARNING: other processes used {v:.2f} cores on average while the {side} side ran: "
                      "its timings are not trustworthy; rerun on a quiet machine", file=sys.stderr)

    if a.mode in ("peak-rss", "all"):
        pr = run_peak_rss(a, env)
        report["synthesize_peak_rss"] = pr
        failed |= "error" in pr or "max_rss_bytes" not in pr
        if "max_rss_bytes" in pr:
            print(f"lumen synthesize 512x512 CFG, 1 step: max RSS {pr['max_rss_gb']} GB ({pr['max_rss_gib']} GiB), "
                  f"target < 8 GB: {'yes' if pr['under_target'] else 'NO'}", file=sys.stderr)
        if "error" in pr:
            print(f"lumen synthesize failed: {pr['error'][:300]}", file=sys.stderr)

    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
