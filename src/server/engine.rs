//! The inference thread: one dedicated OS thread owns the device and every
//! model (encoder, PCA, text encoder, UNet, ControlNet, VAE). It loads them,
//! measures what each stage costs at warm-up (the [`CostModel`] admission
//! uses, and the preview map), reports ready, then takes work from the
//! [`Queue`] until it is closed and empty.
//!
//! Two schedulings (`--scheduling`):
//! - `step` (default): the thread keeps the running generations and
//!   advances them one denoising step at a time. Between steps it admits
//!   queued jobs (up to `--max-batch` images in flight), drops the cancelled,
//!   the abandoned and the late, and hands finished ones to decoding. One
//!   ControlNet + UNet call covers every running generation of one latent
//!   size (steps, schedulers, guidance and control scale may differ);
//!   different sizes take turns, step by step, so a short request never
//!   waits for a long one to end.
//! - `request`: when idle, it takes the oldest job and the queued jobs that
//!   share its size, steps, scheduler and guidance on/off (up to
//!   `--max-batch` images, waiting at most `--max-wait-ms` for them) and runs
//!   that batch to its end before taking more. Kept for comparison.
//!
//! Either way a job is checked before every step: cancel, disconnect or
//! deadline frees the engine within one step.
//!
//! An error that leaves the device unusable ([`Error::is_device_fatal`]:
//! an illegal address, a kernel fault) ends the thread: the jobs in flight
//! and in the queue are answered [`Error::DeviceFailed`], the queue is
//! aborted and the error goes to [`EngineOptions::failed`], on which the
//! server turns not ready and exits non-zero, so that the orchestrator
//! replaces this replica instead of it failing every request.

use std::cell::OnceCell;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::pipeline::cost::{CostModel, Rate, Work as CostWork};
use crate::pipeline::denoise::Denoising;
use crate::pipeline::generation::Generation;
use crate::pipeline::layout::{Layout, LayoutModel, PreparedGuide};
use crate::pipeline::preview::LatentRgb;
use crate::pipeline::spec::ModelSpecs;
use crate::pipeline::synthesis::{Precision, SynthesisItem, SynthesisModel, SynthesisSettings};
use crate::server::metrics;
use crate::server::queue::{BatchKey, Job, JobTimings, LayoutInput, Output, Queue, Work};

/// How the engine batches (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// One batch of compatible requests, run to its end.
    Request,
    /// Running generations advanced a step at a time; admission between steps.
    Step,
}

/// What the engine loads and how.
pub struct EngineOptions {
    pub source: ModelSource,
    pub device: Device,
    pub precision: Precision,
    /// Most images in flight (step) or in one batch (request). A larger
    /// request runs alone.
    pub max_batch: usize,
    pub scheduling: Scheduling,
    /// Request scheduling: how long the oldest job waits for a batch to fill.
    pub max_wait: Duration,
    /// Where a device failure is reported (see the module docs).
    pub failed: mpsc::UnboundedSender<Error>,
}

/// What the engine reports once loaded and measured.
#[derive(Clone, Debug)]
pub struct EngineReady {
    pub specs: ModelSpecs,
    pub costs: CostModel,
    /// Seconds one preview takes at the warm-up's size (mapping and PNG).
    pub preview_s: f64,
}

/// Start the inference thread over `queue`. The receiver gets the specs and
/// measured costs once the models are loaded and warmed up, or the error.
pub fn start(
    opts: EngineOptions,
    queue: Arc<Queue>,
) -> Result<(oneshot::Receiver<Result<EngineReady>>, JoinHandle<()>)> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("lumen-inference".into())
        .spawn(move || {
            let mut engine = match Engine::load(opts) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let ready = match engine.warm_up() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(ready));
            engine.serve(&queue);
            tracing::info!("inference thread stopped");
        })
        .map_err(|e| Error::Internal(format!("cannot start the inference thread: {e}")))?;
    Ok((ready_rx, thread))
}

/// A synthesis job being denoised.
struct Active {
    job: Job,
    gen: Generation,
    computed: Option<Arc<Layout>>,
    timings: JobTimings,
    /// When its first step ran.
    started: Option<Instant>,
}

impl Active {
    fn images(&self) -> usize {
        self.gen.denoising().len()
    }
}

struct Engine {
    layout: LayoutModel,
    synthesis: SynthesisModel,
    specs: ModelSpecs,
    preview: Option<LatentRgb>,
    max_batch: usize,
    scheduling: Scheduling,
    max_wait: Duration,
    active: Vec<Active>,
    /// The latent size whose turn was last (sizes take turns).
    last_size: Option<(usize, usize)>,
    /// The first error that left the device unusable.
    fatal: OnceCell<Error>,
    failed: mpsc::UnboundedSender<Error>,
}

/// What one pass of the loop found.
enum Tick {
    Busy,
    Idle,
    Exit,
}

impl Engine {
    fn load(opts: EngineOptions) -> Result<Self> {
        let t = Instant::now();
        let specs = ModelSpecs::read(&opts.source)?;
        let layout = LayoutModel::load_spec(&opts.source, specs.layout.clone(), &opts.device)?;
        let synthesis = SynthesisModel::load_spec(
            &opts.source,
            specs.synthesis.clone(),
            &opts.device,
            opts.precision,
        )?;
        tracing::info!(
            model = %specs.model,
            device = %crate::config::device_name(&opts.device),
            dtype = %crate::config::dtype_name(opts.precision.weights),
            vae_dtype = %crate::config::dtype_name(synthesis.vae_dtype()),
            seconds = t.elapsed().as_secs_f64(),
            "models loaded"
        );
        Ok(Self {
            layout,
            synthesis,
            specs,
            preview: None,
            max_batch: opts.max_batch.max(1),
            scheduling: opts.scheduling,
            max_wait: opts.max_wait,
            active: Vec::new(),
            last_size: None,
            fatal: OnceCell::new(),
            failed: opts.failed,
        })
    }

    /// Time each stage at a small and a larger size (fitting the cost
    /// model), fit the preview map on real decodes, and leave every model
    /// warm for the first request.
    fn warm_up(&mut self) -> Result<EngineReady> {
        let t = Instant::now();
        let work = CostWork::new(&self.specs);
        let ls = &self.specs.layout;
        let (small_l, large_l) = (
            (ls.patch_size * 2) as u32,
            ls.settings.layout_size.max(ls.patch_size as u32 * 4),
        );
        let encode = |size: u32| -> Result<f64> {
            let img = RgbImage::from_pixel(size, size, image::Rgb([128, 128, 128]));
            let g = ls.prepare(&img, Some(size))?;
            best_of(2, || {
                self.layout.layouts(&[(&g, ls.max_components)])?;
                Ok(())
            })
        };
        let encode_rate = Rate::fit(
            (work.encode(small_l), encode(small_l)?),
            (work.encode(large_l), encode(large_l)?),
        );

        let m = self.specs.synthesis.size_multiple;
        let default = m.max(self.specs.layout.settings.default_size.unwrap_or(512));
        let large = (2 * m).max(default.min(4 * m)).div_ceil(m) * m;
        let layout = {
            let img = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
            let g = ls.prepare(&img, None)?;
            self.layout
                .layouts(&[(&g, ls.max_components)])?
                .pop()
                .ok_or_else(|| Error::Internal("warm-up produced no layout".into()))?
        };
        let scheduler = self.specs.synthesis.default_scheduler();
        let denoising = |side: u32, n: usize, steps: usize| -> Result<Denoising> {
            let settings = SynthesisSettings {
                width: side,
                height: side,
                steps,
                scheduler,
            };
            let items: Vec<SynthesisItem> = (0..n)
                .map(|i| SynthesisItem {
                    layout: layout.clone(),
                    prompt: String::new(),
                    negative_prompt: String::new(),
                    guidance: 7.5,
                    control_scale: 1.0,
                    seed: i as u64,
                    latents: None,
                })
                .collect();
            Denoising::new(&self.synthesis, &settings, &items)
        };
        // Small: one image with guidance (2 rows), two steps.
        let mut small = denoising(m, 1, 2)?;
        let mut small_step = f64::INFINITY;
        while !small.is_done() {
            let t = Instant::now();
            self.synthesis.step(&mut [&mut small])?;
            small_step = small_step.min(t.elapsed().as_secs_f64());
        }
        let small_decode = best_of(2, || {
            self.synthesis.decode_one(&small, 0)?;
            Ok(())
        })?;
        // Large: two images (4 rows), three steps; their predicted clean
        // latents and decodes fit the preview map.
        let mut big = denoising(large, 2, 3)?;
        let (mut large_step, mut large_decode) = (f64::INFINITY, f64::INFINITY);
        let mut pairs = Vec::new();
        while !big.is_done() {
            let t = Instant::now();
            self.synthesis.step(&mut [&mut big])?;
            large_step = large_step.min(t.elapsed().as_secs_f64());
            for i in 0..big.len() {
                if let Some(x0) = big.predicted_original(i) {
                    let t = Instant::now();
                    let img = self.synthesis.decode(&x0)?;
                    large_decode = large_decode.min(t.elapsed().as_secs_f64());
                    pairs.push((x0, img));
                }
            }
        }
        let costs = CostModel {
            step: Rate::fit(
                (2.0 * work.step_row(m, m), small_step),
                (4.0 * work.step_row(large, large), large_step),
            ),
            decode: Rate::fit(
                (work.decode(m, m), small_decode),
                (work.decode(large, large), large_decode),
            ),
            encode: encode_rate,
        };
        let (preview, preview_s) = match LatentRgb::fit(&pairs) {
            Ok(map) => {
                let t = Instant::now();
                map.png(&pairs[0].0)?;
                (Some(map), t.elapsed().as_secs_f64())
            }
            Err(e) => {
                tracing::warn!(error = %e, "no previews: the latent-to-RGB map cannot be fitted");
                (None, 0.0)
            }
        };
        self.preview = preview;
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            step_small_s = small_step,
            step_large_s = large_step,
            decode_large_s = large_decode,
            preview_ms = preview_s * 1e3,
            sizes = %format!("{m} and {large}"),
            "warm-up done; stage costs measured"
        );
        Ok(EngineReady {
            specs: self.specs.clone(),
            costs,
            preview_s,
        })
    }

    /// Take work until the queue is closed and everything is done. A panic
    /// in one pass fails the jobs in flight (their answers are dropped: 500)
    /// and the thread goes on.
    fn serve(&mut self, queue: &Queue) {
        loop {
            if let Some(e) = self.fatal.get().cloned() {
                tracing::error!(
                    error = %e,
                    jobs = self.active.len(),
                    "the device failed: answering every job and stopping"
                );
                for a in self.active.drain(..) {
                    let _ = a.job.reply.send(Err(e.clone()));
                }
                queue.abort();
                queue.fail_all(&e);
                let _ = self.failed.send(e);
                self.gauges();
                return;
            }
            let tick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tick(queue)));
            match tick {
                Ok(Tick::Exit) => return,
                Ok(Tick::Busy) => {}
                Ok(Tick::Idle) => queue.wait(Duration::from_millis(100)),
                Err(_) => {
                    tracing::error!(
                        jobs = self.active.len(),
                        "the engine panicked; the jobs in flight were answered 500"
                    );
                    self.active.clear();
                }
            }
            self.gauges();
        }
    }

    /// Keep `e` as the engine's end if it leaves the device unusable; hand
    /// it back for the jobs it fails.
    fn observe(&self, e: Error) -> Error {
        observe(&self.fatal, e)
    }

    fn active_images(&self) -> usize {
        self.active.iter().map(Active::images).sum()
    }

    fn gauges(&self) {
        ::metrics::gauge!(metrics::IN_FLIGHT).set(self.active.len() as f64);
        ::metrics::gauge!(metrics::ACTIVE_IMAGES).set(self.active_images() as f64);
    }

    fn tick(&mut self, queue: &Queue) -> Tick {
        if queue.is_aborted() {
            let e = Error::ShuttingDown;
            for a in self.active.drain(..) {
                let _ = a.job.reply.send(Err(e.clone()));
            }
            queue.fail_all(&e);
            return Tick::Exit;
        }
        let taken = match self.take(queue) {
            Some(t) => t,
            None => return Tick::Busy,
        };
        if self.active.is_empty() && taken.is_empty() {
            return if queue.is_closed() && queue.is_empty() {
                Tick::Exit
            } else {
                Tick::Idle
            };
        }
        self.admit(taken);
        self.prune(queue);
        self.step_one_group();
        self.finish_done(queue);
        Tick::Busy
    }

    /// The jobs to admit now; `None`: wait a little for a request batch to fill.
    fn take(&mut self, queue: &Queue) -> Option<Vec<Job>> {
        let max = self.max_batch;
        match self.scheduling {
            Scheduling::Step => {
                let mut in_flight = self.active_images();
                let mut blocked = false;
                Some(queue.next_batch(true, |job, _| {
                    // Arrival order: a job that does not fit keeps the ones
                    // behind it waiting too (no starvation of big requests).
                    let fits = in_flight == 0 || in_flight + job.size() <= max;
                    if blocked || !fits {
                        blocked = true;
                        return false;
                    }
                    in_flight += job.size();
                    true
                }))
            }
            Scheduling::Request => {
                if !self.active.is_empty() {
                    return Some(Vec::new());
                }
                let Some((key, since, images)) = queue.head() else {
                    return Some(Vec::new());
                };
                let fill_until = since + self.max_wait;
                let now = Instant::now();
                if key != BatchKey::Layout && images < max && now < fill_until && !queue.is_closed()
                {
                    queue.wait(fill_until - now);
                    return None;
                }
                Some(queue.next_batch(key == BatchKey::Layout, |job, taken| {
                    job.key() == key && (taken == 0 || taken + job.size() <= max)
                }))
            }
        }
    }

    /// Answer layout jobs; encode the guides synthesis jobs bring (one
    /// encoder call for all) and start their generations.
    fn admit(&mut self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let now = Instant::now();
        let kmax = self.specs.layout.max_components;
        let (layouts, syntheses): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| matches!(j.work, Work::Layout(_)));
        if !layouts.is_empty() {
            self.run_layouts(layouts, now);
        }
        if syntheses.is_empty() {
            return;
        }
        for j in &syntheses {
            j.watch.started();
            metrics::stage("queue", now.duration_since(j.enqueued).as_secs_f64());
        }
        let guides: Vec<(&PreparedGuide, usize)> = syntheses
            .iter()
            .filter_map(|j| match &j.work {
                Work::Synthesis(s) => match &s.layout {
                    LayoutInput::Guide(g) => Some((g, kmax)),
                    LayoutInput::Ready(_) => None,
                },
                Work::Layout(_) => None,
            })
            .collect();
        let mut encoded = Vec::new().into_iter();
        let mut layout_s = 0.0;
        if !guides.is_empty() {
            let t = Instant::now();
            match self.layout.layouts(&guides) {
                Ok(l) => encoded = l.into_iter(),
                Err(e) => {
                    drop(guides);
                    return fail_all(syntheses, &self.observe(e));
                }
            }
            layout_s = t.elapsed().as_secs_f64();
            metrics::stage("layout", layout_s);
        }
        drop(guides);
        for job in syntheses {
            let Work::Synthesis(s) = &job.work else {
                continue;
            };
            let (full, computed, this_layout_s) = match &s.layout {
                LayoutInput::Ready(l) => (l.clone(), None, 0.0),
                LayoutInput::Guide(_) => match encoded.next() {
                    Some(l) => {
                        let l = Arc::new(l);
                        (l.clone(), Some(l), layout_s)
                    }
                    None => {
                        let e = Error::Internal("a guide was not encoded".into());
                        let _ = job.reply.send(Err(e));
                        continue;
                    }
                },
            };
            match Generation::start(&self.synthesis, s.plan.clone(), full, None) {
                Ok(gen) => self.active.push(Active {
                    timings: JobTimings {
                        queue: now.duration_since(job.enqueued).as_secs_f64(),
                        layout: this_layout_s,
                        ..Default::default()
                    },
                    job,
                    gen,
                    computed,
                    started: None,
                }),
                Err(e) => {
                    let _ = job.reply.send(Err(self.observe(e)));
                }
            }
        }
    }

    fn run_layouts(&self, jobs: Vec<Job>, start: Instant) {
        let kmax = self.specs.layout.max_components;
        let guides: Vec<(&PreparedGuide, usize)> = jobs
            .iter()
            .filter_map(|j| match &j.work {
                Work::Layout(g) => Some((g, kmax)),
                Work::Synthesis(_) => None,
            })
            .collect();
        let n = guides.len();
        ::metrics::histogram!(metrics::BATCH_SIZE, "kind" => "layout").record(n as f64);
        let t = Instant::now();
        let result = self.layout.layouts(&guides);
        drop(guides);
        let layout_s = t.elapsed().as_secs_f64();
        metrics::stage("layout", layout_s);
        match result {
            Ok(layouts) if layouts.len() == jobs.len() => {
                for (job, layout) in jobs.into_iter().zip(layouts) {
                    metrics::stage("queue", start.duration_since(job.enqueued).as_secs_f64());
                    let timings = JobTimings {
                        queue: start.duration_since(job.enqueued).as_secs_f64(),
                        layout: layout_s,
                        batch_images: n,
                        ..Default::default()
                    };
                    let _ = job.reply.send(Ok(Output::Layout {
                        layout: Arc::new(layout),
                        timings,
                    }));
                }
            }
            Ok(_) => fail_all(jobs, &Error::Internal("layout count mismatch".into())),
            Err(e) => fail_all(jobs, &self.observe(e)),
        }
    }

    /// Drop the running jobs that were cancelled, abandoned or are late.
    fn prune(&mut self, queue: &Queue) {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.active.len());
        for a in self.active.drain(..) {
            match a.job.stop(now) {
                Some(why) => a.job.drop_for(why, queue.timeout()),
                None => kept.push(a),
            }
        }
        self.active = kept;
    }

    /// One step of every running generation of one latent size, the sizes
    /// taking turns.
    fn step_one_group(&mut self) {
        let mut sizes: Vec<(usize, usize)> = Vec::new();
        for a in &self.active {
            let s = a.gen.denoising().latent_size();
            if !a.gen.is_done() && !sizes.contains(&s) {
                sizes.push(s);
            }
        }
        if sizes.is_empty() {
            return;
        }
        sizes.sort_unstable();
        let size = match self.last_size {
            Some(last) => sizes
                .iter()
                .copied()
                .find(|s| *s > last)
                .unwrap_or(sizes[0]),
            None => sizes[0],
        };
        self.last_size = Some(size);
        let picked: Vec<usize> = (0..self.active.len())
            .filter(|&i| {
                let a = &self.active[i];
                !a.gen.is_done() && a.gen.denoising().latent_size() == size
            })
            .collect();
        let images: usize = picked.iter().map(|&i| self.active[i].images()).sum();
        let t = Instant::now();
        let result = {
            let mut batch: Vec<&mut Denoising> = self
                .active
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| picked.contains(i))
                .map(|(_, a)| {
                    a.started.get_or_insert(t);
                    a.gen.denoising_mut()
                })
                .collect();
            self.synthesis.step(&mut batch)
        };
        let step_s = t.elapsed().as_secs_f64();
        metrics::stage("step", step_s);
        ::metrics::histogram!(metrics::STEP_IMAGES).record(images as f64);
        ::metrics::histogram!(metrics::BATCH_IMAGES).record(images as f64);
        ::metrics::histogram!(metrics::BATCH_SIZE, "kind" => "synthesis")
            .record(picked.len() as f64);
        if let Err(e) = result {
            let e = self.observe(e);
            tracing::error!(error = %e, jobs = picked.len(), "a denoising step failed");
            let mut i = self.active.len();
            while i > 0 {
                i -= 1;
                if picked.contains(&i) {
                    let a = self.active.swap_remove(i);
                    let _ = a.job.reply.send(Err(e.clone()));
                }
            }
            return;
        }
        for &i in &picked {
            let a = &mut self.active[i];
            a.timings.batch_images = a.timings.batch_images.max(images);
            let d = a.gen.denoising();
            let (step, steps) = (d.step_index(), d.steps());
            let elapsed = a.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let eta = elapsed / step.max(1) as f64 * (steps - step) as f64;
            a.job.watch.progress(step, steps, eta);
            if a.job.watch.wants_preview(step, steps) {
                if let (Some(map), Some(x0)) = (&self.preview, d.predicted_original(0)) {
                    let t = Instant::now();
                    match map.png(&x0) {
                        Ok(png) => a.job.watch.preview(step, png),
                        Err(e) => {
                            tracing::warn!(error = %observe(&self.fatal, e), "preview failed")
                        }
                    }
                    metrics::stage("preview", t.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Decode, score and answer the generations whose last step has run.
    fn finish_done(&mut self, queue: &Queue) {
        let mut i = 0;
        while i < self.active.len() {
            if !self.active[i].gen.is_done() {
                i += 1;
                continue;
            }
            let a = self.active.swap_remove(i);
            self.finish(a, queue);
        }
    }

    fn finish(&self, a: Active, queue: &Queue) {
        let Active {
            job,
            gen,
            computed,
            mut timings,
            started,
        } = a;
        timings.denoise = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        metrics::stage("denoise", timings.denoise);
        let mut images = Vec::with_capacity(gen.denoising().len());
        let t = Instant::now();
        for n in 0..gen.denoising().len() {
            // A decode is one bounded unit: stop between them.
            if let Some(why) = job.stop(Instant::now()) {
                return job.drop_for(why, queue.timeout());
            }
            match gen.decode(&self.synthesis, n) {
                Ok(img) => images.push(img),
                Err(e) => {
                    let _ = job.reply.send(Err(self.observe(e)));
                    return;
                }
            }
        }
        timings.decode = t.elapsed().as_secs_f64();
        metrics::stage("decode", timings.decode);
        let t = Instant::now();
        let scores = match gen.score(Some(&self.layout), &images) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.reply.send(Err(self.observe(e)));
                return;
            }
        };
        if gen.plan().score {
            timings.score = t.elapsed().as_secs_f64();
            metrics::stage("score", timings.score);
        }
        let _ = job.reply.send(Ok(Output::Synthesis {
            images,
            computed_layout: computed,
            scores,
            timings,
        }));
    }
}

/// Keep `e` in `fatal` if it leaves the device unusable (the first such
/// error wins); hand it back for the jobs it fails.
fn observe(fatal: &OnceCell<Error>, e: Error) -> Error {
    if e.is_device_fatal() && fatal.get().is_none() {
        let _ = fatal.set(Error::DeviceFailed(e.to_string()));
    }
    e
}

/// The fastest of `n` runs of `f`, in seconds (the first pays for first use).
fn best_of(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..n.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Answer every job with (a copy of) the same error.
fn fail_all(jobs: Vec<Job>, e: &Error) {
    tracing::error!(error = %e, jobs = jobs.len(), "batch failed");
    for job in jobs {
        let _ = job.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::queue::Unwatched;

    #[test]
    fn every_job_of_a_failed_batch_learns_the_real_cause() {
        let queue = Queue::new(4, Duration::from_secs(1));
        let mut replies = Vec::new();
        let jobs: Vec<Job> = (0..3)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                replies.push(rx);
                let guide = crate::guide::prepare_pixels(14, &RgbImage::new(28, 28), 28).unwrap();
                Job {
                    work: Work::Layout(guide),
                    reply: tx,
                    enqueued: Instant::now(),
                    deadline: Instant::now(),
                    watch: Arc::new(Unwatched),
                    permit: queue.try_permit().unwrap(),
                }
            })
            .collect();
        let cause = Error::io("/models/unet/x.safetensors", std::io::Error::other("EIO"));
        fail_all(jobs, &cause);
        for mut rx in replies {
            match rx.try_recv() {
                Ok(Err(e @ Error::Io { .. })) => assert_eq!(e.to_string(), cause.to_string()),
                other => panic!("expected the I/O error, got {:?}", other.map(|r| r.err())),
            }
        }
    }

    /// After an error that poisons the device, the thread answers the job
    /// in the queue with it, refuses more, reports it and stops.
    #[test]
    fn a_device_failure_fails_the_queue_reports_and_stops() {
        let (failed, mut reports) = mpsc::unbounded_channel();
        let mut engine = Engine::load(EngineOptions {
            source: ModelSource::Dir(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny"),
            ),
            device: Device::Cpu,
            precision: Precision::uniform(candle_core::DType::F32),
            max_batch: 2,
            scheduling: Scheduling::Step,
            max_wait: Duration::ZERO,
            failed,
        })
        .unwrap();
        let queue = Queue::new(4, Duration::from_secs(10));
        let (tx, mut reply) = oneshot::channel();
        let guide = crate::guide::prepare_pixels(14, &RgbImage::new(28, 28), 28).unwrap();
        queue
            .push(Job {
                work: Work::Layout(guide),
                reply: tx,
                enqueued: Instant::now(),
                deadline: Instant::now() + Duration::from_secs(10),
                watch: Arc::new(Unwatched),
                permit: queue.try_permit().unwrap(),
            })
            .unwrap();
        // What candle reports for cudarc's sticky illegal-address error.
        let driver = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"
                .into(),
        );
        let seen = engine.observe(driver.into());
        assert!(
            matches!(seen, Error::Tensor(_)),
            "the job that hit it keeps the cause"
        );
        engine.serve(&queue);
        match reply.try_recv() {
            Ok(Err(Error::DeviceFailed(m))) => {
                assert!(m.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{m}")
            }
            other => panic!("expected DeviceFailed, got {:?}", other.map(|r| r.err())),
        }
        assert!(matches!(reports.try_recv(), Ok(Error::DeviceFailed(_))));
        assert!(queue.is_aborted() && queue.is_closed());
    }
}
