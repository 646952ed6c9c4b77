//! The tiny random-weight model set of `models/tiny/`, compiled into the
//! binary so that every command works without `--models`. Its weights are
//! random: it proves the wiring, its outputs carry no meaning.

macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny/", $path)) as &[u8])),*]
    };
}

/// Every file of `models/tiny/`, by path relative to that folder.
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

/// The embedded file at `rel` (relative to `models/tiny/`).
pub fn file(rel: &str) -> Option<&'static [u8]> {
    FILES.iter().find(|(p, _)| *p == rel).map(|(_, b)| *b)
}
