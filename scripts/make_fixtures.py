#!/usr/bin/env python3
"""Dev-only generator of lumen's random-weight models and reference outputs.

Never needed by CI: its outputs are committed. It needs torch, transformers,
safetensors, scikit-learn, numpy and pillow from PyPI (see scripts/README.md).

What it writes (paths relative to the repository root):

  models/tiny/                       the random-weight test model set
  tests/fixtures/models/<name>/      further encoder configs for parity tests
  tests/fixtures/images/             deterministic synthetic guide images
  tests/fixtures/images/fit/         the image set the PCA bases are fitted on
  tests/fixtures/reference/<name>.safetensors
                                     transformers' last hidden state and the
                                     PCA layout for each guide image
  tests/fixtures/reference/cases.json

Every parameter of every model is random (layer norms, layer scales, tokens
and position embeddings included). Guide images are saved at exactly the
size lumen's resize rule gives for the chosen layout size, so no resampling
library enters the comparison.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.decomposition import PCA
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

ROOT = Path(__file__).resolve().parent.parent
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Encoder configs that differ in depth, width, heads, patch size, mlp_ratio,
# FFN kind, position grid and register tokens.
ENCODERS = {
    "tiny": dict(
        out="models/tiny",
        registers=False,
        kmax=16,
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                    patch_size=14, image_size=224),
        # guide image name -> (width, height, layout_size)
        guides={"street": (98, 70, 98), "room": (98, 70, 98), "portrait": (42, 98, 98),
                "square": (224, 224, 224)},
    ),
    "registers": dict(
        out="tests/fixtures/models/registers",
        registers=True,
        kmax=12,
        config=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=3,
                    patch_size=8, image_size=64, num_register_tokens=4),
        # 7x5 (shrinks the 8x8 table: antialiased kernel) and 9x11 (grows it)
        guides={"street": (40, 56, 56), "wide": (88, 72, 88)},
    ),
    "swiglu": dict(
        out="tests/fixtures/models/swiglu",
        registers=False,
        kmax=8,
        config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2,
                    patch_size=16, image_size=96, use_swiglu_ffn=True, layer_norm_eps=1e-5),
        guides={"street": (80, 48, 80)},
    ),
}
FIT_IMAGES = 10
FIT_SIZE = 112  # a multiple of every patch size above: no resampling


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A scene-like picture: two-colour gradient, a few shapes, mild noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / max(width - 1, 1) * rng.uniform(0.2, 1) + y / max(height - 1, 1) * rng.uniform(0.2, 1)) / 2
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    for _ in range(rng.integers(2, 6)):
        colour = rng.uniform(0, 255, 3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.1, 0.4) * min(width, height)
        if rng.random() < 0.5:
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        else:
            mask = (abs(x - cx) < r) & (abs(y - cy) < r * rng.uniform(0.3, 1.5))
        img[mask] = colour
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter with random values of a sensible scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif "lambda1" in name:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("weight"):
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(r / np.sqrt(fan_in))
            else:  # cls/mask/register tokens, position embeddings
                p.copy_(r)


def pixel_values(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / np.float32(255.0)
    arr = (arr - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)


def build_encoder(spec: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if spec["registers"]:
        cfg = Dinov2WithRegistersConfig(**spec["config"])
        model = Dinov2WithRegistersModel(cfg)
    else:
        cfg = Dinov2Config(**spec["config"])
        model = Dinov2Model(cfg)
    randomize(model, gen)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(ENCODERS), help="regenerate one model only")
    args = ap.parse_args()
    torch.set_num_threads(2)

    images = ROOT / "tests/fixtures/images"
    fit_dir = images / "fit"
    fit_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    fit_paths = []
    for i in range(FIT_IMAGES):
        p = fit_dir / f"fit-{i:02d}.png"
        Image.fromarray(synthetic_image(rng, FIT_SIZE, FIT_SIZE)).save(p)
        fit_paths.append(p)

    ref_dir = ROOT / "tests/fixtures/reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    cases_path = ref_dir / "cases.json"
    cases = json.loads(cases_path.read_text()) if cases_path.exists() else {}

    for seed, (name, spec) in enumerate(ENCODERS.items()):
        if args.only and name != args.only:
            continue
        model = build_encoder(spec, seed=1000 + seed)
        skip = 1 + (model.config.num_register_tokens if spec["registers"] else 0)
        out = ROOT / spec["out"]
        shutil.rmtree(out / "encoder", ignore_errors=True)
        model.save_pretrained(out / "encoder", safe_serialization=True)

        # PCA basis: sklearn on the patch tokens of the fit set.
        with torch.no_grad():
            toks = [model(pixel_values(p)).last_hidden_state[0, skip:] for p in fit_paths]
        toks = torch.cat(toks).double().numpy()
        pca = PCA(n_components=spec["kmax"], svd_solver="full").fit(toks)
        mean = torch.from_numpy(pca.mean_).float().contiguous()
        comps = torch.from_numpy(np.ascontiguousarray(pca.components_)).float()
        ev = torch.from_numpy(np.ascontiguousarray(pca.explained_variance_)).float()
        save_file({"mean": mean, "components": comps, "explained_variance": ev}, str(out / "pca.safetensors"))
        (out / "lumen.json").write_text(json.dumps(
            {"layout_size": 518 if name == "tiny" else 224, "default_components": spec["kmax"] // 2},
            indent=2) + "\n")

        # Reference layouts for the guides.
        refs, guides = {}, []
        grng = np.random.default_rng(100 + seed)
        for gname, (w, h, layout_size) in spec["guides"].items():
            p = images / f"{name}-{gname}.png"
            Image.fromarray(synthetic_image(grng, w, h)).save(p)
            with torch.no_grad():
                hidden = model(pixel_values(p)).last_hidden_state[0]
            patch = hidden[skip:]
            grid = (h // spec["config"]["patch_size"], w // spec["config"]["patch_size"])
            layout = ((patch - mean) @ comps.T / ev.sqrt()).T.reshape(spec["kmax"], *grid)
            refs[f"{gname}.hidden"] = hidden.contiguous()
            refs[f"{gname}.layout"] = layout.contiguous()
            guides.append({"name": gname, "image": str(p.relative_to(ROOT)), "layout_size": layout_size,
                           "grid": list(grid)})
        save_file(refs, str(ref_dir / f"{name}.safetensors"))
        cases[name] = {
            "models": spec["out"],
            "kmax": spec["kmax"],
            "registers": skip - 1,
            "fit_images": str(fit_dir.relative_to(ROOT)),
            "fit_layout_size": FIT_SIZE,
            "guides": guides,
        }
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
              f"pca explained variance {pca.explained_variance_[:4]}…")
    cases_path.write_text(json.dumps(cases, indent=2) + "\n")


if __name__ == "__main__":
    main()
