#!/usr/bin/env python3
"""Dev-only generator of lumen's random-weight diffusion models and references.

Never needed by CI: its outputs are committed. It needs torch, diffusers,
transformers, tokenizers, safetensors, numpy and regex from PyPI (see
scripts/README.md), no network and no model hub: every weight is random and
the tokenizer vocabulary is learned here from an inline corpus.

Run it after scripts/make_fixtures.py, whose outputs it reads (the layout of
each model's first guide in tests/fixtures/reference/<model>.safetensors) and
never touches (`encoder/`, `pca.safetensors`, `lumen.json`).

What it writes (paths relative to the repository root), for the configs in
CONFIGS (`tiny` -> models/tiny/, `registers` -> tests/fixtures/models/registers/):

  <folder>/model_index.json          as StableDiffusionControlNetPipeline.save_config
  <folder>/unet/                     UNet2DConditionModel (config + safetensors)
  <folder>/controlnet/               ControlNetModel, conditioning_channels = Kmax
  <folder>/vae/                      AutoencoderKL
  <folder>/text_encoder/             CLIPTextModel (config.json + model.safetensors)
  <folder>/tokenizer/                CLIP BPE files (vocab.json, merges.txt, ...)
  <folder>/scheduler/scheduler_config.json
  tests/fixtures/reference/sd-<model>.safetensors
                                     the explicit diffusers ControlNet denoising
                                     loop (text embeddings, conditioning, initial
                                     latents, first CFG noise prediction, per-step
                                     and final latents, decoded uint8 image) for
                                     DDIM, Euler and DPM-Solver++(2M), plus one
                                     Euler run without classifier-free guidance
  tests/fixtures/reference/sd_cases.json
                                     the manifest: sizes, prompts, settings,
                                     reference token ids, schedules

The two configs differ on purpose: tiny is an SD1.5-style set (int
attention_head_dim, conv proj_in/proj_out, quick_gelu CLIP with the
`text_model.` key prefix, slow-format tokenizer files only, PNDM scheduler
config, f32 UNet); registers is an SD2-style set (per-block head list, linear
projections, gelu CLIP without the key prefix, tokenizer.json present, pad
token "!", v-prediction DDIM config with trailing spacing, f16 UNet weights).

Channel widths are smaller than SD's (and than first planned) so that each
folder's diffusion files stay under ~3 MB: models/tiny/ is embedded in the
binary. Every parameter is random, the ControlNet zero-convolutions
included; the scales keep the noise predictions O(1) and the decoded images
unsaturated (checked by `sanity`).

transformers 5 saves CLIPTextModel weights without the `text_model.` prefix
and loads either spelling; the tiny text encoder is rewritten with the prefix
(as in the SD1.5 checkpoints), the registers one is kept without it.

The reference loop is written out explicitly (it mirrors
StableDiffusionControlNetPipeline.__call__ with given latents) and is checked
against the real pipeline loaded from the written folder. Components are
loaded back from disk before the reference runs, so the references are
computed with exactly the stored weights (f16 UNet weights cast to f32).
"""

import argparse
import hashlib
import json
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import diffusers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)

ROOT = Path(__file__).resolve().parent.parent
REF_DIR = ROOT / "tests/fixtures/reference"

PROMPT = "a red house by the sea"
NEGATIVE = "blurry, dark"
STEPS = 4
GUIDANCE = 5.0
CONTROL_SCALE = 0.8
COMPONENTS = 6
LATENT_SEED = 1234
MAX_LEN = 77

TOKEN_TESTS = [
    PROMPT,
    NEGATIVE,
    "",
    "Hello, World! 123 cats",
    "a  photo\tof   TWO cats!!",
    "naïve café — 2024",
    # decomposed "é" (e + U+0301): the tokenizer NFC-normalises it first
    "cafe\u0301 au lait",
    # > 75 content tokens: truncated to BOS + 75 + EOS
    "a very long prompt about a quiet harbour town at dawn, with small fishing boats, "
    "old stone houses, red roofs, a lighthouse on the rocks, seagulls over the water, "
    "soft golden light, thin mist, distant mountains, detailed, sharp focus, "
    "award winning photograph, 35mm film, muted colours, calm sea, long exposure, "
    "1 2 3 4 5 6 7 8 9 10",
]

PNDM_SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

DDIM_VPRED = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

CONFIGS = {
    "tiny": dict(
        out="models/tiny",
        kmax=16,
        width=64,
        height=48,
        seed=2000,
        unet=dict(
            sample_size=8,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=8,
            use_linear_projection=False,
        ),
        cond_embedding=(8, 8, 16, 16),
        vae=dict(
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
            scaling_factor=0.37,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=MAX_LEN, hidden_act="quick_gelu"),
        text_prefix=True,
        tokenizer_json=False,
        pad_token="<|endoftext|>",
        scheduler=PNDM_SD15,
        unet_f16=False,
    ),
    "registers": dict(
        out="tests/fixtures/models/registers",
        kmax=12,
        width=64,
        height=48,
        seed=3000,
        unet=dict(
            sample_size=16,
            block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=[2, 4, 4],
            cross_attention_dim=48,
            norm_num_groups=16,
            use_linear_projection=True,
        ),
        cond_embedding=(8, 16, 16),
        vae=dict(
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.45,
        ),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
                  max_position_embeddings=MAX_LEN, hidden_act="gelu"),
        text_prefix=False,
        tokenizer_json=True,
        pad_token="!",
        scheduler=DDIM_VPRED,
        unet_f16=True,
    ),
}

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

# ---------------------------------------------------------------------------
# Tokenizer: a small CLIP-format byte-level BPE learned from this corpus.

CORPUS = f"""
{PROMPT}. {NEGATIVE}. {NEGATIVE}, low quality, jpeg artifacts, watermark, text, deformed.
a photo of a cat sitting on a red chair in the living room. two cats playing in the garden.
a photograph of the old town street at night with wet stones and warm lights from the windows.
the house on the hill has a red roof and a white door; the sea is blue and the sky is clear.
a portrait of a woman with long dark hair, soft light, studio photo, high detail, sharp focus.
a painting of a ship on the stormy sea, dramatic clouds, oil on canvas, by an old master.
the quick brown fox jumps over the lazy dog while the birds sing in the trees.
a beautiful landscape with mountains, rivers, forests and a small village in the valley.
a bowl of fresh fruit on the kitchen table: apples, oranges, grapes and a banana.
an astronaut riding a horse on the moon, digital art, trending, highly detailed render.
the city skyline at sunset, reflections on the water, boats in the harbour, people walking.
a cozy room with a fireplace, wooden floor, books on the shelves and a sleeping dog.
hello world, this is a test of the tokenizer with some numbers 1 2 3 and some words.
the children are playing with their toys in the park near the school and the church.
a close up photo of a flower with drops of water on the petals in the early morning.
there is a road through the green fields and a red car driving towards the houses.
the street is full of people, shops, cafes, bicycles, lamps, trees and parked cars.
a dark and blurry picture of a forest at night under the light of the full moon.
a wide view of the beach with sand, rocks, waves, seagulls and a lighthouse in the distance.
"""

ENDOFTEXT = "<|endoftext|>"
STARTOFTEXT = "<|startoftext|>"
PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
NUM_MERGES = 300


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENCODER = bytes_to_unicode()


def normalize_text(text: str) -> str:
    """What the CLIP tokenizer's normalizer does: NFC, collapse whitespace, lowercase."""
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text)
    return text.lower()


def pretokenize(text: str) -> list[str]:
    """CLIP regex split then byte-level mapping of each piece."""
    return ["".join(BYTE_ENCODER[b] for b in piece.encode("utf-8")) for piece in PAT.findall(text)]


def learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = Counter(pretokenize(normalize_text(corpus)))
    # word -> symbols, the last one carrying the end-of-word marker
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    byte_chars = list(BYTE_ENCODER.values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(vocab_list)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for w, freq in words.items():
            s = segs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        # most frequent first, ties broken by the pair itself; never re-create a
        # token that exists (keeps "one merge = one new vocab entry")
        best = None
        for pair, _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            if pair[0] + pair[1] not in known:
                best = pair
                break
        if best is None:
            break
        merges.append(best)
        new = best[0] + best[1]
        known.add(new)
        vocab_list.append(new)
        for w in segs:
            s, out, i = segs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = tuple(out)
    vocab_list += [STARTOFTEXT, ENDOFTEXT]
    assert len(set(vocab_list)) == len(vocab_list)
    return {t: i for i, t in enumerate(vocab_list)}, merges


def reference_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str) -> list[int]:
    """Independent CLIP tokenizer (OpenAI simple_tokenizer logic, without ftfy).

    As in transformers / tokenizers, the special tokens (BOS, EOS and the pad
    token) are split out of the raw text first (leftmost-longest) and map to
    their ids directly; only the text between them is normalised and BPE'd. With
    SD2's pad token "!" this makes every "!" in a prompt the pad id, not "!</w>".
    """
    ranks = {m: i for i, m in enumerate(merges)}
    specials = sorted({STARTOFTEXT, ENDOFTEXT, pad}, key=len, reverse=True)
    split = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")

    def bpe(token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    ids = []
    for k, piece in enumerate(split.split(text)):
        if k % 2:
            ids.append(vocab[piece])
            continue
        for tok in pretokenize(normalize_text(piece)):
            ids += [vocab[t] for t in bpe(tok)]
    ids = [vocab[STARTOFTEXT]] + ids[: MAX_LEN - 2] + [vocab[ENDOFTEXT]]
    return ids + [vocab[pad]] * (MAX_LEN - len(ids))


def special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str,
                    with_json: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # as in the SD1.5 / SD2 repositories
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "bos_token": special(STARTOFTEXT),
        "do_lower_case": True,
        "eos_token": special(ENDOFTEXT),
        "errors": "replace",
        "model_max_length": MAX_LEN,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(ENDOFTEXT),
    }, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": special(STARTOFTEXT),
        "eos_token": special(ENDOFTEXT),
        "pad_token": pad,
        "unk_token": special(ENDOFTEXT),
    }, indent=2, ensure_ascii=False) + "\n")
    if with_json:
        # tokenizer.json converted by transformers from vocab.json + merges.txt
        tmp = folder.parent / (folder.name + ".tmp")
        CLIPTokenizer.from_pretrained(folder).save_pretrained(tmp)
        shutil.copy(tmp / "tokenizer.json", folder / "tokenizer.json")
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------
# Models


def randomize(model: torch.nn.Module, gen: torch.Generator, gains: dict[str, float] | None = None) -> None:
    """Overwrite every parameter (zero-initialised ones included) with random values."""
    modules = dict(model.named_modules())
    gains = gains or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            mod = modules[name.rsplit(".", 1)[0]]
            kind = name.rsplit(".", 1)[1]
            r = torch.randn(p.shape, generator=gen)
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                p.copy_(1.0 + 0.1 * r if kind == "weight" else 0.05 * r)
            elif isinstance(mod, torch.nn.Embedding):
                p.copy_(0.5 * r)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                if kind == "bias":
                    p.copy_(0.05 * r)
                else:
                    gain = next((g for pre, g in gains.items() if name.startswith(pre)), 1.0)
                    p.copy_(gain * r / np.sqrt(int(np.prod(p.shape[1:]))))
            else:
                raise TypeError(f"unexpected parameter {name} in {type(mod).__name__}")


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_models(name: str, spec: dict, out: Path, vocab: dict[str, int]) -> dict:
    seed = spec["seed"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    randomize(unet, torch.Generator().manual_seed(seed + 1))
    shared = {k: v for k, v in spec["unet"].items()
              if k not in ("sample_size", "up_block_types")}
    controlnet = ControlNetModel(in_channels=4, conditioning_channels=spec["kmax"],
                                 conditioning_embedding_out_channels=spec["cond_embedding"], **shared)
    randomize(controlnet, torch.Generator().manual_seed(seed + 2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    randomize(vae, torch.Generator().manual_seed(seed + 3), gains=spec.get("vae_gains"))
    pad_id = vocab[spec["pad_token"]]
    text_cfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[STARTOFTEXT],
                              eos_token_id=vocab[ENDOFTEXT], pad_token_id=pad_id, **spec["text"])
    text = CLIPTextModel(text_cfg)
    randomize(text, torch.Generator().manual_seed(seed + 4))
    for m in (unet, controlnet, vae, text):
        m.eval()

    for sub in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "model_index.json").unlink(missing_ok=True)

    if spec["unet_f16"]:
        unet.half()
    unet.save_pretrained(out / "unet", safe_serialization=True)
    controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    # transformers 5 saves CLIPTextModel keys without the `text_model.` prefix
    # that older checkpoints (SD1.5's) carry; it loads both spellings.
    te_file = out / "text_encoder/model.safetensors"
    sd = load_file(str(te_file))
    assert not any(k.startswith("text_model.") for k in sd), sorted(sd)[:4]
    if spec["text_prefix"]:
        sd = {"text_model." + k: v for k, v in sd.items()}
        save_file(sd, str(te_file), metadata={"format": "pt"})
    (out / "scheduler").mkdir()
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2) + "\n")
    return {"unet": nparams(unet), "controlnet": nparams(controlnet), "vae": nparams(vae),
            "vae_decoder": nparams(vae.decoder) + nparams(vae.post_quant_conv), "text_encoder": nparams(text)}


def load_text_encoder(folder: Path) -> CLIPTextModel:
    """transformers' loader (accepts keys with or without the `text_model.` prefix), checked."""
    model, info = CLIPTextModel.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    stored = {k.removeprefix("text_model."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    own = model.state_dict()
    assert set(stored) == set(own) and all(torch.equal(stored[k], own[k]) for k in own)
    return model.eval()


def write_model_index(out: Path, vae, text, tok, unet, controlnet, scheduler_cls) -> None:
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, controlnet=controlnet,
        scheduler=scheduler_cls.from_config(json.loads((out / "scheduler/scheduler_config.json").read_text())),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_config(out)


# ---------------------------------------------------------------------------
# Reference loop


def tok_ids(tok: CLIPTokenizer, text: str) -> torch.Tensor:
    return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def denoise(unet, controlnet, vae, sched, emb, cond, latents, guidance):
    """diffusers' ControlNet loop; emb = cat([uncond, cond]) when guidance > 1."""
    cfg = guidance > 1.0
    sched.set_timesteps(STEPS)
    x = latents * sched.init_noise_sigma
    ccond = torch.cat([cond, cond]) if cfg else cond
    eps0, steps = None, []
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        down, mid = controlnet(inp, t, encoder_hidden_states=emb, controlnet_cond=ccond,
                               conditioning_scale=CONTROL_SCALE, guess_mode=False, return_dict=False)
        eps = unet(inp, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        if cfg:
            u, c = eps.chunk(2)
            eps = u + guidance * (c - u)
        if i == 0:
            eps0 = eps
        x = sched.step(eps, t, x).prev_sample
        steps.append(x[0])
    img = vae.decode(x / vae.config.scaling_factor).sample
    img = (img / 2 + 0.5).clamp(0, 1)
    u8 = (img[0].permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous()
    return eps0, x, torch.stack(steps), img, u8


def run_reference(name: str, spec: dict, cases: dict, stats: dict) -> dict:
    out = ROOT / spec["out"]
    unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32).eval()
    controlnet = ControlNetModel.from_pretrained(out / "controlnet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).eval()
    text = load_text_encoder(out / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    sched_cfg = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert unet.dtype == torch.float32

    guide = cases[name]["guides"][0]
    layout = load_file(str(REF_DIR / f"{name}.safetensors"))[f"{guide['name']}.layout"]
    kmax, gh, gw = layout.shape
    C = controlnet.config.conditioning_channels
    assert kmax == spec["kmax"] == C
    W, H = spec["width"], spec["height"]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    cond = torch.zeros(1, C, gh, gw)
    cond[0, :COMPONENTS] = layout[:COMPONENTS]
    cond = F.interpolate(cond, size=(H, W), mode="bilinear", align_corners=False)
    latents = torch.randn(1, 4, H // f, W // f, generator=torch.Generator().manual_seed(LATENT_SEED))

    ids_c, ids_u = tok_ids(tok, PROMPT), tok_ids(tok, NEGATIVE)
    cond_emb = text(ids_c).last_hidden_state
    uncond_emb = text(ids_u).last_hidden_state
    emb = torch.cat([uncond_emb, cond_emb])

    refs = {"cond": cond.contiguous(), "latents": latents, "text.cond": cond_emb.contiguous(),
            "text.uncond": uncond_emb.contiguous()}
    schedule, st = {}, {}
    for sname, (cls, extra) in SCHEDULERS.items():
        sched = cls.from_config(sched_cfg, **extra)
        eps0, x, steps, img, u8 = denoise(unet, controlnet, vae, sched, emb, cond, latents, GUIDANCE)
        refs[f"{sname}.noise_pred0"] = eps0.contiguous()
        refs[f"{sname}.latents_steps"] = steps.contiguous()
        refs[f"{sname}.latents_final"] = x.contiguous()
        refs[f"{sname}.image"] = u8
        refs[f"{sname}.timesteps"] = sched.timesteps.to(torch.float32).contiguous()
        schedule[sname] = {"class": cls.__name__, "timesteps": [float(t) for t in sched.timesteps],
                           "init_noise_sigma": float(sched.init_noise_sigma),
                           "overrides": extra}
        st[sname] = sanity(sname, eps0, x, u8)
        check_pipeline(out, cls, extra, cond, latents, GUIDANCE, x, img, W, H)

    sched = EulerDiscreteScheduler.from_config(sched_cfg)
    eps0, x, steps, img, u8 = denoise(unet, controlnet, vae, sched, cond_emb, cond, latents, 1.0)
    refs["nocfg.euler.noise_pred0"] = eps0.contiguous()
    refs["nocfg.euler.latents_steps"] = steps.contiguous()
    refs["nocfg.euler.latents_final"] = x.contiguous()
    refs["nocfg.euler.image"] = u8
    st["nocfg.euler"] = sanity("nocfg.euler", eps0, x, u8)
    check_pipeline(out, EulerDiscreteScheduler, {}, cond, latents, 1.0, x, img, W, H)
    stats[name]["outputs"] = st

    for k, v in refs.items():
        assert torch.isfinite(v.float()).all(), k
    save_file(refs, str(REF_DIR / f"sd-{name}.safetensors"))

    # token ids: transformers' tokenizer == the independent reference encoder
    vocab = json.loads((out / "tokenizer/vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(l.split(" ")) for l in
              (out / "tokenizer/merges.txt").read_text(encoding="utf-8").splitlines()[1:] if l]
    tokens = []
    for s in TOKEN_TESTS:
        ids = tok_ids(tok, s)[0].tolist()
        assert len(ids) == MAX_LEN
        mine = reference_encode(s, vocab, merges, spec["pad_token"])
        assert ids == mine, (s, ids, mine)
        tokens.append({"text": s, "ids": ids})
    if spec["tokenizer_json"]:
        from tokenizers import Tokenizer
        raw = Tokenizer.from_file(str(out / "tokenizer/tokenizer.json"))
        for t in tokens:
            enc = raw.encode(t["text"]).ids  # BOS ... EOS, untruncated, unpadded
            if len(enc) <= MAX_LEN:
                assert enc == t["ids"][: len(enc)], t["text"]

    return {
        "models": spec["out"],
        "guide": guide["name"],
        "guide_image": guide["image"],
        "layout_size": guide["layout_size"],
        "layout_grid": [gh, gw],
        "components": COMPONENTS,
        "conditioning_channels": C,
        "vae_factor": f,
        "width": W,
        "height": H,
        "latent_shape": list(latents.shape),
        "latent_seed": LATENT_SEED,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "control_scale": CONTROL_SCALE,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "schedulers": list(SCHEDULERS),
        "nocfg": {"scheduler": "euler", "guidance": 1.0},
        "schedule": schedule,
        "tokens": tokens,
        "pad_token": spec["pad_token"],
        "pad_token_id": vocab[spec["pad_token"]],
        "vocab_size": len(vocab),
        "scaling_factor": vae.config.scaling_factor,
        "unet_dtype": "float16" if spec["unet_f16"] else "float32",
        "text_encoder_key_prefix": spec["text_prefix"],
        "reference": f"tests/fixtures/reference/sd-{name}.safetensors",
    }


def check_pipeline(out, cls, extra, cond, latents, guidance, x_ref, img_ref, W, H) -> None:
    """The real StableDiffusionControlNetPipeline gives what the explicit loop gives."""
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        out, text_encoder=load_text_encoder(out / "text_encoder"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, image=cond, height=H, width=W, num_inference_steps=STEPS,
              guidance_scale=guidance, controlnet_conditioning_scale=CONTROL_SCALE,
              latents=latents.clone())
    if guidance > 1:
        kw["negative_prompt"] = NEGATIVE
    lat = pipe(output_type="latent", **kw).images
    img = pipe(output_type="pt", **kw).images
    assert torch.allclose(lat, x_ref, atol=1e-5, rtol=1e-5), (lat - x_ref).abs().max()
    assert torch.allclose(img, img_ref, atol=1e-5), (img - img_ref).abs().max()


def sanity(label: str, eps0, x, u8) -> dict:
    u = u8.float()
    s = {
        "noise_pred0_std": float(eps0.std()), "noise_pred0_absmax": float(eps0.abs().max()),
        "latents_final_std": float(x.std()),
        "image_mean": float(u.mean()), "image_std": float(u.std()),
        "image_saturated": float(((u8 == 0) | (u8 == 255)).float().mean()),
    }
    assert torch.isfinite(eps0).all() and 0.1 <= s["noise_pred0_std"] and s["noise_pred0_absmax"] <= 50, (label, s)
    assert s["image_std"] > 20 and s["image_saturated"] < 0.5, (label, s)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(CONFIGS), help="regenerate one model only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    cases = json.loads((REF_DIR / "cases.json").read_text())
    manifest_path = REF_DIR / "sd_cases.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    vocab, merges = learn_bpe(CORPUS, NUM_MERGES)
    stats = {}
    for name, spec in CONFIGS.items():
        if args.only and name != args.only:
            continue
        out = ROOT / spec["out"]
        assert (out / "encoder").is_dir(), f"run scripts/make_fixtures.py first ({out})"
        with torch.inference_mode(False):
            counts = build_models(name, spec, out, vocab)
        write_tokenizer(out / "tokenizer", vocab, merges, spec["pad_token"], spec["tokenizer_json"])
        stats[name] = {"parameters": counts}
        with torch.inference_mode():
            unet = UNet2DConditionModel.from_pretrained(out / "unet")
            write_model_index(out, AutoencoderKL.from_pretrained(out / "vae"),
                              load_text_encoder(out / "text_encoder"),
                              CLIPTokenizer.from_pretrained(out / "tokenizer"), unet,
                              ControlNetModel.from_pretrained(out / "controlnet"),
                              getattr(diffusers, spec["scheduler"]["_class_name"]))
            manifest[name] = run_reference(name, spec, cases, stats)
        manifest[name]["parameters"] = counts
        sizes = {str(p.relative_to(ROOT)): p.stat().st_size for sub in
                 ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler")
                 for p in sorted((out / sub).rglob("*")) if p.is_file()}
        sizes[str((out / "model_index.json").relative_to(ROOT))] = (out / "model_index.json").stat().st_size
        stats[name]["bytes_added"] = sum(sizes.values())
        print(json.dumps({name: stats[name]}, indent=2))
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    digest = hashlib.sha256()
    for name, spec in CONFIGS.items():
        if name in stats:
            digest.update((REF_DIR / f"sd-{name}.safetensors").read_bytes())
    print("reference sha256", digest.hexdigest())


if __name__ == "__main__":
    main()
