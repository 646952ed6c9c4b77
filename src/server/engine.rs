//! The inference thread: one dedicated OS thread owns the device and every
//! model (encoder, PCA, text encoder, UNet, ControlNet, VAE). It loads them,
//! runs one warm-up, reports the models' specs, then runs the batches the
//! batcher sends, answering each job through its oneshot channel.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Device;
use image::RgbImage;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::pipeline::layout::{Layout, LayoutModel, PreparedGuide};
use crate::pipeline::spec::ModelSpecs;
use crate::pipeline::synthesis::{Precision, SynthesisItem, SynthesisModel, SynthesisSettings};
use crate::server::metrics;
use crate::server::queue::{BatchKey, Job, JobTimings, LayoutInput, Output, Work};

/// What the engine loads and how.
pub struct EngineOptions {
    pub source: ModelSource,
    pub device: Device,
    pub precision: Precision,
    /// Most images one model call runs (a larger request is split).
    pub max_batch: usize,
}

type BatchMessage = (Vec<Job>, oneshot::Sender<()>);

/// The batcher's end of the channel to the inference thread.
pub struct EngineHandle {
    tx: mpsc::Sender<BatchMessage>,
}

impl EngineHandle {
    /// Run a batch and wait until the thread is done with it. Gives the jobs
    /// back if the thread has stopped.
    pub async fn run(&self, batch: Vec<Job>) -> std::result::Result<(), Vec<Job>> {
        let (done_tx, done_rx) = oneshot::channel();
        self.tx.send((batch, done_tx)).map_err(|e| e.0 .0)?;
        // An Err here means the thread panicked mid-batch; the jobs' reply
        // senders were dropped with it, so their handlers already answer 500.
        let _ = done_rx.await;
        Ok(())
    }
}

/// Start the inference thread. The receiver gets the specs once the models
/// are loaded and warmed up, or the loading error.
pub fn start(
    opts: EngineOptions,
) -> Result<(
    EngineHandle,
    oneshot::Receiver<Result<ModelSpecs>>,
    JoinHandle<()>,
)> {
    let (tx, rx) = mpsc::channel::<BatchMessage>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("lumen-inference".into())
        .spawn(move || {
            let engine = match Engine::load(opts) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(engine.specs.clone()));
            while let Ok((jobs, done)) = rx.recv() {
                // A bug must not take the models down with it: the batch's
                // reply channels are dropped (its requests answer 500) and
                // the thread goes on with the next batch.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.run_batch(jobs)
                }));
                if run.is_err() {
                    tracing::error!("a batch panicked; its requests were answered 500");
                    ::metrics::gauge!(metrics::IN_FLIGHT).set(0.0);
                }
                let _ = done.send(());
            }
            tracing::info!("inference thread stopped");
        })
        .map_err(|e| Error::Internal(format!("cannot start the inference thread: {e}")))?;
    Ok((EngineHandle { tx }, ready_rx, thread))
}

struct Engine {
    layout: LayoutModel,
    synthesis: SynthesisModel,
    specs: ModelSpecs,
    max_batch: usize,
}

impl Engine {
    fn load(opts: EngineOptions) -> Result<Self> {
        let t = Instant::now();
        let layout = LayoutModel::load(&opts.source, &opts.device)?;
        let synthesis = SynthesisModel::load_with(&opts.source, &opts.device, opts.precision)?;
        let specs = ModelSpecs {
            model: opts.source.identity(),
            layout: layout.spec().clone(),
            synthesis: synthesis.spec().clone(),
        };
        tracing::info!(
            model = %specs.model,
            device = %crate::config::device_name(&opts.device),
            dtype = %crate::config::dtype_name(opts.precision.weights),
            vae_dtype = %crate::config::dtype_name(opts.precision.vae),
            seconds = t.elapsed().as_secs_f64(),
            "models loaded"
        );
        let engine = Self {
            layout,
            synthesis,
            specs,
            max_batch: opts.max_batch.max(1),
        };
        engine.warm_up()?;
        Ok(engine)
    }

    /// One layout and one single-step synthesis at the smallest size, so the
    /// first request does not pay for first-use allocations.
    fn warm_up(&self) -> Result<()> {
        let t = Instant::now();
        let spec = &self.specs.layout;
        let img = RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
        let guide = spec.prepare(&img, None)?;
        let layout = self
            .layout
            .layouts(&[(&guide, spec.default_components)])?
            .pop()
            .ok_or_else(|| Error::Internal("warm-up produced no layout".into()))?;
        let m = self.specs.synthesis.size_multiple;
        // The smallest valid size, one step: the cheapest run of every model.
        let settings = SynthesisSettings {
            width: m,
            height: m,
            steps: 1,
            scheduler: self.specs.synthesis.default_scheduler(),
        };
        let item = SynthesisItem {
            layout,
            prompt: String::new(),
            negative_prompt: String::new(),
            guidance: 7.5,
            control_scale: 1.0,
            seed: 0,
            latents: None,
        };
        self.synthesis.generate(&settings, &[item], |_, _| {})?;
        tracing::info!(seconds = t.elapsed().as_secs_f64(), "warm-up done");
        Ok(())
    }

    fn run_batch(&self, jobs: Vec<Job>) {
        let Some(key) = jobs.first().map(Job::key) else {
            return;
        };
        let start = Instant::now();
        let kind = match key {
            BatchKey::Layout => "layout",
            BatchKey::Synthesis { .. } => "synthesis",
        };
        ::metrics::gauge!(metrics::IN_FLIGHT).set(jobs.len() as f64);
        ::metrics::histogram!(metrics::BATCH_SIZE, "kind" => kind).record(jobs.len() as f64);
        for j in &jobs {
            metrics::stage("queue", start.duration_since(j.enqueued).as_secs_f64());
        }
        tracing::debug!(kind, jobs = jobs.len(), "running batch");
        match key {
            BatchKey::Layout => self.run_layouts(jobs, start),
            BatchKey::Synthesis { .. } => self.run_synthesis(jobs, start),
        }
        ::metrics::gauge!(metrics::IN_FLIGHT).set(0.0);
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
        let t = Instant::now();
        let result = self.layout.layouts(&guides);
        drop(guides);
        let layout_s = t.elapsed().as_secs_f64();
        metrics::stage("layout", layout_s);
        match result {
            Ok(layouts) if layouts.len() == jobs.len() => {
                for (job, layout) in jobs.into_iter().zip(layouts) {
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
            Err(e) => fail_all(jobs, &e),
        }
    }

    fn run_synthesis(&self, jobs: Vec<Job>, start: Instant) {
        let kmax = self.specs.layout.max_components;
        // 1. Encode the guides the batch brought, together.
        let guides: Vec<(usize, &PreparedGuide)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match &j.work {
                Work::Synthesis(s) => match &s.layout {
                    LayoutInput::Guide(g) => Some((i, g)),
                    LayoutInput::Ready(_) => None,
                },
                Work::Layout(_) => None,
            })
            .collect();
        let mut computed: Vec<Option<Arc<Layout>>> = vec![None; jobs.len()];
        let mut layout_s = 0.0;
        if !guides.is_empty() {
            let t = Instant::now();
            let refs: Vec<(&PreparedGuide, usize)> =
                guides.iter().map(|(_, g)| (*g, kmax)).collect();
            match self.layout.layouts(&refs) {
                Ok(layouts) => {
                    for ((i, _), l) in guides.iter().zip(layouts) {
                        computed[*i] = Some(Arc::new(l));
                    }
                }
                Err(e) => return fail_all(jobs, &e),
            }
            layout_s = t.elapsed().as_secs_f64();
            metrics::stage("layout", layout_s);
        }

        // 2. One item per image, remembering whose it is.
        let mut settings: Option<SynthesisSettings> = None;
        let mut items: Vec<(usize, SynthesisItem)> = Vec::new();
        let mut errors: Vec<Option<Error>> = (0..jobs.len()).map(|_| None).collect();
        // Each job's guide layout (Kmax), kept where the job asks for scores.
        let mut score_layouts: Vec<Option<Layout>> = (0..jobs.len()).map(|_| None).collect();
        for (i, job) in jobs.iter().enumerate() {
            let Work::Synthesis(s) = &job.work else {
                continue;
            };
            settings.get_or_insert_with(|| s.plan.settings.clone());
            let full = match (&s.layout, &computed[i]) {
                (LayoutInput::Ready(l), _) => l.clone(),
                (LayoutInput::Guide(_), Some(l)) => l.clone(),
                (LayoutInput::Guide(_), None) => {
                    errors[i] = Some(Error::Internal("the guide was not encoded".into()));
                    continue;
                }
            };
            match full.truncate(s.plan.components) {
                Ok(layout) => {
                    items.extend(s.plan.items(&layout).into_iter().map(|it| (i, it)));
                    if s.plan.score {
                        // Scored against the guide's whole (Kmax) layout.
                        score_layouts[i] = Some((*full).clone());
                    }
                }
                Err(e) => errors[i] = Some(e),
            }
        }
        let Some(settings) = settings else {
            return;
        };
        ::metrics::histogram!(metrics::BATCH_IMAGES).record(items.len() as f64);

        // 3. Denoise and decode in chunks of at most max_batch images.
        let mut images: Vec<Vec<RgbImage>> = (0..jobs.len()).map(|_| Vec::new()).collect();
        let mut timings: Vec<JobTimings> = jobs
            .iter()
            .map(|j| JobTimings {
                queue: start.duration_since(j.enqueued).as_secs_f64(),
                layout: if guides.is_empty() { 0.0 } else { layout_s },
                batch_images: items.len().min(self.max_batch),
                ..Default::default()
            })
            .collect();
        for chunk in items.chunks(self.max_batch) {
            let owners: Vec<usize> = chunk.iter().map(|(o, _)| *o).collect();
            if owners
                .iter()
                .all(|&o| errors[o].is_some() || jobs[o].abandoned())
            {
                continue;
            }
            let batch: Vec<SynthesisItem> = chunk.iter().map(|(_, it)| it.clone()).collect();
            let t = Instant::now();
            let mut cancelled = |_: usize, _: &candle_core::Tensor| -> Result<()> {
                if owners.iter().all(|&o| jobs[o].abandoned()) {
                    Err(Error::Cancelled)
                } else {
                    Ok(())
                }
            };
            let latents =
                self.synthesis
                    .denoise_with(&settings, &batch, &mut |_, _| {}, &mut cancelled);
            let denoise_s = t.elapsed().as_secs_f64();
            metrics::stage("denoise", denoise_s);
            let latents = match latents {
                Ok(l) => l,
                Err(e) => {
                    if matches!(e, Error::Cancelled) {
                        metrics::dropped("disconnected");
                    }
                    for &o in &owners {
                        errors[o].get_or_insert_with(|| e.clone());
                    }
                    continue;
                }
            };
            let mut seen = Vec::new();
            for (n, &o) in owners.iter().enumerate() {
                if !seen.contains(&o) {
                    timings[o].denoise += denoise_s;
                    seen.push(o);
                }
                if errors[o].is_some() || jobs[o].abandoned() {
                    continue;
                }
                let t = Instant::now();
                let img = latents
                    .narrow(0, n, 1)
                    .map_err(Error::from)
                    .and_then(|l| self.synthesis.decode(&l));
                let decode_s = t.elapsed().as_secs_f64();
                metrics::stage("decode", decode_s);
                timings[o].decode += decode_s;
                match img {
                    Ok(img) => images[o].push(img),
                    Err(e) => errors[o] = Some(e),
                }
            }
        }

        // 4. Score the images of the jobs that ask, then answer.
        let mut scores: Vec<Vec<f32>> = (0..jobs.len()).map(|_| Vec::new()).collect();
        for (i, layout) in score_layouts.iter().enumerate() {
            let Some(layout) = layout else { continue };
            if errors[i].is_some() || jobs[i].abandoned() {
                continue;
            }
            let t = Instant::now();
            match crate::pipeline::score::fidelity(&self.layout, layout, &images[i]) {
                Ok(s) => scores[i] = s,
                Err(e) => errors[i] = Some(e),
            }
            let score_s = t.elapsed().as_secs_f64();
            metrics::stage("score", score_s);
            timings[i].score = score_s;
        }
        for (i, job) in jobs.into_iter().enumerate() {
            let answer = match errors[i].take() {
                Some(e) => Err(e),
                None => Ok(Output::Synthesis {
                    images: std::mem::take(&mut images[i]),
                    computed_layout: computed[i].take(),
                    scores: std::mem::take(&mut scores[i]),
                    timings: timings[i],
                }),
            };
            let _ = job.reply.send(answer);
        }
    }
}

/// Answer every job of a batch with (a copy of) the same error.
fn fail_all(jobs: Vec<Job>, e: &Error) {
    tracing::error!(error = %e, jobs = jobs.len(), "batch failed");
    for job in jobs {
        let _ = job.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::queue::Queue;
    use image::RgbImage;

    #[test]
    fn every_job_of_a_failed_batch_learns_the_real_cause() {
        let queue = Queue::new(4);
        let mut replies = Vec::new();
        let jobs: Vec<Job> = (0..3)
            .map(|_| {
                let (tx, rx) = oneshot::channel();
                replies.push(rx);
                let guide = crate::pipeline::spec::LayoutSpec {
                    patch_size: 14,
                    max_components: 4,
                    default_components: 4,
                    settings: Default::default(),
                }
                .prepare(&RgbImage::new(28, 28), Some(28))
                .unwrap();
                Job {
                    work: Work::Layout(guide),
                    reply: tx,
                    enqueued: Instant::now(),
                    deadline: Instant::now(),
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
}
