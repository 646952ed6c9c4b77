//! What a job is asked to do ([`AugmentOptions`], [`Backend`], [`Prompts`])
//! and the checks that stop it before any image is made ([`Inputs::open`]:
//! the options, the input folder, the COCO file, the class names).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::classes::ClassNames;
use super::coco::Coco;
use super::remote::RemoteOptions;
use crate::dataset::ImageFolder;
use crate::error::{Error, Result};
use crate::model_folder::ModelSource;
use crate::pipeline::output::OutputFormat;
use crate::pipeline::request::SynthesisRequest;

/// Where the prompts come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompts {
    /// The same prompt for every output.
    Fixed(String),
    /// The dataset's captions (`metadata.jsonl` or `NAME.txt`, as `lumen
    /// layouts` reads them); no caption, no prompt.
    Captions,
    /// Cycled through, one per output in plan order.
    Cycle(Vec<String>),
}

/// Which engine makes the images.
#[derive(Clone, Debug)]
pub enum Backend {
    Local {
        source: ModelSource,
        device: candle_core::Device,
        precision: crate::pipeline::synthesis::Precision,
        /// Images per model call.
        batch: usize,
    },
    Remote(RemoteOptions),
}

/// What to do.
#[derive(Clone, Debug)]
pub struct AugmentOptions {
    pub input: PathBuf,
    pub out: PathBuf,
    pub masks: Option<PathBuf>,
    pub coco: Option<PathBuf>,
    pub yolo: Option<PathBuf>,
    /// The mask values' names (default: `MASKS/classes.json` if present).
    pub mask_names: Option<PathBuf>,
    /// The YOLO class names (default: `YOLO/data.yaml` if present).
    pub yolo_names: Option<PathBuf>,
    /// Variants per source and K.
    pub per_image: usize,
    /// The K of each variant set (empty: the model's default K).
    pub components: Vec<usize>,
    pub prompts: Prompts,
    /// Every other synthesis parameter (prompt, components, seed, num_images
    /// and score are set per output).
    pub request: SynthesisRequest,
    pub seed: u64,
    /// Outputs scoring below this are not kept.
    pub min_score: Option<f32>,
    /// `(index, count)`: this worker's share of the sources.
    pub shard: (usize, usize),
    /// Show progress (a bar on a terminal, else log lines).
    pub progress: bool,
    /// How often a progress line is logged when stderr is not a terminal.
    pub progress_every: std::time::Duration,
    /// Set on SIGINT / SIGTERM: stop handing out work, record what is in
    /// flight, and report (see [`crate::jobs::interrupt`]).
    pub interrupt: crate::jobs::interrupt::Interrupt,
}

/// Parse `I/N`.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::param("shard", format!("`{s}` is not I/N with 0 <= I < N"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The options checked and the inputs read.
pub(super) struct Inputs {
    pub format: OutputFormat,
    pub folder: ImageFolder,
    pub coco: Option<Coco>,
    /// The names of the mask values and YOLO class ids.
    pub names: ClassNames,
    /// The K of the job: the given ones, else the model's default.
    pub components: Vec<usize>,
}

impl Inputs {
    /// Check the options, list the input images and read the COCO file.
    pub fn open(opts: &AugmentOptions, backend: &Backend) -> Result<Inputs> {
        if opts.per_image == 0 {
            return Err(Error::param("per-image", "must be at least 1"));
        }
        let format = opts.request.format()?;
        let folder = ImageFolder::scan(&opts.input, Some(&opts.out)).map_err(|e| match e {
            Error::InvalidParameter { message, .. } => Error::param("input", message),
            e => e,
        })?;
        for (name, dir) in [("masks", &opts.masks), ("yolo", &opts.yolo)] {
            if let Some(d) = dir {
                if !d.is_dir() {
                    return Err(Error::param(
                        name,
                        format!("{} is not a folder", d.display()),
                    ));
                }
            }
        }
        let coco = match &opts.coco {
            Some(p) => Some(Coco::read(p)?),
            None => None,
        };
        let names = ClassNames::read(
            opts.masks.as_deref(),
            opts.mask_names.as_deref(),
            opts.yolo.as_deref(),
            opts.yolo_names.as_deref(),
        )?;
        Ok(Inputs {
            format,
            folder,
            coco,
            names,
            components: components(opts, backend)?,
        })
    }

    /// The output images' file extension.
    pub fn extension(&self) -> &'static str {
        match self.format {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Webp => "webp",
        }
    }
}

/// K: the given ones, else the model's default (local only); each at least
/// 1 and given once.
fn components(opts: &AugmentOptions, backend: &Backend) -> Result<Vec<usize>> {
    let components =
        if opts.components.is_empty() {
            match backend {
                Backend::Local { source, .. } => {
                    vec![
                        crate::pipeline::spec::ModelSpecs::read(source)?
                            .layout
                            .default_components,
                    ]
                }
                Backend::Remote(_) => return Err(Error::param(
                    "components",
                    "give --components with --server (the servers' default K is not known here)",
                )),
            }
        } else {
            opts.components.clone()
        };
    let mut seen = BTreeSet::new();
    for &k in &components {
        if k == 0 || !seen.insert(k) {
            return Err(Error::param(
                "components",
                format!("{components:?}: each K must be at least 1 and given once"),
            ));
        }
    }
    Ok(components)
}
