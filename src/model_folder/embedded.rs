//! The shapes-world model of `models/shapes/` (trained in this repository by
//! `scripts/train_shapes.sh`; see models/README.md), compiled into the binary
//! so that every command works without `--models`. It knows 64×64 images of
//! flat coloured circles, squares and triangles on grey, nothing else.

/// The folder the embedded files come from, relative to the repository.
pub const DIR: &str = "models/shapes";

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes/", $path)) as &[u8])),*]
    };
}

/// Every file of `models/shapes/`, by path relative to that folder.
pub static FILES: &[(&str, &[u8])] = embed!(
    "lumen.json",
    "model_index.json",
    "pca.safetensors",
    "encoder/config.json",
    "encoder/model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
);

/// The embedded file at `rel` (relative to `models/shapes/`).
pub fn file(rel: &str) -> Option<&'static [u8]> {
    FILES.iter().find(|(p, _)| *p == rel).map(|(_, b)| *b)
}
