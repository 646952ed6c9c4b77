//! The request queue: admission and the jobs waiting for the inference
//! thread. It knows nothing of the engine: the engine asks it for work with
//! [`Queue::next_batch`] (as text-embeddings-inference's `Queue` answers
//! `next_batch` to the batching task beside its backend).
//!
//! Handlers take a permit (`try_permit`: 429 at once when `--max-queue` jobs
//! are waiting or running), then push a [`Job`]. Jobs whose client has gone,
//! that were cancelled, or whose deadline has passed are dropped before they
//! run, and learn why.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};
use crate::models::schedulers::SchedulerKind;
use crate::pipeline::layout::{Layout, PreparedGuide};
use crate::pipeline::request::SynthesisPlan;
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
    /// To be encoded first (batched with the other guides admitted with it).
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
    /// From the first denoising step to the last (other requests' steps
    /// interleaved with this one's included).
    pub denoise: f64,
    pub decode: f64,
    /// Fidelity scores of this job's images (0 unless asked).
    pub score: f64,
    /// The most images one model call ran while this job was in it.
    pub batch_images: usize,
}

/// What a job's owner (an HTTP handler, the jobs store) hears from the
/// inference thread while the job runs, and how it cancels it. Every
/// method is called on the inference thread and must not block.
pub trait JobWatch: Send + Sync {
    /// Its place in the queue changed (0: next to run).
    fn queued(&self, _position: usize) {}
    /// It left the queue and started.
    fn started(&self) {}
    /// `step` of `steps` denoising steps are done; `eta_s`: the estimated
    /// seconds left.
    fn progress(&self, _step: usize, _steps: usize, _eta_s: f64) {}
    /// Whether someone wants a preview after `step` of `steps`.
    fn wants_preview(&self, _step: usize, _steps: usize) -> bool {
        false
    }
    /// A preview PNG of image 0 after `step` steps.
    fn preview(&self, _step: usize, _png: Vec<u8>) {}
    /// Cancelled by its owner (DELETE /jobs/{id}): when, if so.
    fn cancelled_at(&self) -> Option<Instant> {
        None
    }
}

/// A watcher that hears nothing and never cancels.
pub struct Unwatched;
impl JobWatch for Unwatched {}

pub struct Job {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Output>>,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub watch: Arc<dyn JobWatch>,
    /// Released when the job is answered or dropped.
    pub permit: OwnedSemaphorePermit,
}

/// Jobs that may share one model call under request-level scheduling.
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

/// Why a job stops before it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Nobody waits for the answer any more.
    Disconnected,
    /// Its owner cancelled it.
    Cancelled,
    /// Its deadline passed.
    Deadline,
}

impl Stop {
    pub fn reason(self) -> &'static str {
        match self {
            Stop::Disconnected => "disconnected",
            Stop::Cancelled => "cancelled",
            Stop::Deadline => "deadline",
        }
    }
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

    /// Whether (and why) the job should stop now.
    pub fn stop(&self, now: Instant) -> Option<Stop> {
        if self.watch.cancelled_at().is_some() {
            Some(Stop::Cancelled)
        } else if self.reply.is_closed() {
            Some(Stop::Disconnected)
        } else if now >= self.deadline {
            Some(Stop::Deadline)
        } else {
            None
        }
    }

    /// Answer a job that stops early with its reason, and count it.
    pub fn drop_for(self, why: Stop, timeout: Duration) {
        metrics::dropped(why.reason());
        let e = match why {
            Stop::Deadline => Error::DeadlineExceeded {
                seconds: timeout.as_secs(),
            },
            Stop::Cancelled | Stop::Disconnected => Error::Cancelled,
        };
        if let Some(at) = self.watch.cancelled_at() {
            metrics::cancel_freed(at.elapsed().as_secs_f64());
        }
        let _ = self.reply.send(Err(e));
    }
}

pub struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    arrived: Condvar,
    permits: Arc<Semaphore>,
    capacity: usize,
    /// How long a job may take from its arrival (for deadline errors).
    timeout: Duration,
    closed: AtomicBool,
    /// Draining ran out of time: the engine fails what is left.
    aborted: AtomicBool,
}

impl Queue {
    pub fn new(capacity: usize, timeout: Duration) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            timeout,
            closed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
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

    /// The request timeout jobs are held to.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn push(&self, job: Job) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let mut jobs = self.lock();
        job.watch.queued(jobs.len());
        jobs.push_back(job);
        metrics::gauge_queue_depth(jobs.len());
        drop(jobs);
        self.arrived.notify_all();
        Ok(())
    }

    /// No more jobs: the engine stops once the queue is empty and its work done.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.arrived.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Draining took too long: every queued and running job fails with
    /// [`Error::ShuttingDown`] at the engine's next step.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.close();
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding this lock cannot leave the deque inconsistent.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Block the calling (inference) thread until a job arrives, the queue
    /// closes, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let jobs = self.lock();
        if jobs.is_empty() && !self.is_closed() {
            let _ = self
                .arrived
                .wait_timeout(jobs, timeout)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Drop the jobs that should stop, answering each with its reason.
    fn prune(&self, jobs: &mut VecDeque<Job>, now: Instant) {
        let mut kept = VecDeque::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job.stop(now) {
                Some(why) => job.drop_for(why, self.timeout),
                None => kept.push_back(job),
            }
        }
        *jobs = kept;
    }

    /// The oldest job's key and arrival, and the images of its kind waiting.
    pub fn head(&self) -> Option<(BatchKey, Instant, usize)> {
        let mut jobs = self.lock();
        self.prune(&mut jobs, Instant::now());
        metrics::gauge_queue_depth(jobs.len());
        let head = jobs.front()?;
        let key = head.key();
        let images = jobs.iter().filter(|j| j.key() == key).map(Job::size).sum();
        Some((key, head.enqueued, images))
    }

    /// Take jobs in arrival order: every layout job when `layouts`, and the
    /// synthesis jobs that `fits` accepts given the images taken so far
    /// (`fits(job, images_taken)`). The others keep their places; each
    /// is told its new position.
    pub fn next_batch(&self, layouts: bool, mut fits: impl FnMut(&Job, usize) -> bool) -> Vec<Job> {
        let mut jobs = self.lock();
        self.prune(&mut jobs, Instant::now());
        let mut batch = Vec::new();
        let mut images = 0;
        let mut rest = VecDeque::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            let take = match job.work {
                Work::Layout(_) => layouts,
                Work::Synthesis(_) => fits(&job, images),
            };
            if take {
                if let Work::Synthesis(_) = job.work {
                    images += job.size();
                }
                batch.push(job);
            } else {
                job.watch.queued(rest.len());
                rest.push_back(job);
            }
        }
        *jobs = rest;
        metrics::gauge_queue_depth(jobs.len());
        batch
    }

    /// Answer every queued job with `e` (shutdown after the drain timeout).
    pub fn fail_all(&self, e: &Error) {
        let mut jobs = self.lock();
        for job in jobs.drain(..) {
            let _ = job.reply.send(Err(e.clone()));
        }
        metrics::gauge_queue_depth(0);
    }
}
