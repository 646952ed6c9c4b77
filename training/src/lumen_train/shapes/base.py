"""The shapes model's fixed parts and architectures: a random DINOv2 encoder
(patch 4: a 16×16 grid over 64×64 guides), a random frozen CLIP text encoder
over the repository's small byte-level BPE tokenizer, SD1.5's noise schedule,
and the configs of the VAE and UNet that `lumen-train shapes vae|unet` train.

The encoder starts random, and `lumen-train shapes encoder` then trains it
without labels to ignore colour (lumen_train.shapes.encoder): a random
patch embedding followed by random attention layers keeps colour as the
dominant variation of its tokens, so a PCA basis fitted on them carries
colour from its first component on, and the caption cannot set the
output's colours (the paper's DINOv2 is trained to ignore colour jitter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
TOKENIZER = ROOT / "models/tiny/tokenizer"
# SD1.5's PNDM scheduler config (epsilon, scaled-linear betas), as models/tiny has it.
SCHEDULER = ROOT / "models/tiny/scheduler/scheduler_config.json"

ENCODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "mlp_ratio": 4,
    "patch_size": 4,
    "image_size": 64,
    "layerscale_value": 1.0,
}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
}
KMAX = 8
# How the model is served (lumen.json; `shapes pack` writes them). Control
# scale 4 and the sizes 64..128 are what `shapes evaluate` measured best:
# at scale 1 a third of the outputs lost their guide, at 2 four in a hundred
# (none at 4, whose shapes also keep their outlines closer: foreground IoU
# 0.958 against 0.931 at K = 8), and below 64 pixels the small shapes are
# lost (see the README's table).
SETTINGS = {
    "layout_size": 64,
    "default_components": KMAX,
    "default_size": 64,
    "default_steps": 20,
    "default_guidance_scale": 3.0,
    "default_control_scale": 4.0,
    "min_size": 64,
    "max_size": 128,
}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def build(out: Path, seed: int) -> None:
    """Encoder, text encoder, tokenizer, scheduler and lumen.json into `out`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(**ENCODER)).save_pretrained(out / "encoder")
    tok_dir = out / "tokenizer"
    shutil.copytree(TOKENIZER, tok_dir, dirs_exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed + 1)
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT,
    )
    CLIPTextModel(text).save_pretrained(out / "text_encoder")
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy(SCHEDULER, out / "scheduler/scheduler_config.json")
    write_json(out / "lumen.json", SETTINGS)
    write_json(
        out / "model_index.json",
        {
            "_class_name": "StableDiffusionControlNetPipeline",
            "controlnet": ["diffusers", "ControlNetModel"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
