//! `lumen augment`: a labelled dataset in, a larger synthetic labelled
//! dataset out. Every source image gets `per_image` variants for each K;
//! each variant keeps the source's layout, so its labels still apply and are
//! carried over, aligned with the output's size:
//!
//! ```text
//! OUT/images/<dir>/<stem>-k<K>-v<n>.<ext>   the synthetic images (the input's folder structure)
//! OUT/masks/<dir>/<stem>-k<K>-v<n>.png      masks, nearest-resized, class values and palette kept (--masks)
//! OUT/labels/<dir>/<stem>-k<K>-v<n>.txt     YOLO files, copied unchanged (--yolo)
//! OUT/annotations.json                      COCO for every output image, geometry rescaled (--coco)
//! OUT/manifest.jsonl                        one line per output image (see [`ManifestLine`])
//! OUT/.augment/job.json                     what the job is, so that a rerun continues only this job
//! OUT/.augment/filtered*.jsonl              outputs refused by --min-score (not redone by a rerun)
//! OUT/.augment/manifest-I-of-N.jsonl        a shard's manifest (--shard I/N), merged into
//!                                           manifest.jsonl by the shard that completes the set
//! ```
//!
//! Work is planned per output image: its seed comes from the job's seed, the
//! source's path and the variant, so a rerun (or another shard, or a server)
//! makes the same image. Each output is written under a temporary name and
//! renamed, labels first, then the image, then its manifest line is
//! appended: an output is done when its line is there, and a rerun after a
//! kill makes only what is missing. Bad sources (undecodable images, masks
//! of the wrong size or missing, COCO entries for missing files) are listed
//! in the summary and skipped; nothing else is lost.
//!
//! The images come from the local engine ([`local`]: one thread owns the
//! models) or from running `lumen serve` replicas ([`remote`]).

pub mod coco;
mod local;
pub mod mask;
mod remote;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataset::ImageFolder;
use crate::error::{Error, Result};
use crate::jobs::{write_atomic, write_atomic_shared};
use crate::model_folder::ModelSource;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::request::{SynthesisParameters, SynthesisRequest};

pub use remote::RemoteOptions;

/// The `format` of `job.json`.
pub const FORMAT: &str = "lumen-augment/1";
/// The job's own files under OUT.
const STATE_DIR: &str = ".augment";

/// Where the prompts come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompts {
    /// The same prompt for every output.
    Fixed(String),
    /// The dataset's captions (`metadata.jsonl` or `NAME.txt`, as `lumen
    /// layouts` reads them); no caption, no prompt.
    Captions,
    /// Cycled through, one per output in plan order.
    Cycle(Vec<String>),
}

/// Which engine makes the images.
#[derive(Clone, Debug)]
pub enum Backend {
    Local {
        source: ModelSource,
        device: candle_core::Device,
        precision: crate::pipeline::synthesis::Precision,
        /// Images per model call.
        batch: usize,
    },
    Remote(RemoteOptions),
}

/// What to do.
#[derive(Clone, Debug)]
pub struct AugmentOptions {
    pub input: PathBuf,
    pub out: PathBuf,
    pub masks: Option<PathBuf>,
    pub coco: Option<PathBuf>,
    pub yolo: Option<PathBuf>,
    /// Variants per source and K.
    pub per_image: usize,
    /// The K of each variant set (empty: the model's default K).
    pub components: Vec<usize>,
    pub prompts: Prompts,
    /// Every other synthesis parameter (prompt, components, seed, num_images
    /// and score are set per output).
    pub request: SynthesisRequest,
    pub seed: u64,
    /// Outputs scoring below this are not kept.
    pub min_score: Option<f32>,
    /// `(index, count)`: this worker's share of the sources.
    pub shard: (usize, usize),
    pub progress: bool,
}

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

/// One source image and its labels.
#[derive(Clone, Debug)]
struct Source {
    rel: String,
    path: PathBuf,
    caption: Option<String>,
    mask: Option<PathBuf>,
    yolo: Option<PathBuf>,
    /// Index into the COCO images.
    coco: Option<usize>,
}

/// One output image to make.
#[derive(Clone, Debug)]
pub struct Task {
    /// Position in the whole job's plan (every shard agrees): the output's COCO image id − 1.
    pub id: u64,
    pub source: usize,
    pub components: usize,
    pub variant: usize,
    pub seed: u64,
    pub prompt: String,
    /// Path relative to OUT.
    pub output: String,
}

/// A finished synthesis, before it is written.
pub struct Generated {
    pub task: Task,
    /// The encoded image.
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub score: Option<f32>,
    pub parameters: SynthesisParameters,
    /// The server that made it (remote mode).
    pub server: Option<String>,
    /// Milliseconds by stage.
    pub timings: BTreeMap<String, f64>,
}

/// What a worker reports.
pub enum Outcome {
    Done(Box<Generated>),
    /// The source cannot be used (bad input); its other tasks are dropped.
    BadSource {
        source: usize,
        reason: String,
    },
    /// This output could not be made (not the input's fault); a rerun retries it.
    Failed {
        task: Task,
        reason: String,
    },
    /// Nothing more can be done (no server answers, a model error).
    Fatal(Error),
}

/// The work queue the workers share: tasks are taken in plan order, a
/// task that failed for a transient reason goes back to the front.
pub struct Dispatch {
    state: Mutex<DispatchState>,
    cv: Condvar,
    /// Set when the job stops early (fatal error).
    pub stop: AtomicBool,
    /// Answers 429 / 503 that were waited out and retried.
    pub retried_busy: AtomicU64,
    /// Requests moved to another server after a connection failure.
    pub failed_over: AtomicU64,
}

struct DispatchState {
    queue: VecDeque<Task>,
    in_flight: usize,
    bad_sources: HashSet<usize>,
}

impl Dispatch {
    fn new(tasks: Vec<Task>) -> Self {
        Self {
            state: Mutex::new(DispatchState {
                queue: tasks.into(),
                in_flight: 0,
                bad_sources: HashSet::new(),
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            retried_busy: AtomicU64::new(0),
            failed_over: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DispatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next tasks: the first in the queue and up to `max - 1` more that
    /// `same` groups with it. Waits while the queue is empty but tasks are in
    /// flight (they may come back); `None` when everything is done.
    pub fn take(&self, max: usize, same: impl Fn(&Task, &Task) -> bool) -> Option<Vec<Task>> {
        let mut st = self.lock();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            while let Some(t) = st.queue.front() {
                if st.bad_sources.contains(&t.source) {
                    st.queue.pop_front();
                } else {
                    break;
                }
            }
            if let Some(first) = st.queue.pop_front() {
                let mut group = vec![first];
                while group.len() < max {
                    match st.queue.front() {
                        Some(t) if same(&group[0], t) => {
                            group.push(st.queue.pop_front().expect("front exists"))
                        }
                        _ => break,
                    }
                }
                st.in_flight += group.len();
                return Some(group);
            }
            if st.in_flight == 0 {
                return None;
            }
            st = self
                .cv
                .wait_timeout(st, std::time::Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// `n` taken tasks are finished (whatever their outcome).
    pub fn finish(&self, n: usize) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(n);
        self.cv.notify_all();
    }

    /// A taken task goes back to the front of the queue.
    pub fn retry(&self, task: Task) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.queue.push_front(task);
        self.cv.notify_all();
    }

    /// Drop the queued tasks of a bad source.
    pub fn bad_source(&self, source: usize) {
        self.lock().bad_sources.insert(source);
    }

    /// Whether every task is done (nothing queued or in flight).
    pub fn finished(&self) -> bool {
        let st = self.lock();
        st.in_flight == 0 && st.queue.iter().all(|t| st.bad_sources.contains(&t.source))
    }

    /// Stop every worker.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
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
struct FilteredLine {
    source: String,
    output: String,
    seed: u64,
    components: usize,
    score: Option<f32>,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AugmentReport {
    pub sources: usize,
    /// Outputs planned for this shard.
    pub planned: usize,
    /// Outputs written by this run.
    pub written: usize,
    /// Outputs found complete from an earlier run.
    pub already_done: usize,
    /// Outputs refused by `--min-score` (this run and earlier runs).
    pub filtered: usize,
    /// Sources skipped as bad input: (path, why).
    pub skipped: Vec<(String, String)>,
    /// Outputs that could not be made (a rerun retries them): (output, why).
    pub failed: Vec<(String, String)>,
    /// COCO entries and annotations that were left out: (what, why).
    pub coco_problems: Vec<(String, String)>,
    pub mean_score: Option<f64>,
    /// Seconds this run spent making images.
    pub seconds: f64,
    pub retried_busy: u64,
    pub failed_over: u64,
    /// Whether `manifest.jsonl` (and `annotations.json`) cover the whole job.
    pub complete: bool,
    /// What stopped the job early (no server answering, OUT not writable, a
    /// model error); what was written before stays and a rerun continues.
    #[serde(skip)]
    pub stopped: Option<Error>,
}

impl AugmentReport {
    pub fn images_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.written as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The seed of variant `variant` of `source`: the same for every K, so the
/// K of a source differ only by K.
pub fn variant_seed(seed: u64, source: &str, variant: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(source.as_bytes());
    h.update([0]);
    h.update((variant as u64).to_le_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // Within 2^53, so that every JSON reader keeps it exact.
    u64::from_le_bytes(b) & ((1 << 53) - 1)
}

/// Parse `I/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::param("shard", format!("`{s}` is not I/N with 0 <= I < N"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

fn canonical(p: &Path) -> String {
    p.canonicalize()
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// `rel` (a `/`-separated path) without its extension, and its folder.
fn stem_of(rel: &str) -> String {
    match rel.rfind('.') {
        Some(dot) if dot > rel.rfind('/').map_or(0, |s| s + 1) => rel[..dot].to_string(),
        _ => rel.to_string(),
    }
}

fn shard_tag((i, n): (usize, usize)) -> String {
    format!("{i}-of-{n}")
}

/// Run the job. `Err` for what stops it before any image is made (bad
/// options or labels files, a model that does not load); what stops it
/// later (no server answering, OUT not writable) is in
/// [`AugmentReport::stopped`] with the counts so far; bad sources are listed
/// in the report.
pub fn run(opts: &AugmentOptions, backend: Backend) -> Result<AugmentReport> {
    if opts.per_image == 0 {
        return Err(Error::param("per-image", "must be at least 1"));
    }
    let format = opts.request.format()?;
    let folder = ImageFolder::scan(&opts.input, Some(&opts.out)).map_err(|e| match e {
        Error::InvalidParameter { message, .. } => Error::param("input", message),
        e => e,
    })?;
    for (name, dir) in [("masks", &opts.masks), ("yolo", &opts.yolo)] {
        if let Some(d) = dir {
            if !d.is_dir() {
                return Err(Error::param(
                    name,
                    format!("{} is not a folder", d.display()),
                ));
            }
        }
    }
    let mut report = AugmentReport::default();
    let coco = match &opts.coco {
        Some(p) => Some(coco::Coco::read(p)?),
        None => None,
    };

    // K: the given ones, else the model's default (local only).
    let components =
        if opts.components.is_empty() {
            match &backend {
                Backend::Local { source, .. } => {
                    vec![
                        crate::pipeline::spec::ModelSpecs::read(source)?
                            .layout
                            .default_components,
                    ]
                }
                Backend::Remote(_) => return Err(Error::param(
                    "components",
                    "give --components with --server (the servers' default K is not known here)",
                )),
            }
        } else {
            opts.components.clone()
        };
    let mut seen = BTreeSet::new();
    for &k in &components {
        if k == 0 || !seen.insert(k) {
            return Err(Error::param(
                "components",
                format!("{components:?}: each K must be at least 1 and given once"),
            ));
        }
    }

    // Sources and their labels.
    let rels: Vec<String> = folder.images.iter().map(|e| e.rel.clone()).collect();
    let coco_match = match &coco {
        Some(c) => {
            report.coco_problems.extend(c.problems.iter().cloned());
            let (matched, problems) = c.match_files(&rels);
            report.coco_problems.extend(problems);
            matched
        }
        None => BTreeMap::new(),
    };
    let mut sources = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    for e in &folder.images {
        let stem = stem_of(&e.rel);
        if let Some(other) = names.insert(stem.clone(), e.rel.clone()) {
            report.skipped.push((
                e.rel.clone(),
                format!("its outputs would have the same names as those of {other}"),
            ));
            continue;
        }
        sources.push(Source {
            rel: e.rel.clone(),
            path: e.path.clone(),
            caption: e.caption.clone(),
            mask: opts.masks.as_ref().map(|d| d.join(format!("{stem}.png"))),
            yolo: opts
                .yolo
                .as_ref()
                .map(|d| d.join(format!("{stem}.txt")))
                .filter(|p| p.is_file()),
            coco: coco_match.get(&e.rel).copied(),
        });
    }
    report.sources = sources.len();

    // The plan: every output of the whole job, in order; this shard's part.
    let ext = match format {
        OutputFormat::Png => "png",
        OutputFormat::Jpeg => "jpg",
        OutputFormat::Webp => "webp",
    };
    let mut plan = Vec::new();
    let mut id = 0u64;
    for (s, src) in sources.iter().enumerate() {
        let stem = stem_of(&src.rel);
        for &k in &components {
            for v in 0..opts.per_image {
                let prompt = match &opts.prompts {
                    Prompts::Fixed(p) => p.clone(),
                    Prompts::Captions => src.caption.clone().unwrap_or_default(),
                    Prompts::Cycle(list) => list[id as usize % list.len().max(1)].clone(),
                };
                if s % opts.shard.1 == opts.shard.0 {
                    plan.push(Task {
                        id,
                        source: s,
                        components: k,
                        variant: v,
                        seed: variant_seed(opts.seed, &src.rel, v),
                        prompt,
                        output: format!("images/{stem}-k{k}-v{v}.{ext}"),
                    });
                }
                id += 1;
            }
        }
    }
    report.planned = plan.len();

    // The job's identity and what earlier runs did.
    let state = opts.out.join(STATE_DIR);
    std::fs::create_dir_all(&state).map_err(|e| Error::io(&state, e))?;
    check_job(
        &state.join("job.json"),
        &JobRecord {
            format: FORMAT.into(),
            input: canonical(&opts.input),
            masks: opts.masks.as_deref().map(canonical),
            coco: opts.coco.as_deref().map(canonical),
            yolo: opts.yolo.as_deref().map(canonical),
            per_image: opts.per_image,
            components: components.clone(),
            prompts: opts.prompts.clone(),
            request: opts.request.clone(),
            seed: opts.seed,
            shards: opts.shard.1,
        },
    )?;
    let sharded = opts.shard.1 > 1;
    let manifest_path = if sharded {
        state.join(format!("manifest-{}.jsonl", shard_tag(opts.shard)))
    } else {
        opts.out.join("manifest.jsonl")
    };
    let filtered_path = if sharded {
        state.join(format!("filtered-{}.jsonl", shard_tag(opts.shard)))
    } else {
        state.join("filtered.jsonl")
    };
    let done = load_manifest(&manifest_path, &opts.out)?;
    let filtered: HashMap<String, Option<f32>> = read_lines::<FilteredLine>(&filtered_path)?
        .into_iter()
        .map(|l| (l.output, l.score))
        .collect();
    let min = opts.min_score;
    let refused = |score: Option<f32>| matches!((min, score), (Some(m), Some(s)) if s < m);
    let mut pending = Vec::new();
    for t in plan {
        if done.contains_key(&t.output) {
            report.already_done += 1;
        } else if filtered.get(&t.output).is_some_and(|s| refused(*s)) {
            report.filtered += 1;
        } else {
            pending.push(t);
        }
    }

    // Sources whose labels cannot be carried over are skipped before any
    // image is made for them.
    let mut bad: HashMap<usize, String> = HashMap::new();
    let needed: BTreeSet<usize> = pending.iter().map(|t| t.source).collect();
    for &s in &needed {
        if let Err(why) = check_source(&sources[s], coco.as_ref(), opts.coco.is_some()) {
            bad.insert(s, why);
        }
    }
    pending.retain(|t| !bad.contains_key(&t.source));
    let mut bad: Vec<(usize, String)> = bad.into_iter().collect();
    bad.sort();
    report.skipped.extend(
        bad.into_iter()
            .map(|(s, why)| (sources[s].rel.clone(), why)),
    );

    // Make the images.
    let start = Instant::now();
    let mut fatal = None;
    let mut scores: Vec<f64> = done
        .values()
        .filter_map(|l| l.score.map(f64::from))
        .collect();
    if !pending.is_empty() {
        let bar = progress(pending.len() as u64, opts.progress);
        let n_pending = pending.len();
        let dispatch = Arc::new(Dispatch::new(pending));
        let (tx, rx) = mpsc::sync_channel::<Outcome>(16);
        let guides: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
        let workers = match backend {
            Backend::Local {
                source,
                device,
                precision,
                batch,
            } => local::spawn(
                local::LocalOptions {
                    source,
                    device,
                    precision,
                    batch,
                },
                opts.request.clone(),
                guides,
                dispatch.clone(),
                tx,
            )?,
            Backend::Remote(r) => {
                remote::spawn(r, opts.request.clone(), guides, dispatch.clone(), tx)?
            }
        };
        let mut manifest = open_append(&manifest_path)?;
        let mut filtered_file = None;
        let mut writer = Writer {
            out: &opts.out,
            sources: &sources,
            coco_ids: coco.is_some(),
            mask: None,
        };
        let mut skipped_now: HashSet<usize> = HashSet::new();
        let mut handled = 0usize;
        for outcome in rx {
            match outcome {
                Outcome::Done(g) => {
                    handled += 1;
                    bar.inc(1);
                    if let Some(s) = g.score {
                        if !refused(Some(s)) {
                            scores.push(s as f64);
                        }
                    }
                    if refused(g.score) {
                        report.filtered += 1;
                        let f = filtered_file.get_or_insert_with(|| open_append(&filtered_path));
                        let line = FilteredLine {
                            source: sources[g.task.source].rel.clone(),
                            output: g.task.output.clone(),
                            seed: g.task.seed,
                            components: g.task.components,
                            score: g.score,
                        };
                        append_line(f.as_mut().map_err(|e| e.clone())?, &filtered_path, &line)?;
                        continue;
                    }
                    match writer.write(&g) {
                        Ok(line) => {
                            append_line(&mut manifest, &manifest_path, &line)?;
                            report.written += 1;
                        }
                        Err(WriteError::Source(why)) => {
                            if skipped_now.insert(g.task.source) {
                                dispatch.bad_source(g.task.source);
                                report
                                    .skipped
                                    .push((sources[g.task.source].rel.clone(), why));
                            }
                        }
                        Err(WriteError::Fatal(e)) => {
                            dispatch.halt();
                            fatal = Some(e);
                        }
                    }
                }
                Outcome::BadSource { source, reason } => {
                    handled += 1;
                    bar.inc(1);
                    if skipped_now.insert(source) {
                        dispatch.bad_source(source);
                        report.skipped.push((sources[source].rel.clone(), reason));
                    }
                }
                Outcome::Failed { task, reason } => {
                    handled += 1;
                    bar.inc(1);
                    report.failed.push((task.output, reason));
                }
                Outcome::Fatal(e) => {
                    dispatch.halt();
                    fatal.get_or_insert(e);
                }
            }
        }
        for w in workers {
            let _ = w.join();
        }
        bar.finish_and_clear();
        let _ = (handled, n_pending);
        report.retried_busy = dispatch.retried_busy.load(Ordering::SeqCst);
        report.failed_over = dispatch.failed_over.load(Ordering::SeqCst);
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.mean_score = if scores.is_empty() {
        None
    } else {
        Some(scores.iter().sum::<f64>() / scores.len() as f64)
    };
    if let Some(e) = fatal {
        report.stopped = Some(e);
        return Ok(report);
    }

    // This shard is complete when nothing is missing but bad input.
    let shard_complete = report.failed.is_empty();
    if sharded {
        if shard_complete {
            write_atomic(
                &state.join(format!("done-{}.json", shard_tag(opts.shard))),
                serde_json::to_string(&report)
                    .unwrap_or_default()
                    .as_bytes(),
            )?;
        }
        report.complete = merge_shards(&opts.out, &state, opts.shard.1)?;
    } else {
        report.complete = shard_complete;
    }
    if let (Some(c), true) = (&coco, report.complete || !sharded) {
        report
            .coco_problems
            .extend(write_coco(&opts.out, c, &sources)?);
    }
    Ok(report)
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
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
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
        let text: String = done
            .values()
            .map(|l| serde_json::to_string(l).unwrap_or_default() + "\n")
            .collect();
        let current = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        if current.len() != text.len() {
            write_atomic(path, text.as_bytes())?;
        }
    }
    Ok(done)
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Append one JSON line in one write.
fn append_line(f: &mut std::fs::File, path: &Path, v: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))?;
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Whether a source's labels can be carried over: a mask that is there, is
/// a PNG and has the image's size; a COCO entry with the image's size.
fn check_source(
    s: &Source,
    coco: Option<&coco::Coco>,
    want_coco: bool,
) -> std::result::Result<(), String> {
    let (w, h) = image::ImageReader::open(&s.path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("invalid image: {e}"))?;
    if let Some(m) = &s.mask {
        if !m.is_file() {
            return Err(format!("no mask {}", m.display()));
        }
        let mask = mask::Mask::read(m).map_err(|e| e.to_string())?;
        if mask.dimensions() != (w, h) {
            let (mw, mh) = mask.dimensions();
            return Err(format!(
                "mask {} is {mw}x{mh} but the image is {w}x{h}",
                m.display()
            ));
        }
    }
    if want_coco {
        match (coco, s.coco) {
            (Some(c), Some(i)) => {
                let img = &c.images[i];
                if (img.width, img.height) != (w, h) {
                    return Err(format!(
                        "the COCO entry says {}x{} but the image is {w}x{h}",
                        img.width, img.height
                    ));
                }
            }
            _ => return Err("not in the COCO annotations".into()),
        }
    }
    Ok(())
}

enum WriteError {
    /// The source's labels cannot be used after all.
    Source(String),
    /// OUT cannot be written.
    Fatal(Error),
}

/// Writes an output's files, labels first, each under a temporary name.
struct Writer<'a> {
    out: &'a Path,
    sources: &'a [Source],
    coco_ids: bool,
    /// The last source's decoded mask: its outputs mostly arrive together.
    mask: Option<(usize, mask::Mask)>,
}

impl Writer<'_> {
    fn write(&mut self, g: &Generated) -> std::result::Result<ManifestLine, WriteError> {
        let src = &self.sources[g.task.source];
        let name = g
            .task
            .output
            .strip_prefix("images/")
            .unwrap_or(&g.task.output)
            .to_string();
        let label_stem = stem_of(&name);
        let fatal = WriteError::Fatal;
        let mut labels = Vec::new();
        if let Some(m) = &src.mask {
            if self.mask.as_ref().map(|(s, _)| *s) != Some(g.task.source) {
                let decoded = mask::Mask::read(m).map_err(|e| WriteError::Source(e.to_string()))?;
                self.mask = Some((g.task.source, decoded));
            }
            let Some((_, mask)) = &self.mask else {
                return Err(WriteError::Source("mask not read".into()));
            };
            let bytes = mask
                .resize_nearest(g.width, g.height)
                .to_png()
                .map_err(|e| WriteError::Source(e.to_string()))?;
            let rel = format!("masks/{label_stem}.png");
            self.put(&rel, &bytes).map_err(fatal)?;
            labels.push(rel);
        }
        if let Some(y) = &src.yolo {
            let bytes = std::fs::read(y)
                .map_err(|e| WriteError::Source(format!("{}: {e}", y.display())))?;
            let rel = format!("labels/{label_stem}.txt");
            self.put(&rel, &bytes).map_err(fatal)?;
            labels.push(rel);
        }
        if self.coco_ids {
            labels.push("annotations.json".into());
        }
        self.put(&g.task.output, &g.bytes).map_err(fatal)?;
        let p = &g.parameters;
        Ok(ManifestLine {
            source: src.rel.clone(),
            output: g.task.output.clone(),
            labels,
            seed: g.task.seed,
            components: g.task.components,
            variant: g.task.variant,
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps,
            scheduler: p.scheduler.clone(),
            guidance_scale: p.guidance_scale,
            control_scale: p.control_scale,
            layout_size: p.layout_size,
            width: g.width,
            height: g.height,
            model: p.model.clone(),
            score: g.score,
            coco_image_id: self.coco_ids.then_some(g.task.id + 1),
            server: g.server.clone(),
            timings: g.timings.clone(),
        })
    }

    fn put(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.out.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic(&path, bytes)
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

/// `annotations.json` for every output in `manifest.jsonl`.
fn write_coco(out: &Path, c: &coco::Coco, sources: &[Source]) -> Result<Vec<(String, String)>> {
    let lines: Vec<ManifestLine> = read_lines(&out.join("manifest.jsonl"))?;
    let by_rel: HashMap<&str, &Source> = sources.iter().map(|s| (s.rel.as_str(), s)).collect();
    let mut images = Vec::new();
    for l in &lines {
        let (Some(id), Some(src)) = (l.coco_image_id, by_rel.get(l.source.as_str())) else {
            continue;
        };
        let Some(source) = src.coco else { continue };
        images.push(coco::OutImage {
            id,
            file_name: l
                .output
                .strip_prefix("images/")
                .unwrap_or(&l.output)
                .to_string(),
            width: l.width,
            height: l.height,
            source,
        });
    }
    images.sort_by_key(|i| i.id);
    let (doc, problems) = c.output(&images);
    let text = serde_json::to_string(&doc).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic_shared(&out.join("annotations.json"), text.as_bytes())?;
    Ok(problems)
}

fn progress(len: u64, show: bool) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "augment [{bar:40}] {pos}/{len} images ({per_sec}, {elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// The end summary as text.
pub fn summary(r: &AugmentReport, min_score: Option<f32>) -> String {
    let mut s = format!(
        "augment: {} images written by this run, {} done before ({} planned from {} sources)\n",
        r.written, r.already_done, r.planned, r.sources
    );
    if r.filtered > 0 {
        s += &format!(
            "filtered: {} images scored below {}\n",
            r.filtered,
            min_score.unwrap_or(0.0)
        );
    }
    if let Some(m) = r.mean_score {
        s += &format!("mean score: {m:.4}\n");
    }
    s += &format!(
        "throughput: {:.3} images/s ({} images in {:.1} s)\n",
        r.images_per_second(),
        r.written,
        r.seconds
    );
    if r.retried_busy > 0 || r.failed_over > 0 {
        s += &format!(
            "servers: {} busy answers (429/503) waited out, {} requests moved after a connection failure\n",
            r.retried_busy, r.failed_over
        );
    }
    for (title, list) in [
        ("skipped (bad input)", &r.skipped),
        ("failed (a rerun retries them)", &r.failed),
        ("COCO entries left out", &r.coco_problems),
    ] {
        if !list.is_empty() {
            s += &format!("{title}: {}\n", list.len());
            for (what, why) in list {
                s += &format!("  {what}: {why}\n");
            }
        }
    }
    if let Some(e) = &r.stopped {
        s += &format!("stopped: {e}\n");
    }
    if !r.complete {
        s += "incomplete: rerun the same command to finish";
        s += if r.failed.is_empty() {
            " (or the other shards)\n"
        } else {
            "\n"
        };
    }
    s
}
