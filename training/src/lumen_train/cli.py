"""`lumen-train` (also `python -m lumen_train`), runnable under `accelerate launch`:

    lumen-train controlnet --models BASE_DIR --data LAYOUTS_DIR --images IMAGES_DIR --output OUT_DIR
                [--resolution 512] [--batch-size 4] [--grad-accum 1] [--lr 1e-5] [--max-steps 1000]
                [--mixed-precision no|fp16|bf16] [--gradient-checkpointing] [--checkpoint-every 500]
                [--resume] [--validate-every 0] [--k-distribution uniform|low|high|full]
                [--caption-dropout 0.5] [--seed 0]

BASE_DIR is the lumen model folder the layouts were exported with (`lumen
layouts --models BASE_DIR`); OUT_DIR becomes a complete lumen model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lumen_train.data import ExportError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumen-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("controlnet", help="train a LUMEN ControlNet on a `lumen layouts` export")
    c.add_argument("--models", type=Path, required=True, help="the lumen model folder the layouts came from")
    c.add_argument("--data", type=Path, required=True, help="the `lumen layouts --out` folder")
    c.add_argument("--images", type=Path, required=True, help="the image folder the layouts were made from")
    c.add_argument("--output", type=Path, required=True, help="checkpoints, validation, the exported model")
    c.add_argument("--resolution", type=int, default=512, help="longer side of the training images")
    c.add_argument("--batch-size", type=int, default=4, help="samples per process and micro-batch")
    c.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    c.add_argument("--lr", type=float, default=1e-5)
    c.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    c.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    c.add_argument("--gradient-checkpointing", action="store_true")
    c.add_argument("--checkpoint-every", type=int, default=500, help="steps; 0: only at the end")
    c.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    c.add_argument("--validate-every", type=int, default=0, help="steps between validation grids; 0: none")
    c.add_argument("--validation-steps", type=int, default=20, help="denoising steps of validation images")
    c.add_argument(
        "--k-distribution",
        choices=["uniform", "low", "high", "full"],
        default="uniform",
        help="how K is drawn per sample (full: no truncation)",
    )
    c.add_argument("--caption-dropout", type=float, default=0.5, help="probability of an empty prompt")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--log-every", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    for name in ("resolution", "batch_size", "grad_accum", "max_steps", "log_every", "validation_steps"):
        if getattr(a, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= a.caption_dropout <= 1.0:
        sys.exit("error: --caption-dropout must be within 0..1")
    from lumen_train.train import Options, train

    opts = Options(**{k: v for k, v in vars(a).items() if k != "command"})
    try:
        summary = train(opts)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "options"}))


if __name__ == "__main__":
    main()
