//! The `lumen` command line: the service, layouts, synthesis, PCA fitting,
//! the OpenAPI document and benchmarks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use lumen::config::{parse_device, LumenSettings, ModelSource};
use lumen::models::dinov2::Dinov2;
use lumen::models::schedulers::SchedulerKind;
use lumen::pipeline::fit_pca::{fit_pca, list_images};
use lumen::pipeline::layout::LayoutModel;
use lumen::pipeline::synthesis::{SynthesisItem, SynthesisModel, SynthesisSettings};
use lumen::server::ServeArgs;
use lumen::{bench, guide, png_text, Error, Result};

// Tensor ops allocate large short-lived buffers; mimalloc reuses them instead
// of returning them to the OS and page-faulting them back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// lumen: label-free neural semantic image synthesis.
///
/// A guide image becomes a neural layout (DINOv2 patch features reduced by
/// PCA to K components). Without --models every command uses the embedded
/// tiny model, whose weights are random: it proves the wiring only.
#[derive(Parser)]
#[command(name = "lumen", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP inference service (POST /layout, POST /synthesize).
    Serve(ServeArgs),
    /// Compute the neural layout of a guide image.
    Layout(LayoutArgs),
    /// Fit a PCA basis over the patch tokens of a folder of images.
    FitPca(FitPcaArgs),
    /// Generate images with the layout of a guide image.
    Synthesize(SynthesizeArgs),
    /// Assemble a model folder from Hugging Face Hub repositories.
    Fetch(FetchArgs),
    /// Print the OpenAPI document (as committed in openapi/openapi.json).
    Openapi,
    /// Benchmarks (compare against the references with scripts/bench_*.py).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder (see models/README.md); the embedded tiny model if omitted.
    #[arg(long, env = "LUMEN_MODELS")]
    models: Option<PathBuf>,
    /// Device to run on: cpu, cuda or cuda:N.
    #[arg(long, env = "LUMEN_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct LayoutArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Guide image (PNG, JPEG or WebP).
    #[arg(long, env = "LUMEN_IMAGE")]
    image: PathBuf,
    /// Number of PCA components K to keep (1..=Kmax); default from lumen.json.
    #[arg(long, short = 'k', env = "LUMEN_COMPONENTS")]
    components: Option<usize>,
    /// Longer side, in pixels, of the image fed to the encoder; default from lumen.json (518).
    #[arg(long, env = "LUMEN_LAYOUT_SIZE")]
    layout_size: Option<u32>,
    /// Output: .safetensors (tensor `layout`, f32 [K,h,w]) or .png (preview of the first three components).
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
}

#[derive(Args)]
struct FitPcaArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Folder of PNG, JPEG or WebP images (not recursive).
    #[arg(long, env = "LUMEN_IMAGES")]
    images: PathBuf,
    /// Number of components Kmax to keep.
    #[arg(long, short = 'k', env = "LUMEN_COMPONENTS", default_value_t = 32)]
    components: usize,
    /// Use at most this many images (in name order).
    #[arg(long, env = "LUMEN_MAX_IMAGES")]
    max_images: Option<usize>,
    /// Longer side, in pixels, of the image fed to the encoder; default from lumen.json (518).
    #[arg(long, env = "LUMEN_LAYOUT_SIZE")]
    layout_size: Option<u32>,
    /// Output file, e.g. MODEL_DIR/pca.safetensors.
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// Hide the progress bar.
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
}

#[derive(Args)]
struct SynthesizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Guide image (PNG, JPEG or WebP) whose layout the new images keep.
    #[arg(long, env = "LUMEN_IMAGE")]
    image: PathBuf,
    /// Text prompt.
    #[arg(long, env = "LUMEN_PROMPT", default_value = "")]
    prompt: String,
    /// Negative prompt (used when guidance > 1).
    #[arg(long, env = "LUMEN_NEGATIVE_PROMPT", default_value = "")]
    negative_prompt: String,
    /// Number of PCA components K of the layout (1..=Kmax): fewer = more diverse.
    #[arg(long, short = 'k', env = "LUMEN_COMPONENTS")]
    components: Option<usize>,
    /// Denoising steps (1..=1000).
    #[arg(long, env = "LUMEN_STEPS", default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale; at most 1 skips the unconditional pass.
    #[arg(long, env = "LUMEN_GUIDANCE", default_value_t = 7.5)]
    guidance: f64,
    /// Weight of the ControlNet's residuals.
    #[arg(long, env = "LUMEN_CONTROL_SCALE", default_value_t = 1.0)]
    control_scale: f64,
    /// ddim, euler or dpmpp-2m; default: the model folder's scheduler if lumen has it, else dpmpp-2m.
    #[arg(long, env = "LUMEN_SCHEDULER")]
    scheduler: Option<String>,
    /// Seed of the first image (image i uses seed + i); random if omitted.
    #[arg(long, env = "LUMEN_SEED")]
    seed: Option<u64>,
    /// Number of images.
    #[arg(long, env = "LUMEN_NUM_IMAGES", default_value_t = 1)]
    num_images: usize,
    /// Output width; default: the guide's aspect with the longer side 512.
    #[arg(long, env = "LUMEN_WIDTH", requires = "height")]
    width: Option<u32>,
    /// Output height (give both or neither).
    #[arg(long, env = "LUMEN_HEIGHT", requires = "width")]
    height: Option<u32>,
    /// Longer side, in pixels, of the image fed to the encoder; default from lumen.json (518).
    #[arg(long, env = "LUMEN_LAYOUT_SIZE")]
    layout_size: Option<u32>,
    /// Initial noise: safetensors with tensor `latents` [1, C, h, w] (unit variance); overrides the seed.
    #[arg(long, env = "LUMEN_LATENTS")]
    latents: Option<PathBuf>,
    /// Output PNG; with several images PATH-0.png, PATH-1.png, …
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// Hide the progress bar.
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
}

#[derive(Args)]
struct FetchArgs {
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
    #[arg(long, env = "LUMEN_CONTROLNET")]
    controlnet: String,
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the DINOv2 encoder forward pass on synthetic input.
    Layout(BenchLayoutArgs),
    /// Time text encoding, one CFG step (ControlNet + UNet, batch 2) and VAE decode.
    Synthesis(BenchSynthesisArgs),
}

#[derive(Args)]
struct BenchSynthesisArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output sides to time (square), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [256u32, 512])]
    sizes: Vec<u32>,
    /// Only these stages (text_encoder, cfg_step, vae_decode), comma-separated; all if omitted.
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Args)]
struct BenchLayoutArgs {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(a) => a.log_format.as_str(),
        _ => "text",
    };
    lumen::server::init_logging(log_format);
    let result = match cli.command {
        Command::Serve(a) => run_serve(a),
        Command::Fetch(a) => run_fetch(a),
        Command::Openapi => {
            print!("{}", lumen::server::api::openapi_json());
            Ok(())
        }
        Command::Layout(a) => run_layout(a),
        Command::FitPca(a) => run_fit_pca(a),
        Command::Synthesize(a) => run_synthesize(a),
        Command::Bench(BenchCommand::Layout(a)) => run_bench_layout(a),
        Command::Bench(BenchCommand::Synthesis(a)) => run_bench_synthesis(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(a: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lumen-http")
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(lumen::server::serve(a))
}

fn run_fetch(a: FetchArgs) -> Result<()> {
    let report = lumen::fetch::fetch(&lumen::fetch::FetchOptions {
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
    if !report.has_pca {
        println!(
            "no PCA basis yet: fit one on images like yours with\n  lumen fit-pca --models {0} --images DIR --components K --out {0}/pca.safetensors\n\
             (K must equal the ControlNet's conditioning_channels)",
            a.out.display()
        );
    }
    Ok(())
}

fn run_layout(a: LayoutArgs) -> Result<()> {
    let kind = OutKind::of(&a.out, &["safetensors", "png"])?;
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    let model = LayoutModel::load(&src, &device)?;
    let k = a.components.unwrap_or_else(|| model.default_components());
    model.pca.check_components(k)?;
    let img = guide::open(&a.image, model.settings.max_image_pixels)?.to_rgb8();
    let prepared = model.prepare(&img, a.layout_size)?;
    let layout = model
        .layouts(&[(&prepared, k)])?
        .pop()
        .ok_or_else(|| Error::Internal("no layout computed".into()))?;
    match kind {
        OutKind::Safetensors => layout.save_safetensors(&a.out)?,
        OutKind::Png => {
            let (w, h) = prepared.source_size;
            layout
                .preview(w, h)?
                .save(&a.out)
                .map_err(|e| Error::io(&a.out, std::io::Error::other(e)))?;
        }
    }
    println!(
        "wrote layout K={k} grid {}x{} to {}",
        layout.grid.0,
        layout.grid.1,
        a.out.display()
    );
    Ok(())
}

fn run_fit_pca(a: FitPcaArgs) -> Result<()> {
    OutKind::of(&a.out, &["safetensors"])?;
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    let settings = LumenSettings::load(&src)?;
    let encoder = Dinov2::load(&src, &device, DType::F32)?;
    let mut files = list_images(&a.images)?;
    if let Some(n) = a.max_images {
        files.truncate(n);
    }
    if files.is_empty() {
        return Err(Error::param(
            "images",
            format!("{} holds no PNG, JPEG or WebP file", a.images.display()),
        ));
    }
    let (pca, report) = fit_pca(
        &encoder,
        &settings,
        &files,
        a.components,
        a.layout_size,
        !a.quiet,
    )?;
    pca.save(&a.out)?;
    let ev = pca.explained_variance().to_vec1::<f32>()?;
    println!(
        "fitted {} components on {} tokens from {} images ({} skipped); explained variance {:?}…; wrote {}",
        pca.max_components(),
        report.tokens,
        report.images,
        report.skipped.len(),
        &ev[..ev.len().min(4)],
        a.out.display()
    );
    Ok(())
}

fn run_bench_layout(a: BenchLayoutArgs) -> Result<()> {
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    let model = LayoutModel::load(&src, &device)?;
    if a.size < model.encoder.patch_size() || a.batch == 0 || a.runs == 0 {
        return Err(Error::param(
            "size/batch/runs",
            "must be at least one patch / 1 / 1",
        ));
    }
    let timing = bench::bench_encoder(&model, a.size, a.batch, a.warmup, a.runs)?;
    let report = serde_json::json!({
        "model": src.identity(),
        "device": a.model.device,
        "timings": [timing],
        "peak_rss_bytes": bench::peak_rss_bytes(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}

fn run_synthesize(a: SynthesizeArgs) -> Result<()> {
    OutKind::of(&a.out, &["png"])?;
    if a.num_images == 0 {
        return Err(Error::param("num_images", "must be at least 1"));
    }
    if a.latents.is_some() && a.num_images != 1 {
        return Err(Error::param(
            "latents",
            "given latents make one image; use --num-images 1",
        ));
    }
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    // The layout first; the encoder is freed before the diffusion weights load.
    let (img_size, layout, k, layout_size) = {
        let lm = LayoutModel::load(&src, &device)?;
        let img = guide::open(&a.image, lm.settings.max_image_pixels)?.to_rgb8();
        let k = a.components.unwrap_or_else(|| lm.default_components());
        lm.pca.check_components(k)?;
        let prepared = lm.prepare(&img, a.layout_size)?;
        let layout = lm
            .layouts(&[(&prepared, k)])?
            .pop()
            .ok_or_else(|| Error::Internal("no layout computed".into()))?;
        (
            img.dimensions(),
            layout,
            k,
            a.layout_size.unwrap_or(lm.settings.layout_size),
        )
    };
    let model = SynthesisModel::load(&src, &device)?;
    let scheduler = match &a.scheduler {
        Some(name) => SchedulerKind::parse(name)?,
        None => model.default_scheduler(),
    };
    let (width, height) = match (a.width, a.height) {
        (Some(w), Some(h)) => (w, h),
        _ => model.default_size(img_size.0, img_size.1),
    };
    let settings = SynthesisSettings {
        width,
        height,
        steps: a.steps,
        scheduler,
    };
    model.check_settings(&settings)?;
    let latents = match &a.latents {
        Some(p) => {
            let t = candle_core::safetensors::load(p, &candle_core::Device::Cpu)
                .map_err(|e| Error::param("latents", format!("{}: {e}", p.display())))?;
            Some(
                t.get("latents")
                    .ok_or_else(|| {
                        Error::param(
                            "latents",
                            format!("{} has no tensor `latents`", p.display()),
                        )
                    })?
                    .to_dtype(DType::F32)?,
            )
        }
        None => None,
    };
    let seed = a.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let items: Vec<SynthesisItem> = (0..a.num_images)
        .map(|i| SynthesisItem {
            layout: layout.clone(),
            prompt: a.prompt.clone(),
            negative_prompt: a.negative_prompt.clone(),
            guidance: a.guidance,
            control_scale: a.control_scale,
            seed: seed.wrapping_add(i as u64),
            latents: latents.clone(),
        })
        .collect();
    for it in &items {
        model.check_item(it, &settings)?;
    }
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(settings.steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} steps ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("denoise");
    let images = model.generate(&settings, &items, |step, _| bar.set_position(step as u64))?;
    bar.finish_and_clear();
    for (i, (img, it)) in images.iter().zip(&items).enumerate() {
        let path = if images.len() == 1 {
            a.out.clone()
        } else {
            let stem = a.out.with_extension("");
            PathBuf::from(format!("{}-{i}.png", stem.display()))
        };
        let params = serde_json::json!({
            "prompt": it.prompt,
            "negative_prompt": it.negative_prompt,
            "seed": if it.latents.is_some() { serde_json::Value::Null } else { it.seed.into() },
            "latents": a.latents.as_ref().map(|p| p.display().to_string()),
            "steps": settings.steps,
            "guidance_scale": it.guidance,
            "control_scale": it.control_scale,
            "components": k,
            "scheduler": settings.scheduler.name(),
            "width": settings.width,
            "height": settings.height,
            "layout_size": layout_size,
            "model": src.identity(),
            "lumen_version": env!("CARGO_PKG_VERSION"),
        });
        let bytes = png_text::encode(img, png_text::KEYWORD, &params.to_string())?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        println!("wrote {} (seed {})", path.display(), it.seed);
    }
    Ok(())
}

fn run_bench_synthesis(a: BenchSynthesisArgs) -> Result<()> {
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    let model = SynthesisModel::load(&src, &device)?;
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
    let timings = bench::bench_synthesis(&model, &a.sizes, &a.stages, a.warmup, a.runs)?;
    let report = serde_json::json!({
        "model": src.identity(),
        "device": a.model.device,
        "timings": timings,
        "peak_rss_bytes": bench::peak_rss_bytes(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}

enum OutKind {
    Safetensors,
    Png,
}

impl OutKind {
    fn of(path: &Path, allowed: &[&str]) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .unwrap_or_default();
        if !allowed.contains(&ext.as_str()) {
            return Err(Error::param(
                "out",
                format!(
                    "`{}` must end in .{}",
                    path.display(),
                    allowed.join(" or .")
                ),
            ));
        }
        Ok(if ext == "png" {
            OutKind::Png
        } else {
            OutKind::Safetensors
        })
    }
}
