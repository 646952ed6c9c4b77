//! The job's state on disk, which makes it resumable: `.augment/job.json`
//! (what the job is; a rerun must match it), the manifest of finished
//! outputs (`manifest.jsonl`, or a shard's part under `.augment/`), the
//! record of outputs refused by `--min-score` (`.augment/filtered*.jsonl`),
//! and the merge of the shards' parts once every shard is done.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::options::{AugmentOptions, Prompts};
use super::plan::Task;
use super::report::AugmentReport;
use crate::error::{Error, Result};
use crate::jobs::{write_atomic, write_atomic_shared};
use crate::pipeline::request::SynthesisRequest;

/// The `format` of `job.json`.
pub const FORMAT: &str = "lumen-augment/1";
/// The job's own files under OUT.
const STATE_DIR: &str = ".augment";

/// `job.json`: the job's identity. A rerun (or another shard) must match it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct JobRecord {
    format: String,
    input: String,
    masks: Option<String>,
    coco: Option<String>,
    yolo: Option<String>,
    per_image: usize,
    components: Vec<usize>,
    prompts: Prompts,
    request: SynthesisRequest,
    seed: u64,
    shards: usize,
}

/// One line of `manifest.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestLine {
    /// The source image, relative to `--input`.
    pub source: String,
    /// The output image, relative to OUT.
    pub output: String,
    /// The label files written for it, relative to OUT.
    pub labels: Vec<String>,
    pub seed: u64,
    pub components: usize,
    pub variant: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub scheduler: String,
    pub guidance_scale: f64,
    pub control_scale: f64,
    pub layout_size: u32,
    pub width: u32,
    pub height: u32,
    pub model: String,
    /// Fidelity score (see `crate::pipeline::score`).
    pub score: Option<f32>,
    /// The output's id in `annotations.json` (with `--coco`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coco_image_id: Option<u64>,
    /// The server that made it (with `--server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Milliseconds by stage.
    pub timings: BTreeMap<String, f64>,
}

/// A line of `filtered*.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct FilteredLine {
    pub source: String,
    pub output: String,
    pub seed: u64,
    pub components: usize,
    pub score: Option<f32>,
}

/// Whether `--min-score` refuses an output of this score.
pub(super) fn refused(min: Option<f32>, score: Option<f32>) -> bool {
    matches!((min, score), (Some(m), Some(s)) if s < m)
}

/// Where this run (this shard) keeps its state.
pub(super) struct State {
    dir: PathBuf,
    out: PathBuf,
    shard: (usize, usize),
    /// This shard's manifest: `manifest.jsonl`, or its part under `.augment/`.
    pub manifest: PathBuf,
    /// This shard's record of refused outputs.
    pub filtered: PathBuf,
}

impl State {
    /// Create `.augment/` and check `job.json` against this job (or write it).
    pub fn open(opts: &AugmentOptions, components: &[usize]) -> Result<State> {
        let dir = opts.out.join(STATE_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        check_job(
            &dir.join("job.json"),
            &JobRecord {
                format: FORMAT.into(),
                input: canonical(&opts.input),
                masks: opts.masks.as_deref().map(canonical),
                coco: opts.coco.as_deref().map(canonical),
                yolo: opts.yolo.as_deref().map(canonical),
                per_image: opts.per_image,
                components: components.to_vec(),
                prompts: opts.prompts.clone(),
                request: opts.request.clone(),
                seed: opts.seed,
                shards: opts.shard.1,
            },
        )?;
        let (manifest, filtered) = if opts.shard.1 > 1 {
            let tag = shard_tag(opts.shard);
            (
                dir.join(format!("manifest-{tag}.jsonl")),
                dir.join(format!("filtered-{tag}.jsonl")),
            )
        } else {
            (opts.out.join("manifest.jsonl"), dir.join("filtered.jsonl"))
        };
        Ok(State {
            dir,
            out: opts.out.clone(),
            shard: opts.shard,
            manifest,
            filtered,
        })
    }

    pub fn sharded(&self) -> bool {
        self.shard.1 > 1
    }

    /// What earlier runs did: the plan's outputs that are done (returned,
    /// with their manifest lines) or refused by `min` are counted; the rest
    /// is to be made. The filter is re-applied to the recorded scores: an
    /// earlier output that `min` now refuses is moved to the filtered record
    /// and its files are removed (a lower `min` on a later run makes it
    /// again, the same image from the same seed); one refused before that
    /// `min` now keeps is made again.
    pub fn pending(
        &self,
        plan: Vec<Task>,
        min: Option<f32>,
        report: &mut AugmentReport,
    ) -> Result<(Vec<Task>, BTreeMap<String, ManifestLine>)> {
        let mut done = load_manifest(&self.manifest, &self.out)?;
        report.refiltered = self.refilter(&mut done, min)?;
        let filtered: HashMap<String, Option<f32>> = read_lines::<FilteredLine>(&self.filtered)?
            .into_iter()
            .map(|l| (l.output, l.score))
            .collect();
        let mut pending = Vec::new();
        for t in plan {
            if done.contains_key(&t.output) {
                report.already_done += 1;
            } else if filtered.get(&t.output).is_some_and(|s| refused(min, *s)) {
                report.filtered += 1;
            } else {
                pending.push(t);
            }
        }
        Ok((pending, done))
    }

    /// Move the done outputs that `min` refuses to the filtered record:
    /// record first, then the manifest without them, then their files, so
    /// that a kill in between leaves a state the next run reads the same.
    fn refilter(
        &self,
        done: &mut BTreeMap<String, ManifestLine>,
        min: Option<f32>,
    ) -> Result<usize> {
        let refuse: Vec<String> = done
            .values()
            .filter(|l| refused(min, l.score))
            .map(|l| l.output.clone())
            .collect();
        if refuse.is_empty() {
            return Ok(0);
        }
        let mut record = Appender::lazy(&self.filtered);
        let gone: Vec<ManifestLine> = refuse.iter().filter_map(|o| done.remove(o)).collect();
        for l in &gone {
            record.append(&FilteredLine {
                source: l.source.clone(),
                output: l.output.clone(),
                seed: l.seed,
                components: l.components,
                score: l.score,
            })?;
        }
        write_manifest(&self.manifest, done)?;
        for l in &gone {
            for rel in std::iter::once(&l.output).chain(&l.labels) {
                if rel == "annotations.json" {
                    continue;
                }
                let path = self.out.join(rel);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
        }
        Ok(gone.len())
    }

    /// After a run with nothing left to retry, mark this shard done; the
    /// job is complete when every shard is (and then `manifest.jsonl` is
    /// the merge of their parts).
    pub fn complete(&self, report: &AugmentReport) -> Result<bool> {
        let shard_complete = report.failed.is_empty();
        if !self.sharded() {
            return Ok(shard_complete);
        }
        if shard_complete {
            write_atomic(
                &self
                    .dir
                    .join(format!("done-{}.json", shard_tag(self.shard))),
                serde_json::to_string(report).unwrap_or_default().as_bytes(),
            )?;
        }
        merge_shards(&self.out, &self.dir, self.shard.1)
    }
}

fn canonical(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn shard_tag((i, n): (usize, usize)) -> String {
    format!("{i}-of-{n}")
}

/// Check `job.json` against this job, or write it.
fn check_job(path: &Path, job: &JobRecord) -> Result<()> {
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let old: JobRecord = serde_json::from_str(&text)
            .map_err(|e| Error::param("out", format!("{}: {e}", path.display())))?;
        if &old != job {
            let ours = serde_json::to_value(job).unwrap_or_default();
            let theirs = serde_json::to_value(&old).unwrap_or_default();
            let differ: Vec<String> = ours
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| theirs.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            return Err(Error::param(
                "out",
                format!(
                    "{} holds another augment job (differs in: {}); use a new --out, or the same options to continue it",
                    path.parent().and_then(Path::parent).unwrap_or(path).display(),
                    differ.join(", ")
                ),
            ));
        }
        return Ok(());
    }
    let text =
        serde_json::to_string_pretty(job).map_err(|e| Error::Internal(format!("job.json: {e}")))?;
    write_atomic_shared(path, text.as_bytes())
}

/// Complete JSON lines of a file (a line cut by a kill is dropped).
pub(super) fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') || line.trim().is_empty() {
            continue;
        }
        if let Ok(v) = serde_json::from_str(line) {
            out.push(v);
        }
    }
    Ok(out)
}

/// The outputs an earlier run completed (line present and file there). The
/// manifest is rewritten without lines that are cut or stale, so appending
/// goes on from a clean end.
fn load_manifest(path: &Path, out: &Path) -> Result<BTreeMap<String, ManifestLine>> {
    let lines: Vec<ManifestLine> = read_lines(path)?;
    let mut done = BTreeMap::new();
    for l in lines {
        if out.join(&l.output).is_file()
            && l.labels
                .iter()
                .all(|p| out.join(p).is_file() || p == "annotations.json")
        {
            done.insert(l.output.clone(), l);
        }
    }
    if path.exists() {
        let current = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        if current.len() != manifest_text(&done).len() {
            write_manifest(path, &done)?;
        }
    }
    Ok(done)
}

fn manifest_text(done: &BTreeMap<String, ManifestLine>) -> String {
    done.values()
        .map(|l| serde_json::to_string(l).unwrap_or_default() + "\n")
        .collect()
}

/// Rewrite a manifest with exactly these lines.
fn write_manifest(path: &Path, done: &BTreeMap<String, ManifestLine>) -> Result<()> {
    write_atomic(path, manifest_text(done).as_bytes())
}

/// A JSON-lines file open for appending.
pub(super) struct Appender {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl Appender {
    /// Opened at the first line.
    pub fn lazy(path: &Path) -> Appender {
        Appender {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// Opened (created) now.
    pub fn open(path: &Path) -> Result<Appender> {
        let mut a = Appender::lazy(path);
        a.file()?;
        Ok(a)
    }

    fn file(&mut self) -> Result<&mut std::fs::File> {
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Append one JSON line in one write.
    pub fn append(&mut self, v: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))?;
        line.push('\n');
        let written = self.file()?.write_all(line.as_bytes());
        written.map_err(|e| Error::io(&self.path, e))
    }
}

/// When every shard is done, write the merged `manifest.jsonl`. Whichever
/// shard completes the set does it (two doing it at once write the same).
fn merge_shards(out: &Path, state: &Path, n: usize) -> Result<bool> {
    if !(0..n).all(|i| {
        state
            .join(format!("done-{}.json", shard_tag((i, n))))
            .is_file()
    }) {
        return Ok(false);
    }
    let mut lines: Vec<ManifestLine> = Vec::new();
    for i in 0..n {
        lines.extend(read_lines(
            &state.join(format!("manifest-{}.jsonl", shard_tag((i, n)))),
        )?);
    }
    lines.sort_by(|a, b| a.output.cmp(&b.output));
    lines.dedup_by(|a, b| a.output == b.output);
    let text: String = lines
        .iter()
        .map(|l| serde_json::to_string(l).unwrap_or_default() + "\n")
        .collect();
    write_atomic_shared(&out.join("manifest.jsonl"), text.as_bytes())?;
    Ok(true)
}
