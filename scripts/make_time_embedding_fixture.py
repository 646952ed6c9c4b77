"""Reference for the f16 time embedding (tests/synthesis_parity.rs).

Dev-only: needs torch and diffusers (0.42.x), as scripts/make_sd_fixtures.py.
Run from the repository root:

    training/.venv/bin/python scripts/make_time_embedding_fixture.py

diffusers' UNet2DConditionModel.get_time_embed projects the timesteps in f32
and casts the projection to the UNet's dtype before time_embedding; this
writes, for models/tiny's UNet loaded in f16 and in f32, the embedding of
integer and fractional timesteps (DDIM's 999, Euler's fractional ones):

* tests/fixtures/reference/time-embedding.safetensors
    ``timesteps``  [T] float32
    ``f16``        [T, 4·C0] the f16 UNet's embeddings (stored as f32)
    ``f32``        [T, 4·C0] the f32 UNet's
"""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TIMESTEPS = [999.0, 981.3671875, 723.5, 500.25, 21.0, 1.0]


def embeddings(dtype: torch.dtype) -> torch.Tensor:
    unet = UNet2DConditionModel.from_pretrained(ROOT / "models/tiny", subfolder="unet", torch_dtype=dtype)
    unet.eval()
    sample = torch.zeros(1, unet.config.in_channels, 8, 8, dtype=dtype)
    rows = []
    with torch.no_grad():
        for t in TIMESTEPS:
            t_emb = unet.get_time_embed(sample=sample, timestep=torch.tensor([t], dtype=torch.float32))
            rows.append(unet.time_embedding(t_emb)[0])
    return torch.stack(rows).to(torch.float32)


def main() -> None:
    out = ROOT / "tests/fixtures/reference/time-embedding.safetensors"
    save_file(
        {
            "timesteps": torch.tensor(TIMESTEPS, dtype=torch.float32),
            "f16": embeddings(torch.float16).contiguous(),
            "f32": embeddings(torch.float32).contiguous(),
        },
        str(out),
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
