//! What a run did ([`AugmentReport`]), shown while it runs (a progress bar)
//! and at the end ([`summary`]).

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

    /// The mean of the kept outputs' scores (earlier runs' and this one's).
    pub(super) fn set_mean_score(&mut self, scores: &[f64]) {
        self.mean_score = if scores.is_empty() {
            None
        } else {
            Some(scores.iter().sum::<f64>() / scores.len() as f64)
        };
    }
}

pub(super) fn progress(len: u64, show: bool) -> indicatif::ProgressBar {
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
