"""`lumen-train` (also `python -m lumen_train`), runnable under `accelerate launch`:

    lumen-train controlnet --models BASE_DIR --data LAYOUTS_DIR --images IMAGES_DIR --output OUT_DIR
                [--resolution 512] [--batch-size 4] [--grad-accum 1] [--lr 1e-5] [--max-steps 1000]
                [--mixed-precision no|fp16|bf16] [--gradient-checkpointing] [--checkpoint-every 500]
                [--resume] [--validate-every 0] [--k-distribution uniform|low|high|full]
                [--caption-dropout 0.5] [--timestep-sampling uniform|cubic]
                [--init-controlnet DIR] [--jitter-data DIR --jitter-below K] [--seed 0]

BASE_DIR is the lumen model folder the layouts were exported with (`lumen
layouts --models BASE_DIR`); OUT_DIR becomes a complete lumen model folder.

    lumen-train shapes world|dataset|base|encoder|vae|unet|jitter|probe|pack|unpack|evaluate|downstream ...

The shapes world and the stages that make and measure lumen's embedded model
(scripts/train_shapes.sh runs them in order).
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
    c.add_argument(
        "--timestep-sampling",
        choices=["uniform", "cubic"],
        default="uniform",
        help="how training timesteps are drawn (cubic: more weight where the noise is high)",
    )
    c.add_argument(
        "--init-controlnet",
        type=Path,
        help="start from this trained ControlNet folder instead of a copy of the UNet",
    )
    c.add_argument(
        "--jitter-data",
        type=Path,
        help="a `lumen layouts` export of colour-jittered copies of the same images (same file names)",
    )
    c.add_argument(
        "--jitter-below",
        type=int,
        default=0,
        help="samples with K at most this take their layout from --jitter-data (the target stays the "
        "original): the prompt, not the layout, sets colour at low K",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--log-every", type=int, default=10)
    shapes = sub.add_parser("shapes", help="the shapes world and its embedded model (see lumen_train.shapes)")
    ss = shapes.add_subparsers(dest="stage", required=True)
    w = ss.add_parser("world", help="write images of the shapes world with an imagefolder metadata.jsonl")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--seed", type=int, default=0, help="the split: 0 training, 1 held-out evaluation")
    d = ss.add_parser("dataset", help="a labelled dataset (images, masks, COCO, YOLO) for `lumen augment`")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--count", type=int, required=True)
    d.add_argument("--seed", type=int, default=1, help="the split (default 1: held out from training)")
    sc = ss.add_parser("score-check", help="rank correlation of `lumen augment` scores with colour mIoU")
    sc.add_argument("--augmented", type=Path, required=True, help="a `lumen augment --masks` output folder")
    b = ss.add_parser("base", help="random encoder and text encoder, tokenizer, scheduler, lumen.json")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    for name, steps, batch, lr in (
        ("encoder", 1500, 32, 1e-3),
        ("vae", 2000, 16, 1e-3),
        ("unet", 3000, 32, 5e-4),
    ):
        t = ss.add_parser(name, help=f"train the {name.upper()} into BASE/{name}/ (resumable)")
        t.add_argument("--models", type=Path, required=True, help="the base folder")
        t.add_argument("--work", type=Path, required=True, help="checkpoint folder")
        t.add_argument("--steps", type=int, default=steps)
        t.add_argument("--batch-size", type=int, default=batch)
        t.add_argument("--lr", type=float, default=lr)
        t.add_argument("--checkpoint-every", type=int, default=100)
        if name == "encoder":
            t.add_argument(
                "--flat-weight", type=float, default=0.1, help="anchor weight of single-colour patches"
            )
            t.add_argument(
                "--geometry-weight",
                type=float,
                default=0.0,
                help="weight of the colour-blind geometry term (edges and largest region per patch)",
            )
    j = ss.add_parser(
        "jitter", help="colour-jittered copies of an image folder (every distinct colour a random one)"
    )
    j.add_argument("--images", type=Path, required=True)
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--seed", type=int, default=0)
    pr = ss.add_parser("probe", help="how much shape and colour an encoder's K-component layout holds (JSON)")
    pr.add_argument("--models", type=Path, required=True, help="a folder with encoder/")
    pr.add_argument("--components", type=int, default=8)
    pr.add_argument("--images", type=int, default=200)
    k = ss.add_parser("pack", help="a trained model folder as the committed one: f16 weights, no checkpoints")
    k.add_argument("--model", type=Path, required=True)
    k.add_argument("--out", type=Path, required=True)
    u = ss.add_parser(
        "unpack", help="a packed model folder's base parts in float32 (to retrain its ControlNet)"
    )
    u.add_argument("--model", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    e = ss.add_parser("evaluate", help="fidelity and diversity by K on held-out guides (a markdown table)")
    e.add_argument("--lumen", type=Path, default=Path("target/release/lumen"), help="the lumen binary")
    e.add_argument("--models", type=Path, help="model folder (default: the binary's embedded model)")
    e.add_argument("--guides", type=int, default=50, help="held-out guides (split seed 1)")
    e.add_argument("--seeds", type=int, default=2, help="images per guide, K and prompt")
    e.add_argument("--components", default="1,2,3,4,5,6,7,8", help="the Ks, comma-separated")
    e.add_argument("--size", type=int, help="output side (default: the model's); scored at the guide's size")
    e.add_argument(
        "--prompts",
        choices=["both", "caption", "none", "recoloured", "all"],
        default="both",
        help="caption, none, both; recoloured: the caption with its colours renamed, "
        "scored against the renamed colours; all: the three",
    )
    e.add_argument("--keep", type=Path, help="also write each guide's outputs here")
    e.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ds = ss.add_parser(
        "downstream", help="does lumen's data help a segmentation model? (real vs real + lumen vs classic)"
    )
    ds.add_argument(
        "--work", type=Path, required=True, help="datasets, augment output, runs.jsonl (resumable)"
    )
    ds.add_argument("--lumen", type=Path, default=Path("target/release/lumen"), help="the lumen binary")
    ds.add_argument("--models", type=Path, help="model folder (default: the binary's embedded model)")
    ds.add_argument("--sizes", default="16,64,256", help="the Ns: real labelled images, comma-separated")
    ds.add_argument("--seeds", type=int, default=3, help="training seeds per condition and N")
    ds.add_argument("--test", type=int, default=500, help="held-out real test images")
    ds.add_argument("--per-image", type=int, default=2, help="lumen augment variants per image and K")
    ds.add_argument("--components", default="2,8", help="lumen augment --components")
    ds.add_argument(
        "--min-score", type=float, action="append", help="filtered conditions (repeatable; default 0.6)"
    )
    ds.add_argument("--steps", type=int, default=1000, help="training steps, every condition")
    ds.add_argument("--batch-size", type=int, default=32)
    ds.add_argument("--real-fraction", type=float, default=0.5, help="real share of a mixed batch")
    ds.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    ds.add_argument("--norm", choices=["group", "batch"], default="group", help="the network's normalisation")
    ds.add_argument("--only", help="these conditions alone, comma-separated (names as the table gives them)")
    ds.add_argument("--runs", type=Path, help="the per-run record (default WORK/runs.jsonl)")
    ds.add_argument("--extra", default="", help="more `lumen augment` flags, space-separated")
    ds.add_argument("--json", type=Path, help="also write the result as JSON here")
    ds.add_argument(
        "--prompts",
        choices=["captions", "recoloured"],
        default="captions",
        help="lumen augment's prompts: the captions, or the captions with their colours renamed "
        "per output (the colour masks renamed to match)",
    )
    return p


def shapes(a: argparse.Namespace) -> None:
    if a.stage == "world":
        from lumen_train.shapes.world import write_split

        write_split(a.out, a.seed, a.count)
        return
    if a.stage == "dataset":
        from lumen_train.shapes.dataset import write_dataset

        print(json.dumps(write_dataset(a.out, a.seed, a.count)))
        return
    if a.stage == "score-check":
        from lumen_train.shapes.dataset import score_correlation

        print(json.dumps(score_correlation(a.augmented), indent=1))
        return
    if a.stage == "base":
        from lumen_train.shapes.base import build

        build(a.out, a.seed)
        return
    if a.stage == "pack":
        from lumen_train.shapes.pack import pack

        print(json.dumps(pack(a.model, a.out)))
        return
    if a.stage == "downstream":
        from lumen_train.shapes.downstream import Budget, markdown, study

        result = study(
            a.work,
            a.lumen,
            a.models,
            sizes=tuple(int(n) for n in a.sizes.split(",")),
            seeds=a.seeds,
            test_count=a.test,
            per_image=a.per_image,
            components=a.components,
            min_scores=tuple(a.min_score or [0.6]),
            budget=Budget(a.steps, a.batch_size, a.lr, a.real_fraction, a.norm),
            extra=a.extra.split(),
            runs_path=a.runs,
            only=None if a.only is None else tuple(c.strip() for c in a.only.split(",")),
            log=lambda line: print(line, file=sys.stderr, flush=True),
            prompts=a.prompts,
        )
        if a.json:
            a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(markdown(result))
        return
    if a.stage == "unpack":
        from lumen_train.shapes.pack import unpack

        print(json.dumps(unpack(a.model, a.out)))
        return
    if a.stage == "evaluate":
        from lumen_train.shapes.evaluate import evaluate, markdown, to_json

        ks = [int(k) for k in a.components.split(",")]
        prompts = {
            "both": (True, False),
            "caption": (True,),
            "none": (False,),
            "recoloured": ("recoloured",),
            "all": (True, False, "recoloured"),
        }[a.prompts]
        extra = [] if a.size is None else ["--width", str(a.size), "--height", str(a.size)]
        rows = evaluate(a.lumen, a.models, a.guides, a.seeds, ks, prompts, extra, keep=a.keep)
        if a.json:
            a.json.write_text(to_json(rows) + "\n")
        print(markdown(rows))
        return
    if a.stage == "jitter":
        from lumen_train.shapes.encoder import jitter_folder

        print(json.dumps(jitter_folder(a.images, a.out, a.seed)))
        return
    if a.stage == "probe":
        from lumen_train.shapes.encoder import probe

        print(json.dumps(probe(a.models, a.components, a.images)))
        return
    from lumen_train.shapes import fit

    if a.stage == "encoder":
        from lumen_train.shapes.encoder import train_encoder

        objective = {"flat_weight": a.flat_weight, "geometry_weight": a.geometry_weight}
        args = (a.models, a.work, a.steps, a.batch_size, a.lr, a.checkpoint_every)
        print(json.dumps(train_encoder(*args, **objective)))
        return
    trainer = fit.train_vae if a.stage == "vae" else fit.train_unet
    print(json.dumps(trainer(a.models, a.work, a.steps, a.batch_size, a.lr, a.checkpoint_every)))


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.command == "shapes":
        shapes(a)
        return
    for name in ("resolution", "batch_size", "grad_accum", "max_steps", "log_every", "validation_steps"):
        if getattr(a, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= a.caption_dropout <= 1.0:
        sys.exit("error: --caption-dropout must be within 0..1")
    if a.jitter_below < 0:
        sys.exit("error: --jitter-below must be at least 0")
    if a.jitter_below and not a.jitter_data:
        sys.exit("error: --jitter-below needs --jitter-data")
    from lumen_train.train import Options, train

    opts = Options(**{k: v for k, v in vars(a).items() if k != "command"})
    try:
        summary = train(opts)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "options"}))


if __name__ == "__main__":
    main()
