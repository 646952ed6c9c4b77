//! What a run did ([`AugmentReport`]), shown while it runs ([`Progress`]: a
//! bar on a terminal, else a log line every so often) and at the end
//! ([`summary`]).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Error;

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
    /// Of them, the outputs this run generated and refused.
    pub filtered_now: usize,
    /// Outputs of earlier runs that a higher `--min-score` now refuses
    /// (their files removed, their scores kept in the filtered record).
    pub refiltered: usize,
    /// Sources skipped as bad input: (path, why).
    pub skipped: Vec<(String, String)>,
    /// Outputs that could not be made (a rerun retries them): (output, why).
    pub failed: Vec<(String, String)>,
    /// COCO entries and annotations that were left out: (what, why).
    pub coco_problems: Vec<(String, String)>,
    /// Labels left out of `annotations.json` or `metadata.jsonl` when they
    /// were written: (what, why).
    pub label_problems: Vec<(String, String)>,
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
    /// The signal that stopped the run early (what was in flight was
    /// recorded first).
    pub interrupted: Option<i32>,
}

impl AugmentReport {
    /// Images this run generated: kept (written) and refused by `--min-score`.
    pub fn generated(&self) -> usize {
        self.written + self.filtered_now
    }

    /// Generated images per second.
    pub fn images_per_second(&self) -> f64 {
        per_second(self.generated(), self.seconds)
    }

    /// Kept images per second.
    pub fn kept_per_second(&self) -> f64 {
        per_second(self.written, self.seconds)
    }

    /// The mean of the kept outputs' scores (earlier runs' and this one's).
    pub(super) fn set_mean_score(&mut self, scores: &[f64]) {
        self.mean_score = if scores.is_empty() {
            None
        } else {
            Some(scores.iter().sum::<f64>() / scores.len() as f64)
        };
    }
}

fn per_second(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// What happened to one planned output, for [`Progress`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Tally {
    Kept,
    Filtered,
    Failed,
    Skipped,
}

/// Progress while a run makes images: a bar when stderr is a terminal,
/// otherwise (a container's or a Kubernetes Job's log) an `info` log line
/// every `every`, and one at the end.
pub(super) struct Progress {
    bar: indicatif::ProgressBar,
    every: Option<Duration>,
    start: Instant,
    last: Instant,
    total: usize,
    counts: [usize; 4],
}

impl Progress {
    /// `show`: false hides both (`--quiet`).
    pub fn new(total: usize, show: bool, every: Duration) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = if show && terminal {
            indicatif::ProgressBar::new(total as u64)
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
        let now = Instant::now();
        Progress {
            bar,
            every: (show && !terminal).then_some(every),
            start: now,
            last: now,
            total,
            counts: [0; 4],
        }
    }

    pub fn record(&mut self, t: Tally) {
        self.bar.inc(1);
        self.counts[t as usize] += 1;
        self.tick();
    }

    /// Log a line if one is due.
    pub fn tick(&mut self) {
        if let Some(every) = self.every {
            if self.last.elapsed() >= every {
                self.last = Instant::now();
                self.log("augment progress");
            }
        }
    }

    fn log(&self, message: &str) {
        let [kept, filtered, failed, skipped] = self.counts;
        let done = kept + filtered + failed + skipped;
        let seconds = self.start.elapsed().as_secs_f64();
        let generated = kept + filtered;
        let rate = per_second(generated, seconds);
        let eta_s = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / per_second(done, seconds)
        } else {
            f64::NAN
        };
        tracing::info!(
            done,
            total = self.total,
            kept,
            filtered,
            failed,
            skipped,
            generated_per_s = (rate * 1000.0).round() / 1000.0,
            elapsed_s = seconds.round(),
            eta_s = eta_s.round(),
            "{message}: {done}/{} outputs ({kept} kept, {filtered} filtered, {failed} failed, \
             {skipped} of bad sources), {rate:.3} generated/s",
            self.total
        );
    }

    /// Clear the bar; log the last line.
    pub fn finish(self, stopping: Option<&str>) {
        self.bar.finish_and_clear();
        if self.every.is_some() {
            self.log(stopping.unwrap_or("augment finished"));
        }
    }
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
        "throughput: {:.3} images/s generated, {:.3} kept ({} generated in {:.1} s: {} kept, {} filtered)\n",
        r.images_per_second(),
        r.kept_per_second(),
        r.generated(),
        r.seconds,
        r.written,
        r.filtered_now
    );
    if r.refiltered > 0 {
        s += &format!(
            "re-filtered: {} images of earlier runs scored below {} and were removed \
             (their scores stay recorded; a lower --min-score makes them again)\n",
            r.refiltered,
            min_score.unwrap_or(0.0)
        );
    }
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
        (
            "labels left out of annotations.json or metadata.jsonl",
            &r.label_problems,
        ),
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
    if let Some(signal) = r.interrupted {
        s += &format!(
            "interrupted by {}: what was in flight was recorded; rerun the same command to continue\n",
            crate::jobs::interrupt::signal_name(signal)
        );
    }
    if !r.complete && r.interrupted.is_none() {
        s += "incomplete: rerun the same command to finish";
        s += if r.failed.is_empty() {
            " (or the other shards)\n"
        } else {
            "\n"
        };
    }
    s
}
