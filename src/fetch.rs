//! `lumen fetch`: assemble a model folder (see models/README.md) from Hugging
//! Face Hub repositories with the hf-hub crate. Honours `HF_ENDPOINT`,
//! `HF_TOKEN` (else the token file under `HF_HOME`) and `HF_HOME` (the
//! download cache). Downloads go through hf-hub's cache, which resumes
//! interrupted files (`.incomplete` blobs), then are hard-linked (or copied)
//! into the folder.
//!
//! Layout of the result: `encoder/` from the DINOv2 repo, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/` from the SD1.5-style repo,
//! `controlnet/` from the ControlNet repo or local folder (plus its
//! `pca.safetensors` and `lumen.json` when it ships them). Without a
//! ControlNet the folder is a base for training one (`lumen-train`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use crate::error::{Error, Result};

/// What to fetch and where.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    pub out: PathBuf,
    pub encoder: String,
    pub diffusion: String,
    /// A Hub repo id or a local folder; none for a training base.
    pub controlnet: Option<String>,
    /// A local `pca.safetensors` to copy (else the ControlNet source's, if any).
    pub pca: Option<PathBuf>,
    pub revision: String,
    /// hf-hub cache directory (default: `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    pub progress: bool,
}

/// What `fetch` did.
#[derive(Debug, Default)]
pub struct FetchReport {
    /// Files written, relative to the folder.
    pub files: Vec<String>,
    /// Whether the folder has a PCA basis.
    pub has_pca: bool,
}

/// One source of files: a Hub repo or a local folder.
enum Source {
    Hub {
        id: String,
        repo: Box<ApiRepo>,
        files: BTreeSet<String>,
    },
    Local(PathBuf),
}

impl Source {
    fn hub(api: &Api, id: &str, revision: &str) -> Result<Self> {
        let repo = api.repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        let info = repo.info().map_err(|e| {
            Error::param(
                "repo",
                format!("cannot list `{id}` (revision {revision}): {e}"),
            )
        })?;
        let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok(Source::Hub {
            id: id.to_string(),
            repo: Box::new(repo),
            files,
        })
    }

    fn name(&self) -> String {
        match self {
            Source::Hub { id, .. } => id.clone(),
            Source::Local(p) => p.display().to_string(),
        }
    }

    fn has(&self, file: &str) -> bool {
        match self {
            Source::Hub { files, .. } => files.contains(file),
            Source::Local(p) => p.join(file).is_file(),
        }
    }

    /// A local path to `file` (downloading it into the cache if needed).
    fn get(&self, file: &str) -> Result<PathBuf> {
        match self {
            Source::Hub { id, repo, .. } => repo.get(file).map_err(|e| {
                Error::param("repo", format!("cannot download `{file}` from `{id}`: {e}"))
            }),
            Source::Local(p) => Ok(p.join(file)),
        }
    }

    /// The safetensors weights `{dir}{stem}.safetensors`, or its sharded index
    /// and shards, as paths relative to the source.
    fn weight_files(&self, dir: &str, stem: &str) -> Result<Vec<String>> {
        let single = format!("{dir}{stem}.safetensors");
        if self.has(&single) {
            return Ok(vec![single]);
        }
        let index = format!("{dir}{stem}.safetensors.index.json");
        if self.has(&index) {
            #[derive(Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let path = self.get(&index)?;
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let idx: Index = serde_json::from_str(&text)
                .map_err(|e| Error::model_file(&index, format!("bad shard index: {e}")))?;
            let shards: BTreeSet<String> = idx.weight_map.into_values().collect();
            let mut files = vec![index];
            files.extend(shards.into_iter().map(|s| format!("{dir}{s}")));
            return Ok(files);
        }
        Err(Error::param(
            "repo",
            format!(
                "`{}` has no `{single}` (nor a sharded index); lumen reads safetensors only",
                self.name()
            ),
        ))
    }
}

/// Assemble the model folder.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let mut builder = ApiBuilder::from_env()
        .with_progress(opts.progress)
        .with_retries(3);
    if let Some(dir) = &opts.cache_dir {
        builder = builder.with_cache_dir(dir.clone());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.is_empty() {
            builder = builder.with_token(Some(token));
        }
    }
    let api = builder
        .build()
        .map_err(|e| Error::Internal(format!("cannot set up the Hub client: {e}")))?;
    let mut report = FetchReport::default();

    // The encoder: transformers' Dinov2Model folder → encoder/.
    let enc = Source::hub(&api, &opts.encoder, &opts.revision)?;
    let mut files = vec!["config.json".to_string()];
    files.extend(enc.weight_files("", "model")?);
    for f in files {
        place(&enc, &f, &opts.out, &format!("encoder/{f}"), &mut report)?;
    }

    // The diffusion components of an SD1.5-style diffusers repo.
    let sd = Source::hub(&api, &opts.diffusion, &opts.revision)?;
    for (dir, stem) in [
        ("unet/", "diffusion_pytorch_model"),
        ("vae/", "diffusion_pytorch_model"),
        ("text_encoder/", "model"),
    ] {
        let mut files = vec![format!("{dir}config.json")];
        files.extend(sd.weight_files(dir, stem)?);
        for f in files {
            place(&sd, &f, &opts.out, &f, &mut report)?;
        }
    }
    let tokenizer_files = [
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ];
    let mut any_tokenizer = false;
    for f in tokenizer_files {
        if sd.has(f) {
            place(&sd, f, &opts.out, f, &mut report)?;
            any_tokenizer |= f.ends_with("tokenizer.json") || f.ends_with("vocab.json");
        }
    }
    if !any_tokenizer {
        return Err(Error::param(
            "diffusion",
            format!(
                "`{}` has no tokenizer/tokenizer.json or tokenizer/vocab.json",
                sd.name()
            ),
        ));
    }
    place(
        &sd,
        "scheduler/scheduler_config.json",
        &opts.out,
        "scheduler/scheduler_config.json",
        &mut report,
    )?;
    if sd.has("model_index.json") {
        place(
            &sd,
            "model_index.json",
            &opts.out,
            "model_index.json",
            &mut report,
        )?;
    }

    // The ControlNet: a Hub repo or a local folder.
    if let Some(controlnet) = &opts.controlnet {
        let local = Path::new(controlnet);
        let cn = if local.is_dir() {
            Source::Local(local.to_path_buf())
        } else {
            Source::hub(&api, controlnet, &opts.revision)?
        };
        let mut files = vec!["config.json".to_string()];
        files.extend(cn.weight_files("", "diffusion_pytorch_model")?);
        for f in files {
            place(&cn, &f, &opts.out, &format!("controlnet/{f}"), &mut report)?;
        }
        for f in ["lumen.json", "pca.safetensors"] {
            if cn.has(f) {
                place(&cn, f, &opts.out, f, &mut report)?;
            }
        }
    }
    if let Some(pca) = &opts.pca {
        let dest = opts.out.join("pca.safetensors");
        link_or_copy(pca, &dest)?;
        report.files.push("pca.safetensors".into());
    }
    report.has_pca = opts.out.join("pca.safetensors").is_file();
    Ok(report)
}

/// Put `file` of `src` at `out/dest`.
fn place(src: &Source, file: &str, out: &Path, dest: &str, report: &mut FetchReport) -> Result<()> {
    let from = src.get(file)?;
    let to = out.join(dest);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    link_or_copy(&from, &to)?;
    report.files.push(dest.to_string());
    Ok(())
}

/// Hard-link the real file behind `from` (hf-hub's snapshot entries are
/// symlinks into its blob store) at `to`, or copy it across filesystems.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let real = std::fs::canonicalize(from).map_err(|e| Error::io(from, e))?;
    if to.exists() {
        std::fs::remove_file(to).map_err(|e| Error::io(to, e))?;
    }
    if std::fs::hard_link(&real, to).is_err() {
        std::fs::copy(&real, to).map_err(|e| Error::io(to, e))?;
    }
    Ok(())
}
