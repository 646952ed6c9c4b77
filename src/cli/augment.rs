//! `lumen augment`: a labelled dataset in, a larger synthetic labelled
//! dataset out (see [`crate::jobs::augment`] for the output folder).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{ModelArgs, SamplingArgs};
use crate::config::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::jobs::augment::{self, AugmentOptions, Backend, Prompts, RemoteOptions};
use crate::jobs::interrupt::Interrupt;
use crate::model_folder::ModelSource;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::request::SynthesisRequest;
use crate::pipeline::synthesis::Precision;

#[derive(Args)]
pub struct AugmentArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Source images, searched recursively (PNG, JPEG, WebP); captions as for
    /// `lumen layouts` (metadata.jsonl or NAME.txt).
    #[arg(long, env = "LUMEN_INPUT")]
    input: PathBuf,
    /// Output folder: images/, masks/, labels/, manifest.jsonl, metadata.jsonl (Hugging Face
    /// imagefolder), classes.json, annotations.json, data.yaml. A rerun of the same command
    /// continues an interrupted job.
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// Masks: DIR/<path of the image without extension>.png (palette, grey or colour class maps),
    /// resized with nearest neighbour, values kept.
    #[arg(long, env = "LUMEN_MASKS")]
    masks: Option<PathBuf>,
    /// COCO detection/instance JSON for the input (file_name relative to --input);
    /// OUT/annotations.json gets every output with its geometry rescaled.
    #[arg(long, env = "LUMEN_COCO")]
    coco: Option<PathBuf>,
    /// YOLO labels: DIR/<path of the image without extension>.txt, copied unchanged.
    #[arg(long, env = "LUMEN_YOLO")]
    yolo: Option<PathBuf>,
    /// Names of the mask values, for OUT/classes.json: a JSON list (position = value) or object
    /// {"VALUE": "name"}; default: MASKS/classes.json if present.
    #[arg(long, env = "LUMEN_MASK_NAMES")]
    mask_names: Option<PathBuf>,
    /// Names of the YOLO class ids, for OUT/data.yaml and classes.json: a YOLO data.yaml
    /// (`names:`) or JSON as --mask-names; default: YOLO/data.yaml if present.
    #[arg(long, env = "LUMEN_YOLO_NAMES")]
    yolo_names: Option<PathBuf>,
    /// Variants per source image and K.
    #[arg(long, env = "LUMEN_PER_IMAGE", default_value_t = 1)]
    per_image: usize,
    /// The K of the variants, e.g. 2,8 (each source gets --per-image variants per K);
    /// default: the model's K (required with --server).
    #[arg(long, short = 'k', env = "LUMEN_COMPONENTS", value_delimiter = ',')]
    components: Vec<usize>,
    /// One prompt for every output; default: the dataset's captions.
    #[arg(long, env = "LUMEN_PROMPT", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A text file of prompts, one per line, cycled through.
    #[arg(long, env = "LUMEN_PROMPTS")]
    prompts: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Output image format: png (carries its parameters), jpeg or webp.
    #[arg(long, env = "LUMEN_FORMAT", default_value = "png")]
    format: String,
    /// The job's seed: each output's seed derives from it, the source's path and the variant.
    #[arg(long, env = "LUMEN_SEED", default_value_t = 0)]
    seed: u64,
    /// Keep only outputs whose fidelity score (layout agreement with the source, -1..1) is at least this.
    #[arg(long, env = "LUMEN_MIN_SCORE")]
    min_score: Option<f32>,
    /// This worker's share: I/N takes every N-th source from the I-th (0-based).
    #[arg(long, env = "LUMEN_SHARD", default_value = "0/1")]
    shard: String,
    /// Images per model call (local engine).
    #[arg(long, env = "LUMEN_BATCH", default_value_t = 1)]
    batch: usize,
    /// Send the work to running `lumen serve` replicas instead of the local engine (repeatable; --models is then not used).
    #[arg(long = "server", env = "LUMEN_SERVERS", value_delimiter = ',')]
    servers: Vec<String>,
    /// Requests in flight per server.
    #[arg(long, env = "LUMEN_SERVER_CONCURRENCY", default_value_t = 4)]
    server_concurrency: usize,
    /// API key for the servers (sent as a bearer token).
    #[arg(long, env = "LUMEN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Stop when no server has answered for this many seconds.
    #[arg(long, env = "LUMEN_SERVER_WAIT_S", default_value_t = 60)]
    server_wait_s: u64,
    /// Longest wait for one server answer, in seconds.
    #[arg(long, env = "LUMEN_REQUEST_TIMEOUT_S", default_value_t = 600)]
    request_timeout_s: u64,
    /// Hide the progress (the bar on a terminal, the log lines otherwise).
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
    /// When stderr is not a terminal (a container's or a Job's log): seconds between
    /// progress log lines.
    #[arg(long, env = "LUMEN_PROGRESS_EVERY_S", default_value_t = 30.0)]
    progress_every_s: f64,
}

pub fn run(a: AugmentArgs) -> Result<()> {
    let format = OutputFormat::parse(&a.format)
        .map_err(|_| Error::param("format", format!("`{}` is not png, jpeg or webp", a.format)))?;
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => Prompts::Fixed(p.clone()),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if list.is_empty() {
                return Err(Error::param(
                    "prompts",
                    format!("{} holds no prompt", file.display()),
                ));
            }
            Prompts::Cycle(list)
        }
        (None, None) => Prompts::Captions,
    };
    if !(a.progress_every_s.is_finite() && a.progress_every_s > 0.0) {
        return Err(Error::param(
            "progress-every-s",
            format!("{} is not a positive number of seconds", a.progress_every_s),
        ));
    }
    if let Some(m) = a.min_score {
        if !m.is_finite() {
            return Err(Error::param("min-score", format!("{m} is not a number")));
        }
    }
    let request = SynthesisRequest {
        format: Some(format.name().into()),
        ..a.sampling.request()
    };
    let backend = if a.servers.is_empty() {
        let device = parse_device(&a.model.device)?;
        Backend::Local {
            source: ModelSource::from_arg(a.model.models.clone()),
            precision: Precision::new(
                parse_dtype(&a.sampling.dtype, &device)?,
                a.sampling.vae_upcast,
            ),
            device,
            batch: a.batch.max(1),
        }
    } else {
        // The servers have their models; --models (or LUMEN_MODELS) is not used.
        Backend::Remote(RemoteOptions {
            servers: a.servers.clone(),
            concurrency: a.server_concurrency.max(1),
            api_key: a.api_key.clone(),
            wait: Duration::from_secs(a.server_wait_s.max(1)),
            request_timeout: Duration::from_secs(a.request_timeout_s.max(1)),
        })
    };
    let opts = AugmentOptions {
        input: a.input,
        out: a.out,
        masks: a.masks,
        coco: a.coco,
        yolo: a.yolo,
        mask_names: a.mask_names,
        yolo_names: a.yolo_names,
        per_image: a.per_image,
        components: a.components,
        prompts,
        request,
        seed: a.seed,
        min_score: a.min_score,
        shard: augment::parse_shard(&a.shard)?,
        progress: !a.quiet,
        progress_every: Duration::from_secs_f64(a.progress_every_s),
        // SIGINT / SIGTERM stop the job cleanly: the summary, then 128 + the signal.
        interrupt: Interrupt::on_signals()
            .map_err(|e| Error::Internal(format!("cannot listen for SIGINT / SIGTERM: {e}")))?,
    };
    let mut report = augment::run(&opts, backend)?;
    print!("{}", augment::summary(&report, opts.min_score));
    if let Some(e) = report.stopped.take() {
        return Err(e);
    }
    if let Some(signal) = report.interrupted {
        return Err(Error::Interrupted { signal });
    }
    if !report.failed.is_empty() {
        return Err(Error::Internal(format!(
            "{} outputs could not be made; rerun the same command to retry them",
            report.failed.len()
        )));
    }
    Ok(())
}
