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
//! OUT/metadata.jsonl                        Hugging Face imagefolder rows: file_name, text,
//!                                           mask_file_name, objects {bbox, categories}, …
//! OUT/classes.json                          every mask value and class id, named from the input
//!                                           (names looked up as classes.rs says) or null
//! OUT/data.yaml                             the ultralytics dataset file: train, val, names (--yolo)
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
//! in the summary and skipped; nothing else is lost. The files that
//! describe the whole set (annotations.json, metadata.jsonl, classes.json,
//! data.yaml) are rewritten from manifest.jsonl at the end of each run
//! (sharded: once the set is complete).
//!
//! The images come from the local engine ([`local`]: one thread owns the
//! models) or from running `lumen serve` replicas ([`remote`]).

mod catalog;
mod classes;
pub mod coco;
mod collect;
mod dispatch;
mod local;
pub mod mask;
mod options;
mod plan;
mod remote;
mod report;
mod state;
mod writer;

use std::time::Instant;

use crate::error::Result;

pub use dispatch::{Dispatch, Generated, Outcome};
pub use options::{parse_shard, AugmentOptions, Backend, Prompts};
pub use plan::{variant_seed, Task};
pub use remote::RemoteOptions;
pub use report::{summary, AugmentReport};
pub use state::{ManifestLine, FORMAT};

/// Run the job. `Err` for what stops it before any image is made (bad
/// options or labels files, a model that does not load); what stops it
/// later (no server answering, OUT not writable) is in
/// [`AugmentReport::stopped`] with the counts so far; bad sources are listed
/// in the report.
pub fn run(opts: &AugmentOptions, backend: Backend) -> Result<AugmentReport> {
    let inputs = options::Inputs::open(opts, &backend)?;
    let mut report = AugmentReport::default();
    let sources = plan::sources(opts, &inputs, &mut report);
    let plan = plan::tasks(opts, &inputs, &sources);
    report.planned = plan.len();

    let state = state::State::open(opts, &inputs.components)?;
    let (mut pending, done) = state.pending(plan, opts.min_score, &mut report)?;
    plan::drop_bad_sources(
        &mut pending,
        &sources,
        inputs.coco.as_ref(),
        opts.coco.is_some(),
        &mut report,
    );

    let start = Instant::now();
    let mut scores: Vec<f64> = done
        .values()
        .filter_map(|l| l.score.map(f64::from))
        .collect();
    let fatal = collect::make_images(
        opts,
        backend,
        &sources,
        pending,
        &state,
        &mut report,
        &mut scores,
    )?;
    report.seconds = start.elapsed().as_secs_f64();
    report.set_mean_score(&scores);
    if let Some(e) = fatal {
        report.stopped = Some(e);
        return Ok(report);
    }

    // Interrupted: nothing is complete, but what was kept is described.
    report.complete = report.interrupted.is_none() && state.complete(&report)?;
    if report.complete || !state.sharded() {
        let problems = catalog::write(&catalog::Catalog {
            out: &opts.out,
            sources: &sources,
            coco: inputs.coco.as_ref(),
            coco_path: opts.coco.as_deref(),
            names: &inputs.names,
            masks: opts.masks.is_some(),
            yolo: opts.yolo.is_some(),
        })?;
        report.label_problems.extend(problems);
    }
    Ok(report)
}
