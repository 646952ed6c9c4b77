//! The plan: the sources with their labels ([`sources`]), and every output
//! of the whole job in one order that every shard, rerun and server agrees
//! on ([`tasks`]), each with its seed ([`variant_seed`]) and file name.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::coco::Coco;
use super::mask::Mask;
use super::options::{AugmentOptions, Inputs, Prompts};
use super::report::AugmentReport;

/// One source image and its labels.
#[derive(Clone, Debug)]
pub(super) struct Source {
    pub rel: String,
    pub path: PathBuf,
    pub caption: Option<String>,
    pub mask: Option<PathBuf>,
    pub yolo: Option<PathBuf>,
    /// Index into the COCO images.
    pub coco: Option<usize>,
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

/// `rel` (a `/`-separated path) without its extension, and its folder.
pub(super) fn stem_of(rel: &str) -> String {
    match rel.rfind('.') {
        Some(dot) if dot > rel.rfind('/').map_or(0, |s| s + 1) => rel[..dot].to_string(),
        _ => rel.to_string(),
    }
}

/// The input images with their label files and COCO entries. An image
/// whose outputs would take another's names is skipped; COCO entries that
/// match no image are listed.
pub(super) fn sources(
    opts: &AugmentOptions,
    inputs: &Inputs,
    report: &mut AugmentReport,
) -> Vec<Source> {
    let folder = &inputs.folder;
    let rels: Vec<String> = folder.images.iter().map(|e| e.rel.clone()).collect();
    let coco_match = match &inputs.coco {
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
    sources
}

/// This shard's part of the plan: every output of the whole job, in order
/// (source, K, variant), numbered across all shards.
pub(super) fn tasks(opts: &AugmentOptions, inputs: &Inputs, sources: &[Source]) -> Vec<Task> {
    let ext = inputs.extension();
    let mut plan = Vec::new();
    let mut id = 0u64;
    for (s, src) in sources.iter().enumerate() {
        let stem = stem_of(&src.rel);
        for &k in &inputs.components {
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
    plan
}

/// Drop the tasks of sources whose labels cannot be carried over, before
/// any image is made for them; they are listed as skipped.
pub(super) fn drop_bad_sources(
    pending: &mut Vec<Task>,
    sources: &[Source],
    coco: Option<&Coco>,
    want_coco: bool,
    report: &mut AugmentReport,
) {
    let mut bad: BTreeMap<usize, String> = BTreeMap::new();
    let needed: std::collections::BTreeSet<usize> = pending.iter().map(|t| t.source).collect();
    for &s in &needed {
        if let Err(why) = check_source(&sources[s], coco, want_coco) {
            bad.insert(s, why);
        }
    }
    pending.retain(|t| !bad.contains_key(&t.source));
    report.skipped.extend(
        bad.into_iter()
            .map(|(s, why)| (sources[s].rel.clone(), why)),
    );
}

/// Whether a source's labels can be carried over: a mask that is there, is
/// a PNG and has the image's size; a COCO entry with the image's size.
fn check_source(s: &Source, coco: Option<&Coco>, want_coco: bool) -> Result<(), String> {
    let (w, h) = image::ImageReader::open(&s.path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot read: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("invalid image: {e}"))?;
    if let Some(m) = &s.mask {
        if !m.is_file() {
            return Err(format!("no mask {}", m.display()));
        }
        let mask = Mask::read(m).map_err(|e| e.to_string())?;
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
