//! The request queue and the batcher.
//!
//! Handlers take a permit (`try_permit`: 429 at once when `--max-queue` jobs
//! are waiting or running), then push a [`Job`]. One batcher task waits until
//! the inference thread is idle, then groups the oldest job with the
//! compatible jobs behind it (same kind; for synthesis the same size, steps,
//! scheduler and guidance on/off) up to `--max-batch` images, waiting at most
//! `--max-wait-ms` for a batch to fill. Jobs whose client has gone or whose
//! deadline has passed are dropped before they run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::models::schedulers::SchedulerKind;
use crate::pipeline::layout::{Layout, PreparedGuide};
use crate::pipeline::request::SynthesisPlan;
use crate::server::engine::EngineHandle;
use crate::server::metrics;

/// Work for the inference thread.
pub enum Work {
    /// Encode a guide; the answer is its layout at Kmax.
    Layout(PreparedGuide),
    Synthesis(SynthesisWork),
}

/// Where a synthesis job's layout comes from.
pub enum LayoutInput {
    /// Already computed (from the cache), at Kmax.
    Ready(Arc<Layout>),
    /// To be encoded first (batched with the other guides of the batch).
    Guide(PreparedGuide),
}

/// A resolved synthesis and where its layout comes from.
pub struct SynthesisWork {
    pub plan: SynthesisPlan,
    pub layout: LayoutInput,
}

/// What the inference thread answers.
pub enum Output {
    Layout {
        layout: Arc<Layout>,
        timings: JobTimings,
    },
    Synthesis {
        images: Vec<image::RgbImage>,
        /// The layout at Kmax when the job brought a guide (for the cache).
        computed_layout: Option<Arc<Layout>>,
        /// Each image's fidelity score, when the plan asks for them (else empty).
        scores: Vec<f32>,
        timings: JobTimings,
    },
}

/// Per-job timings measured on the inference thread, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobTimings {
    pub queue: f64,
    pub layout: f64,
    pub denoise: f64,
    pub decode: f64,
    /// Fidelity scores of this job's images (0 unless asked).
    pub score: f64,
    pub batch_images: usize,
}

pub struct Job {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Output>>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// Released when the job is answered or dropped.
    pub permit: OwnedSemaphorePermit,
}

/// Jobs that may share one model call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKey {
    Layout,
    Synthesis {
        width: u32,
        height: u32,
        steps: usize,
        scheduler: SchedulerKind,
        cfg: bool,
    },
}

impl Job {
    pub fn key(&self) -> BatchKey {
        match &self.work {
            Work::Layout(_) => BatchKey::Layout,
            Work::Synthesis(s) => BatchKey::Synthesis {
                width: s.plan.settings.width,
                height: s.plan.settings.height,
                steps: s.plan.settings.steps,
                scheduler: s.plan.settings.scheduler,
                cfg: s.plan.cfg(),
            },
        }
    }

    /// Images (or guides) this job puts in a batch.
    pub fn size(&self) -> usize {
        match &self.work {
            Work::Layout(_) => 1,
            Work::Synthesis(s) => s.plan.num_images,
        }
    }

    /// Nobody waits for the answer any more.
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchOptions {
    pub max_batch: usize,
    pub max_wait: Duration,
}

pub struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    notify: Notify,
    permits: Arc<Semaphore>,
    capacity: usize,
    closed: AtomicBool,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            closed: AtomicBool::new(false),
        }
    }

    /// A place in the queue, or [`Error::Overloaded`] at once.
    pub fn try_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded {
                capacity: self.capacity,
            })
    }

    pub fn push(&self, job: Job) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let mut jobs = self.lock();
        jobs.push_back(job);
        metrics::gauge_queue_depth(jobs.len());
        drop(jobs);
        self.notify.notify_one();
        Ok(())
    }

    /// No more jobs: the batcher exits once the queue is empty.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding this lock cannot leave the deque inconsistent.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop jobs nobody waits for or whose deadline has passed.
    fn prune(jobs: &mut VecDeque<Job>, now: Instant) {
        jobs.retain(|j| {
            if j.abandoned() {
                metrics::dropped("disconnected");
                false
            } else if now >= j.deadline {
                metrics::dropped("deadline");
                false
            } else {
                true
            }
        });
    }

    /// The oldest job's key, its age, and whether a full batch is waiting.
    fn head(&self, opts: &BatchOptions) -> Option<(Instant, bool)> {
        let mut jobs = self.lock();
        Self::prune(&mut jobs, Instant::now());
        metrics::gauge_queue_depth(jobs.len());
        let head = jobs.front()?;
        let key = head.key();
        let images: usize = jobs.iter().filter(|j| j.key() == key).map(Job::size).sum();
        Some((head.enqueued, images >= opts.max_batch))
    }

    /// Take the oldest job and the compatible jobs behind it, up to
    /// `max_batch` images (the oldest job alone may be larger).
    fn take_batch(&self, opts: &BatchOptions) -> Vec<Job> {
        let mut jobs = self.lock();
        Self::prune(&mut jobs, Instant::now());
        let Some(key) = jobs.front().map(Job::key) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut images = 0;
        let mut rest = VecDeque::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            let fits = batch.is_empty() || images + job.size() <= opts.max_batch;
            if job.key() == key && fits {
                images += job.size();
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        *jobs = rest;
        metrics::gauge_queue_depth(jobs.len());
        batch
    }
}

/// The batcher: runs until the queue is closed and empty.
pub async fn run_batcher(queue: Arc<Queue>, engine: EngineHandle, opts: BatchOptions) {
    loop {
        // Wait for a job.
        let head_enqueued = loop {
            let notified = queue.notify.notified();
            if let Some((t, _)) = queue.head(&opts) {
                break t;
            }
            if queue.closed.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        };
        // Let the batch fill for at most max_wait after its oldest job arrived.
        let fill_until = head_enqueued + opts.max_wait;
        loop {
            let notified = queue.notify.notified();
            match queue.head(&opts) {
                None => break,
                Some((_, true)) => break,
                Some(_) if Instant::now() >= fill_until || queue.closed.load(Ordering::SeqCst) => {
                    break
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(fill_until.into()) => {}
            }
        }
        let batch = queue.take_batch(&opts);
        if batch.is_empty() {
            continue;
        }
        // Runs on the inference thread; jobs that arrive meanwhile wait for
        // the next batch, which forms as soon as the thread is idle again.
        if let Err(jobs) = engine.run(batch).await {
            for job in jobs {
                let _ = job.reply.send(Err(Error::Internal(
                    "the inference thread has stopped".into(),
                )));
            }
        }
    }
}
