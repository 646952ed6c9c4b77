//! The text side: CLIP's BPE tokenizer and transformers' `CLIPTextModel`
//! (tensors in, tensors out). Its last hidden state conditions the UNet.
//!
//! Tokenizer: `tokenizer/tokenizer.json` when present; otherwise the
//! `vocab.json` + `merges.txt` pair that SD1.5 repositories ship, assembled
//! with the same normalizer, pre-tokenizer and post-processor transformers'
//! CLIP converter produces. Ids are truncated and padded to
//! `model_max_length` with the pad token of `tokenizer_config.json`.
//!
//! Text encoder keys (with or without the leading `text_model.`):
//!
//! ```text
//! text_model.embeddings.{token_embedding, position_embedding}.weight
//! text_model.encoder.layers.N.{layer_norm1, layer_norm2}.{weight, bias}
//! text_model.encoder.layers.N.self_attn.{q_proj, k_proj, v_proj, out_proj}.{weight, bias}
//! text_model.encoder.layers.N.mlp.{fc1, fc2}.{weight, bias}
//! text_model.final_layer_norm.{weight, bias}
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::models::attention;
use crate::models::nn::{linear, Activation, Linear};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// CLIP's BPE tokenizer with fixed-length output.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    pad_id: u32,
    eos_id: u32,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    pad_token: Option<Value>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Load from `tokenizer/` of a model folder. `max_positions` caps the
    /// length (the text encoder's `max_position_embeddings`).
    pub fn load(src: &ModelSource, max_positions: usize) -> Result<Self> {
        let dir = "tokenizer";
        let (inner, file) = if src.has(&format!("{dir}/tokenizer.json")) {
            let file = format!("{dir}/tokenizer.json");
            let bytes = src.read(&file)?;
            let t = tokenizers::Tokenizer::from_bytes(bytes.as_ref())
                .map_err(|e| Error::model_file(src.path(&file), format!("bad tokenizer: {e}")))?;
            (t, src.path(&file))
        } else {
            let vocab_file = format!("{dir}/vocab.json");
            let merges_file = format!("{dir}/merges.txt");
            let vocab: HashMap<String, u32> = src.read_json(&vocab_file)?;
            let merges = src.read(&merges_file)?;
            let merges = std::str::from_utf8(&merges).map_err(|e| {
                Error::model_file(src.path(&merges_file), format!("not UTF-8: {e}"))
            })?;
            let spec = clip_tokenizer_json(&vocab, merges, &src.path(&merges_file))?;
            let t =
                tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
                    Error::model_file(src.path(&vocab_file), format!("bad tokenizer: {e}"))
                })?;
            (t, src.path(&vocab_file))
        };
        let cfg_file = format!("{dir}/tokenizer_config.json");
        let cfg: TokenizerConfig = if src.has(&cfg_file) {
            src.read_json(&cfg_file)?
        } else {
            TokenizerConfig::default()
        };
        let max_len = cfg
            .model_max_length
            .filter(|m| m.is_finite() && *m >= 2.0)
            .map_or(max_positions, |m| (m as usize).min(max_positions));
        let pad = cfg
            .pad_token
            .as_ref()
            .and_then(token_text)
            .unwrap_or_else(|| EOS.to_string());
        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                Error::model_file(&file, format!("the vocabulary has no `{tok}` token"))
            })
        };
        let pad_id = id(&pad)?;
        let eos_id = id(EOS)?;
        Ok(Self {
            inner,
            max_len,
            pad_id,
            eos_id,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids of `text`: BOS, tokens, EOS, truncated to `max_len` (EOS kept
    /// last) and padded with the pad token to exactly `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::param("prompt", format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }
}

/// The tokenizer.json transformers' CLIP converter writes for a vocab/merges pair.
fn clip_tokenizer_json(
    vocab: &HashMap<String, u32>,
    merges: &str,
    merges_file: &str,
) -> Result<Value> {
    let merges: Vec<Value> = merges
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok(json!([a, b])),
                _ => Err(Error::model_file(
                    merges_file,
                    format!("bad merge line `{l}`"),
                )),
            }
        })
        .collect::<Result<_>>()?;
    let special = |tok: &str| -> Result<Value> {
        let id = vocab.get(tok).ok_or_else(|| {
            Error::model_file(merges_file, format!("the vocabulary has no `{tok}` token"))
        })?;
        Ok(
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                  "rstrip": false, "normalized": true, "special": true}),
        )
    };
    let (bos_id, eos_id) = (vocab.get(BOS).copied(), vocab.get(EOS).copied());
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS)?, special(EOS)?],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split",
             "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, eos_id], "cls": [BOS, bos_id],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`); defaults are transformers'.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

struct ClipLayer {
    ln1: LayerNorm,
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// transformers' `CLIPTextModel`, returning `last_hidden_state`.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    act: Activation,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_file = "text_encoder/config.json";
        let cfg: ClipTextConfig = src.read_json(cfg_file)?;
        let file = src.path(cfg_file);
        let act = Activation::parse(&cfg.hidden_act).map_err(|m| Error::model_file(&file, m))?;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::model_file(
                &file,
                format!(
                    "bad config: hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        let w = src.weights("text_encoder", "model", dtype, device)?;
        let w = if w.contains("text_model.embeddings.token_embedding.weight") {
            w.pp("text_model")
        } else {
            w
        };
        let d = cfg.hidden_size;
        let emb = w.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, d), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, d), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = w.pp("encoder").pp("layers").pp(i);
                let at = l.pp("self_attn");
                Ok(ClipLayer {
                    ln1: l.pp("layer_norm1").layer_norm(d, cfg.layer_norm_eps)?,
                    qkv: Linear::stack(&[
                        linear(&at.pp("q_proj"), d, d, true)?,
                        linear(&at.pp("k_proj"), d, d, true)?,
                        linear(&at.pp("v_proj"), d, d, true)?,
                    ])?,
                    out: linear(&at.pp("out_proj"), d, d, true)?,
                    ln2: l.pp("layer_norm2").layer_norm(d, cfg.layer_norm_eps)?,
                    fc1: linear(&l.pp("mlp").pp("fc1"), d, cfg.intermediate_size, true)?,
                    fc2: linear(&l.pp("mlp").pp("fc2"), cfg.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = w.pp("final_layer_norm").layer_norm(d, cfg.layer_norm_eps)?;
        Ok(Self {
            cfg,
            act,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `last_hidden_state` `[B, L, D]` for token ids `[B, L]` (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(Error::Internal(format!(
                "{l} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let d = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, d))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = tok.broadcast_add(&pos)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        for layer in &self.layers {
            let h = layer.ln1.forward(&x)?;
            let qkv = layer.qkv.forward(&h)?;
            let q = attention::split_heads(&qkv.narrow(2, 0, d)?, heads)?;
            let k = attention::split_heads(&qkv.narrow(2, d, d)?, heads)?;
            let v = attention::split_heads(&qkv.narrow(2, 2 * d, d)?, heads)?;
            let a = attention::sdpa_causal(&q, &k, &v, scale)?;
            x = (x + layer.out.forward(&attention::merge_heads(&a)?)?)?;
            let h = layer.ln2.forward(&x)?;
            let h = layer
                .fc2
                .forward(&self.act.apply(&layer.fc1.forward(&h)?)?)?;
            x = (x + h)?;
        }
        Ok(self.final_layer_norm.forward(&x)?)
    }
}

/// Tokenizer and text encoder together: prompt strings to embeddings.
pub struct TextConditioner {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
}

impl TextConditioner {
    pub fn load(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let encoder = ClipTextModel::load(src, device, dtype)?;
        let tokenizer = ClipTokenizer::load(src, encoder.cfg.max_position_embeddings)?;
        Ok(Self { tokenizer, encoder })
    }

    /// Embeddings `[N, L, D]` for N prompts.
    pub fn encode(&self, prompts: &[&str], device: &Device) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.tokenizer.max_len());
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), self.tokenizer.max_len()), device)?;
        self.encoder.forward(&ids)
    }
}
