//! The run's main loop: start the engine's workers on the pending tasks,
//! take their outcomes as they arrive, and record each one: refused by
//! `--min-score` (a line in the filtered record), written (its files, then
//! its manifest line), a bad source (its other tasks dropped) or a failure.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::dispatch::{Dispatch, Outcome};
use super::options::{AugmentOptions, Backend};
use super::plan::{Source, Task};
use super::report::{AugmentReport, Progress, Tally};
use super::state::{refused, Appender, FilteredLine, State};
use super::writer::{WriteError, Writer};
use super::{local, remote};
use crate::error::{Error, Result};

/// Make and record the `pending` outputs. `scores` gets the kept outputs'
/// scores. Returns what stopped the job early, if anything did; `Err` for
/// what stops it before any image is made, or a manifest that cannot be
/// written.
pub(super) fn make_images(
    opts: &AugmentOptions,
    backend: Backend,
    sources: &[Source],
    pending: Vec<Task>,
    state: &State,
    report: &mut AugmentReport,
    scores: &mut Vec<f64>,
) -> Result<Option<Error>> {
    if pending.is_empty() {
        return Ok(None);
    }
    let mut progress = Progress::new(pending.len(), opts.progress, opts.progress_every);
    let dispatch = Arc::new(Dispatch::new(pending));
    let (tx, rx) = mpsc::sync_channel::<Outcome>(16);
    let workers = spawn(opts, backend, sources, dispatch.clone(), tx)?;
    let mut manifest = Appender::open(&state.manifest)?;
    let mut filtered = Appender::lazy(&state.filtered);
    let mut writer = Writer::new(&opts.out, sources, opts.coco.is_some());
    let mut skipped_now: HashSet<usize> = HashSet::new();
    let mut skip = |source: usize, why: String, report: &mut AugmentReport| {
        if skipped_now.insert(source) {
            dispatch.bad_source(source);
            report.skipped.push((sources[source].rel.clone(), why));
        }
    };
    let mut fatal = None;
    loop {
        // Look for a signal at every turn: outcomes may arrive faster than
        // the timeout below, which would otherwise never fire.
        if let (Some(signal), None) = (opts.interrupt.raised(), report.interrupted) {
            report.interrupted = Some(signal);
            dispatch.halt();
        }
        // Wake up now and then to log progress and to see a signal.
        let outcome = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(o) => o,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                progress.tick();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match outcome {
            Outcome::Done(g) => {
                if refused(opts.min_score, g.score) {
                    progress.record(Tally::Filtered);
                    report.filtered += 1;
                    report.filtered_now += 1;
                    filtered.append(&FilteredLine {
                        source: sources[g.task.source].rel.clone(),
                        output: g.task.output.clone(),
                        seed: g.task.seed,
                        components: g.task.components,
                        score: g.score,
                    })?;
                    continue;
                }
                if let Some(s) = g.score {
                    scores.push(s as f64);
                }
                match writer.write(&g) {
                    Ok(line) => {
                        manifest.append(&line)?;
                        report.written += 1;
                        progress.record(Tally::Kept);
                    }
                    Err(WriteError::Source(why)) => {
                        progress.record(Tally::Skipped);
                        skip(g.task.source, why, report)
                    }
                    Err(WriteError::Fatal(e)) => {
                        dispatch.halt();
                        fatal = Some(e);
                    }
                }
            }
            Outcome::BadSource { source, reason } => {
                progress.record(Tally::Skipped);
                skip(source, reason, report);
            }
            Outcome::Failed { task, reason } => {
                progress.record(Tally::Failed);
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
    progress.finish(report.interrupted.map(|_| "augment interrupted"));
    report.retried_busy = dispatch.retried_busy.load(Ordering::SeqCst);
    report.failed_over = dispatch.failed_over.load(Ordering::SeqCst);
    Ok(fatal)
}

/// Start the engine's workers.
fn spawn(
    opts: &AugmentOptions,
    backend: Backend,
    sources: &[Source],
    dispatch: Arc<Dispatch>,
    tx: mpsc::SyncSender<Outcome>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let guides: Vec<PathBuf> = sources.iter().map(|s| s.path.clone()).collect();
    match backend {
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
            dispatch,
            tx,
        ),
        Backend::Remote(r) => remote::spawn(r, opts.request.clone(), guides, dispatch, tx),
    }
}
