//! Timing helpers for `lumen bench`: warm-up, repeated runs, median, and the
//! process' peak resident set size. Comparisons against the reference
//! implementations are made by `scripts/bench_*.py`, which run both sides on
//! the same machine, with the same weights, in one go.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::pipeline::layout::LayoutModel;

/// Timings of one benchmarked stage, in milliseconds.
#[derive(Debug, Serialize)]
pub struct StageTiming {
    pub stage: String,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
}

impl StageTiming {
    pub fn from_runs(stage: impl Into<String>, runs_ms: Vec<f64>) -> Self {
        let mut sorted = runs_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1);
        let median = if sorted.is_empty() {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
        };
        Self {
            stage: stage.into(),
            median_ms: median,
            min_ms: sorted.first().copied().unwrap_or(f64::NAN),
            mean_ms: runs_ms.iter().sum::<f64>() / n as f64,
            runs_ms,
        }
    }
}

/// Run `f` `warmup` times untimed, then `runs` times timed (device synchronized).
pub fn time_runs(
    device: &Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Deterministic pseudo-random values in [-2, 2) of any shape.
pub fn synthetic(shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Time the encoder forward pass (patch embedding through the final
/// layernorm) on `batch` images of `size × size` pixels.
pub fn bench_encoder(
    model: &LayoutModel,
    size: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
) -> Result<StageTiming> {
    let device = model.encoder.device().clone();
    let pixels = synthetic(&[batch, 3, size, size], &device)?;
    let runs = time_runs(&device, warmup, runs, || {
        model.encoder.forward(&pixels)?;
        Ok(())
    })?;
    Ok(StageTiming::from_runs(
        format!("encoder {size}x{size} batch {batch}"),
        runs,
    ))
}

/// What [`bench_synthesis`] times.
pub struct SynthesisBench<'a> {
    /// Output sides (square).
    pub sizes: &'a [u32],
    /// Images per CFG step (each 2 rows).
    pub batches: &'a [usize],
    /// Stage families (`text_encoder`, `cfg_step`, `vae_decode`); all if empty.
    pub stages: &'a [String],
    pub warmup: usize,
    pub runs: usize,
}

/// Time the synthesis stages on a loaded model set: text encoding (two
/// prompts), one classifier-free-guidance step (ControlNet + UNet on 2 rows
/// per image, for each batch: `cfg_step_S`, `cfg_step_S_bN`) and one VAE
/// decode at each output side.
pub fn bench_synthesis(
    model: &crate::pipeline::synthesis::SynthesisModel,
    plan: &SynthesisBench,
) -> Result<Vec<StageTiming>> {
    let (stages, warmup, runs) = (plan.stages, plan.warmup, plan.runs);
    let device = model.device().clone();
    let wanted = |s: &str| stages.is_empty() || stages.iter().any(|x| s.starts_with(x.as_str()));
    let mut out = Vec::new();
    let text = model.text_embeddings("a red house by the sea", "blurry, dark", true)?;
    if wanted("text_encoder") {
        let t = time_runs(&device, warmup, runs, || {
            model.text_embeddings("a red house by the sea", "blurry, dark", true)?;
            Ok(())
        })?;
        out.push(StageTiming::from_runs("text_encoder", t));
    }
    let f = model.vae.factor;
    let c = model.vae.latent_channels;
    let kmax = model.controlnet.conditioning_channels;
    for &s in plan.sizes {
        let s = s as usize;
        for &n in plan.batches.iter().filter(|_| wanted("cfg_step")) {
            let rows = 2 * n;
            let latents = synthetic(&[rows, c, s / f, s / f], &device)?.to_dtype(model.dtype())?;
            let cond = synthetic(&[rows, kmax, s, s], &device)?.to_dtype(model.dtype())?;
            let text = text.repeat((n, 1, 1))?;
            let t = time_runs(&device, warmup, runs, || {
                let (down, mid) = model.controlnet.forward(&latents, &[500.0], &text, &cond)?;
                model
                    .unet
                    .forward(&latents, &[500.0], &text, Some(&down), Some(&mid))?;
                Ok(())
            })?;
            let name = if n == 1 {
                format!("cfg_step_{s}")
            } else {
                format!("cfg_step_{s}_b{n}")
            };
            out.push(StageTiming::from_runs(name, t));
        }
        if wanted("vae_decode") {
            let z = synthetic(&[1, c, s / f, s / f], &device)?.to_dtype(model.vae.dtype)?;
            let t = time_runs(&device, warmup, runs, || {
                model.vae.decode(&z)?;
                Ok(())
            })?;
            out.push(StageTiming::from_runs(format!("vae_decode_{s}"), t));
        }
    }
    Ok(out)
}

/// What an `image_S` stage generates: one whole image per run, as
/// `lumen synthesize` would, at S × S.
pub struct ImageBench<'a> {
    pub layout: &'a LayoutModel,
    pub bounds: &'a crate::pipeline::request::Bounds,
    /// Denoising steps per image.
    pub steps: usize,
}

/// A deterministic guide image: smooth colour regions with edges, so the
/// encoder sees structure (its content does not change the cost).
pub fn synthetic_guide(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
        let region = ((u * 3.0) as u32 + 2 * (v * 3.0) as u32) % 5;
        let base = [
            [200, 60, 40],
            [40, 160, 70],
            [50, 80, 200],
            [220, 210, 90],
            [120, 120, 120],
        ][region as usize];
        image::Rgb(base.map(|c: u8| c.saturating_add((16.0 * (u * 20.0).sin()) as u8)))
    })
}

/// Time `image_S` for each side S: the guide's layout (encoder + PCA, the
/// model's default K), both text encodings, `steps` denoising steps with
/// classifier-free guidance (default scheduler and scales) and the decode to
/// RGB, through the same request path as the CLI.
pub fn bench_images(
    model: &crate::pipeline::synthesis::SynthesisModel,
    b: &ImageBench,
    sizes: &[u32],
    warmup: usize,
    runs: usize,
) -> Result<Vec<StageTiming>> {
    use crate::pipeline::request::{GuideInfo, SynthesisRequest};
    let mut out = Vec::new();
    for &s in sizes {
        let guide = synthetic_guide(s, s);
        let request = SynthesisRequest {
            prompt: Some("a red house by the sea".into()),
            negative_prompt: Some("blurry, dark".into()),
            steps: Some(b.steps),
            width: Some(s),
            height: Some(s),
            seed: Some(0),
            ..Default::default()
        };
        request.validate(b.bounds)?;
        let plan = request.resolve(b.bounds, &GuideInfo::image(guide.dimensions()))?;
        let kmax = b.bounds.layout.max_components;
        let t = time_runs(model.device(), warmup, runs, || {
            let prepared = b.layout.prepare(&guide, Some(plan.layout_size))?;
            let full = b
                .layout
                .layouts(&[(&prepared, kmax)])?
                .pop()
                .ok_or_else(|| crate::error::Error::Internal("no layout computed".into()))?;
            let layout = full.truncate(plan.components)?;
            model.generate(&plan.settings, &plan.items(&layout), |_, _| {})?;
            Ok(())
        })?;
        out.push(StageTiming::from_runs(format!("image_{s}"), t));
    }
    Ok(out)
}
