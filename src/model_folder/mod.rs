//! Access to a model folder: where a model set's files come from (a directory
//! on disk or the shapes model embedded in the binary), its JSON configs and its
//! safetensors checkpoints. The bottom layer: model code reads its files
//! through this module and nothing else.
//!
//! - [`ModelSource`]: the folder, its files by relative path, and the one way
//!   files are named in errors ([`ModelSource::path`]).
//! - [`Weights`]: a checkpoint viewed by key prefix (`w.pp("encoder")`).
//! - [`DiffusersConfig`]: the one reader of diffusers `config.json` files.
//! - [`safetensors_io`]: checkpoints read tensor by tensor.
//! - [`embedded`]: the files of `models/shapes/`, compiled in.
//!
//! Layout of a model folder: see `models/README.md`.

pub mod diffusers_config;
pub mod embedded;
pub mod identity;
pub mod safetensors_io;
mod weights;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};

pub use diffusers_config::DiffusersConfig;
pub use weights::{candle_message, Weights};

/// Where a model set's files live.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A model folder on disk.
    Dir(PathBuf),
    /// The trained shapes-world model of `models/shapes/`, compiled into the binary.
    Embedded,
}

impl ModelSource {
    /// `--models DIR` if given, else the embedded shapes model.
    pub fn from_arg(dir: Option<PathBuf>) -> Self {
        match dir {
            Some(d) => ModelSource::Dir(d),
            None => ModelSource::Embedded,
        }
    }

    /// Where the folder is: its path, or `embedded:models/shapes`.
    pub fn location(&self) -> String {
        match self {
            ModelSource::Dir(d) => d.display().to_string(),
            ModelSource::Embedded => format!("embedded:{}", embedded::DIR),
        }
    }

    /// The model's identity, from its content alone (`sha256:` and 16 hex
    /// digits; see [`identity`]): the same files give the same identity
    /// wherever they are, mounted, copied or embedded. Layout ids, the
    /// parameters record and the metrics carry it.
    pub fn identity(&self) -> Result<String> {
        identity::of(self)
    }

    /// Every file of the folder, relative to it, sorted (for a directory:
    /// recursively, without hidden files and folders).
    pub fn files(&self) -> Result<Vec<String>> {
        match self {
            ModelSource::Embedded => {
                let mut v: Vec<String> =
                    embedded::FILES.iter().map(|(p, _)| p.to_string()).collect();
                v.sort();
                Ok(v)
            }
            ModelSource::Dir(d) => {
                let mut out = Vec::new();
                let mut stack = vec![std::path::PathBuf::new()];
                while let Some(rel) = stack.pop() {
                    let dir = d.join(&rel);
                    let entries = std::fs::read_dir(&dir)
                        .map_err(|e| Error::model_file(dir.display().to_string(), e))?;
                    for entry in entries {
                        let entry =
                            entry.map_err(|e| Error::model_file(dir.display().to_string(), e))?;
                        let name = entry.file_name();
                        let Some(name) = name.to_str() else { continue };
                        if name.starts_with('.') {
                            continue;
                        }
                        let path = rel.join(name);
                        if entry.path().is_dir() {
                            stack.push(path);
                        } else if let Some(p) = path.to_str() {
                            out.push(p.replace(std::path::MAIN_SEPARATOR, "/"));
                        }
                    }
                }
                out.sort();
                Ok(out)
            }
        }
    }

    /// The full name of a file of the folder (`rel` relative to its root),
    /// as every model-file error names it.
    pub fn path(&self, rel: &str) -> String {
        match self {
            ModelSource::Dir(d) => d.join(rel).display().to_string(),
            ModelSource::Embedded => format!("embedded:{}/{rel}", embedded::DIR),
        }
    }

    /// Whether the folder has this file (path relative to the folder root).
    pub fn has(&self, rel: &str) -> bool {
        match self {
            ModelSource::Dir(d) => d.join(rel).is_file(),
            ModelSource::Embedded => embedded::file(rel).is_some(),
        }
    }

    /// The whole content of one file of the folder.
    pub fn read(&self, rel: &str) -> Result<Cow<'static, [u8]>> {
        match self {
            ModelSource::Dir(d) => {
                let path = d.join(rel);
                if !path.is_file() {
                    return Err(self.missing(rel));
                }
                std::fs::read(&path)
                    .map(Cow::Owned)
                    .map_err(|e| Error::model_file(self.path(rel), e))
            }
            ModelSource::Embedded => embedded::file(rel)
                .map(Cow::Borrowed)
                .ok_or_else(|| self.missing(rel)),
        }
    }

    /// Parse a JSON file of the folder; errors name the file and the field.
    pub fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::model_file(self.path(rel), format!("bad config: {e}")))
    }

    /// Read a diffusers `config.json` (or `scheduler_config.json`).
    pub fn diffusers_config(&self, rel: &str) -> Result<DiffusersConfig> {
        DiffusersConfig::new(self.read_json(rel)?, self.path(rel))
    }

    /// Load every tensor of a small safetensors file (e.g. the PCA basis).
    pub fn load_tensors(&self, rel: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let bytes = self.read(rel)?;
        candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::model_file(self.path(rel), candle_message(&e)))
    }

    /// Open the weights of one component (`dir/stem.safetensors`, or the
    /// shards listed in `dir/stem.safetensors.index.json`), converted to `dtype`.
    pub fn weights(&self, dir: &str, stem: &str, dtype: DType, device: &Device) -> Result<Weights> {
        let single = format!("{dir}/{stem}.safetensors");
        let index = format!("{dir}/{stem}.safetensors.index.json");
        let file = self.path(&single);
        let vb = match self {
            ModelSource::Dir(d) => {
                let paths: Vec<PathBuf> = if d.join(&single).is_file() {
                    vec![d.join(&single)]
                } else if d.join(&index).is_file() {
                    let idx: ShardIndex = self.read_json(&index)?;
                    let mut shards: Vec<String> = idx.weight_map.into_values().collect();
                    shards.sort();
                    shards.dedup();
                    shards.iter().map(|s| d.join(dir).join(s)).collect()
                } else {
                    return Err(self.missing(&single));
                };
                for p in &paths {
                    if !p.is_file() {
                        return Err(Error::model_file(
                            p.display().to_string(),
                            "file is missing",
                        ));
                    }
                }
                let files = safetensors_io::SafetensorsFiles::open(&paths)
                    .map_err(|e| Error::model_file(&file, candle_message(&e)))?;
                VarBuilder::from_backend(Box::new(files), dtype, device.clone())
            }
            ModelSource::Embedded => {
                let data = embedded::file(&single).ok_or_else(|| self.missing(&single))?;
                VarBuilder::from_slice_safetensors(data, dtype, device)
                    .map_err(|e| Error::model_file(&file, candle_message(&e)))?
            }
        };
        Ok(Weights::new(vb, file))
    }

    /// The files of one component's weights, relative to the folder:
    /// `dir/stem.safetensors`, or the index and the shards it lists.
    pub fn weight_files(&self, dir: &str, stem: &str) -> Result<Vec<String>> {
        let single = format!("{dir}/{stem}.safetensors");
        let index = format!("{dir}/{stem}.safetensors.index.json");
        if self.has(&single) {
            return Ok(vec![single]);
        }
        if !self.has(&index) {
            return Err(self.missing(&single));
        }
        let idx: ShardIndex = self.read_json(&index)?;
        let mut shards: Vec<String> = idx.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        let mut files = vec![index];
        files.extend(shards.into_iter().map(|s| format!("{dir}/{s}")));
        Ok(files)
    }

    /// sha256 (hex) over the contents of `files` (relative to the folder), in
    /// order: the identity of a component whatever the folder is called.
    pub fn sha256(&self, files: &[String]) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let mut h = Sha256::new();
        for rel in files {
            match self {
                ModelSource::Dir(d) => {
                    let path = d.join(rel);
                    let mut f = std::fs::File::open(&path)
                        .map_err(|e| Error::model_file(self.path(rel), e))?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|e| Error::model_file(self.path(rel), e))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                }
                ModelSource::Embedded => h.update(self.read(rel)?),
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn missing(&self, rel: &str) -> Error {
        Error::model_file(self.path(rel), "file is missing")
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}
