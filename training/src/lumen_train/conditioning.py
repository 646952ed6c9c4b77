"""The ControlNet input, built exactly as lumen builds it at inference.

lumen (`Layout::conditioning` in src/pipeline/layout.rs): a layout [K, h, w]
is zero-padded to the ControlNet's `conditioning_channels` (Kmax) and
upsampled bilinearly, align_corners=False, in float32, to the output size.
Channels are independent, so keeping the first K channels of the padded,
upsampled Kmax layout and zeroing the rest is the same tensor: that is how a
training sample serves every K (random-K truncation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def conditioning(layout: torch.Tensor, kmax: int, height: int, width: int) -> torch.Tensor:
    """[K, h, w] (any float dtype) -> [kmax, height, width] float32."""
    k, gh, gw = layout.shape
    if k > kmax:
        raise ValueError(f"a layout with {k} components for {kmax} conditioning channels")
    padded = torch.zeros(1, kmax, gh, gw, dtype=torch.float32)
    padded[0, :k] = layout.to(torch.float32)
    return F.interpolate(padded, size=(height, width), mode="bilinear", align_corners=False)[0]


def truncate(cond: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Zero the channels >= k: `cond` [Kmax, H, W] with an int, or [B, Kmax, H, W] with k [B]."""
    if cond.dim() == 3:
        keep = torch.arange(cond.shape[0]) < int(k)
        return cond * keep[:, None, None].to(cond.dtype)
    k = torch.as_tensor(k).reshape(-1, 1)
    keep = torch.arange(cond.shape[1])[None, :] < k
    return cond * keep[:, :, None, None].to(cond.dtype)


def output_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """lumen's default output size: the guide's aspect with the longer side
    `long_side` (rounded up to `multiple`), the shorter side rounded to the
    nearest multiple (at least one) - as `pipeline::request::output_size`."""
    long = -(-long_side // multiple) * multiple

    def short(s: int, longer: int) -> int:
        # Rust's f64::round: halves away from zero (Python's round() goes to even).
        return max(1, math.floor(s * long / longer / multiple + 0.5)) * multiple

    return (long, short(height, width)) if width >= height else (short(width, height), long)
