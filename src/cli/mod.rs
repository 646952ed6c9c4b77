//! The `lumen` command line: the service, layouts, synthesis, PCA fitting,
//! model folders, the OpenAPI document and benchmarks. Like the server, the
//! commands build requests through the request model
//! ([`crate::pipeline::request`]) and never resolve a default themselves.

mod augment;
mod commands;
mod layout;
mod layouts;
mod synthesize;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::pipeline::request::SynthesisRequest;
use crate::server::ServeArgs;

pub use layout::{FitPcaArgs, LayoutArgs};
pub use synthesize::SynthesizeArgs;

/// lumen: label-free neural semantic image synthesis.
///
/// A guide image becomes a neural layout (DINOv2 patch features reduced by
/// PCA to K components). Without --models every command uses the embedded
/// shapes model: 64×64 images of coloured circles, squares and triangles on
/// grey (trained here, see models/README.md); real photos need a real model.
#[derive(Parser)]
#[command(name = "lumen", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP inference service (POST /layout, POST /synthesize).
    Serve(ServeArgs),
    /// Compute the neural layout of a guide image.
    Layout(LayoutArgs),
    /// Fit a PCA basis over the patch tokens of a folder of images.
    FitPca(FitPcaArgs),
    /// Export the Kmax-channel layouts of an image folder as training data (resumable).
    Layouts(layouts::LayoutsArgs),
    /// Generate images with the layout of a guide image.
    Synthesize(SynthesizeArgs),
    /// Make a labelled dataset larger: synthetic variants of each image, labels carried over (resumable).
    Augment(Box<augment::AugmentArgs>),
    /// Assemble a model folder from Hugging Face Hub repositories.
    Fetch(commands::FetchArgs),
    /// Print the OpenAPI document (as committed in openapi/openapi.json).
    Openapi,
    /// Benchmarks (compare against the references with scripts/bench_*.py).
    #[command(subcommand)]
    Bench(commands::BenchCommand),
}

/// The model folder and the device, shared by the commands that load models.
#[derive(Args)]
pub struct ModelArgs {
    /// Model folder (see models/README.md); the embedded shapes model if omitted.
    #[arg(long, env = "LUMEN_MODELS")]
    pub models: Option<PathBuf>,
    /// Device to run on: cpu, cuda or cuda:N.
    #[arg(long, env = "LUMEN_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// The synthesis parameters `lumen synthesize` and `lumen augment` share.
#[derive(Args)]
pub struct SamplingArgs {
    /// Negative prompt (used when guidance > 1).
    #[arg(long, env = "LUMEN_NEGATIVE_PROMPT", default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps; default from lumen.json, else 30.
    #[arg(long, env = "LUMEN_STEPS")]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default: lumen.json, else 7.5); at most 1 skips the unconditional pass.
    #[arg(long, env = "LUMEN_GUIDANCE")]
    pub guidance: Option<f64>,
    /// Weight of the ControlNet's residuals (default: lumen.json, else 1).
    #[arg(long, env = "LUMEN_CONTROL_SCALE")]
    pub control_scale: Option<f64>,
    /// ddim, euler or dpmpp-2m; default: the model folder's scheduler if lumen has it, else dpmpp-2m.
    #[arg(long, env = "LUMEN_SCHEDULER")]
    pub scheduler: Option<String>,
    /// Output width; default: from --height and the guide's aspect, or the guide's aspect with the longer side from lumen.json (else 512).
    #[arg(long, env = "LUMEN_WIDTH")]
    pub width: Option<u32>,
    /// Output height; default as for --width.
    #[arg(long, env = "LUMEN_HEIGHT")]
    pub height: Option<u32>,
    /// Longer side, in pixels, of the image fed to the encoder; default from lumen.json (518).
    #[arg(long, env = "LUMEN_LAYOUT_SIZE")]
    pub layout_size: Option<u32>,
    /// Diffusion weights' dtype: auto (f16 on CUDA, f32 on CPU), f32, f16 or bf16.
    /// The DINOv2 encoder and PCA always run in f32.
    #[arg(long, env = "LUMEN_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Decode with the VAE in f32 when the weights are f16 or bf16 (SD1.5's VAE can
    /// overflow f16 at large sizes). Default: the VAE config's force_upcast (true
    /// unless the config says otherwise); --vae-upcast=false decodes in the weights'
    /// dtype, saving the VAE's f32 memory.
    #[arg(long, env = "LUMEN_VAE_UPCAST", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_name = "BOOL")]
    pub vae_upcast: Option<bool>,
}

impl SamplingArgs {
    /// These parameters as a request (the rest left to the caller).
    pub fn request(&self) -> SynthesisRequest {
        SynthesisRequest {
            negative_prompt: Some(self.negative_prompt.clone()),
            layout_size: self.layout_size,
            steps: self.steps,
            guidance_scale: self.guidance,
            control_scale: self.control_scale,
            scheduler: self.scheduler.clone(),
            width: self.width,
            height: self.height,
            ..Default::default()
        }
    }
}

impl Cli {
    /// The log format the command asks for.
    pub fn log_format(&self) -> &str {
        match &self.command {
            Command::Serve(a) => a.log_format.as_str(),
            _ => "text",
        }
    }

    /// Run the command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Serve(a) => commands::serve(a),
            Command::Fetch(a) => commands::fetch(a),
            Command::Openapi => {
                print!("{}", crate::server::openapi::openapi_json());
                Ok(())
            }
            Command::Layout(a) => layout::run_layout(a),
            Command::FitPca(a) => layout::run_fit_pca(a),
            Command::Layouts(a) => layouts::run(a),
            Command::Synthesize(a) => synthesize::run(a),
            Command::Augment(a) => augment::run(*a),
            Command::Bench(c) => commands::bench(c),
        }
    }
}

/// `path` must end in one of `allowed` (lower case, without the dot).
fn check_extension(path: &Path, allowed: &[&str]) -> Result<String> {
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
    Ok(ext)
}

/// A progress bar of `len` steps, hidden when `quiet`.
fn progress_bar(len: u64, quiet: bool, message: &'static str) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} steps ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}
