//! `lumen serve`, `lumen fetch` and `lumen bench`.

use clap::{Args, Subcommand};
use std::path::PathBuf;

use super::ModelArgs;
use crate::config::parse_device;
use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::pipeline::layout::LayoutModel;
use crate::pipeline::request::{Bounds, Limits};
use crate::pipeline::spec::ModelSpecs;
use crate::pipeline::synthesis::SynthesisModel;
use crate::server::ServeArgs;
use crate::{bench, fetch};

pub fn serve(a: ServeArgs) -> Result<()> {
    // Decoding and encoding images run on the blocking pool: more threads
    // than cores gain nothing, so it is capped (tokio's default is 512, and
    // a burst of uploads would start that many threads).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lumen-http")
        .max_blocking_threads((2 * cores).max(4))
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(crate::server::serve(a))
}

#[derive(Args)]
pub struct FetchArgs {
    /// The model folder to create or complete.
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// DINOv2 encoder repository (transformers Dinov2Model).
    #[arg(
        long,
        env = "LUMEN_ENCODER_REPO",
        default_value = "facebook/dinov2-large"
    )]
    encoder: String,
    /// SD1.5-style diffusers repository (unet, vae, text_encoder, tokenizer, scheduler).
    #[arg(
        long,
        env = "LUMEN_DIFFUSION_REPO",
        default_value = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )]
    diffusion: String,
    /// The LUMEN ControlNet: a Hub repository or a local folder (config.json +
    /// diffusion_pytorch_model.safetensors, optionally pca.safetensors and lumen.json).
    /// Without it the folder is a base to train one on (lumen-train).
    #[arg(long, env = "LUMEN_CONTROLNET")]
    controlnet: Option<String>,
    /// A PCA basis (pca.safetensors) to copy into the folder.
    #[arg(long, env = "LUMEN_PCA")]
    pca: Option<PathBuf>,
    /// Revision (branch, tag or commit) of the Hub repositories.
    #[arg(long, env = "LUMEN_REVISION", default_value = "main")]
    revision: String,
    /// Download cache (default: $HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long, env = "LUMEN_HF_CACHE")]
    cache_dir: Option<PathBuf>,
    /// Hide the progress bars.
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
}

pub fn fetch(a: FetchArgs) -> Result<()> {
    let report = fetch::fetch(&fetch::FetchOptions {
        out: a.out.clone(),
        encoder: a.encoder,
        diffusion: a.diffusion,
        controlnet: a.controlnet,
        pca: a.pca,
        revision: a.revision,
        cache_dir: a.cache_dir,
        progress: !a.quiet,
    })?;
    println!("wrote {} files to {}", report.files.len(), a.out.display());
    if !a.out.join("controlnet").is_dir() {
        println!(
            "no ControlNet: this folder is a base to train one on your images (README: Train your own)"
        );
    }
    if !report.has_pca {
        println!(
            "no PCA basis yet: fit one on images like yours with\n  lumen fit-pca --models {0} --images DIR --components K --out {0}/pca.safetensors\n\
             (K must equal the ControlNet's conditioning_channels)",
            a.out.display()
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time the DINOv2 encoder forward pass on synthetic input.
    Layout(BenchLayoutArgs),
    /// Time text encoding, one CFG step (ControlNet + UNet, batch 2) and VAE decode.
    Synthesis(BenchSynthesisArgs),
}

#[derive(Args)]
pub struct BenchSynthesisArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output sides to time (square), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [256u32, 512])]
    sizes: Vec<u32>,
    /// Only these stages, comma-separated: text_encoder, cfg_step, vae_decode
    /// (all three if omitted), image (a whole image per run: layout, text,
    /// --steps denoising steps with guidance, decode; only when named).
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Denoising steps of each `image` run.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Images per `cfg_step` (2 rows each: unconditional and conditional),
    /// comma-separated; a batch of N > 1 is reported as `cfg_step_S_bN`.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
    batch: Vec<usize>,
    /// Diffusion weights' dtype: f32 (as the references), f16, bf16, or auto
    /// (f16 on CUDA, f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Args)]
pub struct BenchLayoutArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input side in pixels (square).
    #[arg(long, default_value_t = 518)]
    size: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

pub fn bench(c: BenchCommand) -> Result<()> {
    let (model_args, report) = match c {
        BenchCommand::Layout(a) => {
            let device = parse_device(&a.model.device)?;
            let src = ModelSource::from_arg(a.model.models.clone());
            let model = LayoutModel::load(&src, &device)?;
            if a.size < model.encoder.patch_size() || a.batch == 0 || a.runs == 0 {
                return Err(Error::param(
                    "size/batch/runs",
                    "must be at least one patch / 1 / 1",
                ));
            }
            let timing = bench::bench_encoder(&model, a.size, a.batch, a.warmup, a.runs)?;
            (
                a.model,
                vec![serde_json::to_value(timing).unwrap_or_default()],
            )
        }
        BenchCommand::Synthesis(a) => {
            let device = parse_device(&a.model.device)?;
            let src = ModelSource::from_arg(a.model.models.clone());
            let dtype = crate::config::parse_dtype(&a.dtype, &device)?;
            let model = SynthesisModel::load_as(&src, &device, dtype)?;
            let m = model.size_multiple();
            if let Some(s) = a.sizes.iter().find(|s| **s == 0 || **s % m != 0) {
                return Err(Error::param(
                    "sizes",
                    format!("{s} is not a positive multiple of {m}"),
                ));
            }
            if a.runs == 0 {
                return Err(Error::param("runs", "must be at least 1"));
            }
            if a.batch.is_empty() || a.batch.contains(&0) {
                return Err(Error::param("batch", "every batch must be at least 1"));
            }
            const STAGES: [&str; 4] = ["text_encoder", "cfg_step", "vae_decode", "image"];
            if let Some(s) = a.stages.iter().find(|s| !STAGES.contains(&s.as_str())) {
                return Err(Error::param(
                    "stages",
                    format!("unknown stage `{s}`; use {}", STAGES.join(", ")),
                ));
            }
            let parts: Vec<String> = a.stages.iter().filter(|s| *s != "image").cloned().collect();
            let mut timings = if a.stages.is_empty() || !parts.is_empty() {
                let plan = bench::SynthesisBench {
                    sizes: &a.sizes,
                    batches: &a.batch,
                    stages: &parts,
                    warmup: a.warmup,
                    runs: a.runs,
                };
                bench::bench_synthesis(&model, &plan)?
            } else {
                Vec::new()
            };
            if a.stages.iter().any(|s| s == "image") {
                let bounds = Bounds::new(&ModelSpecs::read(&src)?, Limits::default())?;
                let layout = LayoutModel::load(&src, &device)?;
                let b = bench::ImageBench {
                    layout: &layout,
                    bounds: &bounds,
                    steps: a.steps,
                };
                timings.extend(bench::bench_images(&model, &b, &a.sizes, a.warmup, a.runs)?);
            }
            let timings = timings
                .into_iter()
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .collect();
            (a.model, timings)
        }
    };
    let source = ModelSource::from_arg(model_args.models);
    let report = serde_json::json!({
        "model": source.identity()?,
        "model_path": source.location(),
        "device": model_args.device,
        "timings": report,
        "peak_rss_bytes": bench::peak_rss_bytes(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}
