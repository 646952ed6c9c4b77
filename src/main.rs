//! The `lumen` command line: layouts, PCA fitting and benchmarks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use lumen::config::{parse_device, LumenSettings, ModelSource};
use lumen::models::dinov2::Dinov2;
use lumen::pipeline::fit_pca::{fit_pca, list_images};
use lumen::pipeline::layout::LayoutModel;
use lumen::{bench, guide, Error, Result};

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
    /// Compute the neural layout of a guide image.
    Layout(LayoutArgs),
    /// Fit a PCA basis over the patch tokens of a folder of images.
    FitPca(FitPcaArgs),
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Time the DINOv2 encoder forward pass on synthetic input.
    Layout(BenchLayoutArgs),
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Layout(a) => run_layout(a),
        Command::FitPca(a) => run_fit_pca(a),
        Command::Bench(BenchCommand::Layout(a)) => run_bench_layout(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
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
