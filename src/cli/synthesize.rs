//! `lumen synthesize`: a guide image file in, image files out, through the
//! same request model, output size rule and parameters record as the API.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use clap::Args;

use super::{progress_bar, ModelArgs, SamplingArgs};
use crate::config::{parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::guide;
use crate::model_folder::ModelSource;
use crate::pipeline::generation::{run_to_end, Generated, Generation};
use crate::pipeline::layout::LayoutModel;
use crate::pipeline::layout_id::{guide_key, layout_id};
use crate::pipeline::output::OutputFormat;
use crate::pipeline::request::limits::DEFAULT_NUM_IMAGES;
use crate::pipeline::request::{Bounds, GuideInfo, Limits, SynthesisRequest};
use crate::pipeline::spec::ModelSpecs;
use crate::pipeline::synthesis::{Precision, SynthesisModel};

#[derive(Args)]
pub struct SynthesizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Guide image (PNG, JPEG or WebP) whose layout the new images keep.
    #[arg(long, env = "LUMEN_IMAGE")]
    image: PathBuf,
    /// Text prompt.
    #[arg(long, env = "LUMEN_PROMPT", default_value = "")]
    prompt: String,
    /// Number of PCA components K of the layout (1..=Kmax): fewer = more diverse; default from lumen.json.
    #[arg(long, short = 'k', env = "LUMEN_COMPONENTS")]
    components: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed of the first image (image i uses seed + i); random if omitted.
    #[arg(long, env = "LUMEN_SEED")]
    seed: Option<u64>,
    /// Number of images.
    #[arg(long, env = "LUMEN_NUM_IMAGES", default_value_t = DEFAULT_NUM_IMAGES)]
    num_images: usize,
    /// Initial noise: safetensors with tensor `latents` [1, C, h, w] (unit variance); overrides the seed.
    #[arg(long, env = "LUMEN_LATENTS")]
    latents: Option<PathBuf>,
    /// Output file: .png (carries the parameters), .jpg/.jpeg or .webp; with
    /// several images PATH-0.EXT, PATH-1.EXT, …
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// Also print each image's fidelity score (layout agreement with the guide, see `lumen augment`).
    #[arg(long, env = "LUMEN_SCORE")]
    score: bool,
    /// Hide the progress bar.
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
}

impl SynthesizeArgs {
    /// The request these arguments make.
    fn request(&self, format: OutputFormat) -> SynthesisRequest {
        SynthesisRequest {
            prompt: Some(self.prompt.clone()),
            components: self.components,
            seed: self.seed,
            num_images: Some(self.num_images),
            format: Some(format.name().to_string()),
            score: Some(self.score),
            ..self.sampling.request()
        }
    }
}

pub fn run(a: SynthesizeArgs) -> Result<()> {
    let format = OutputFormat::from_extension(&a.out).ok_or_else(|| {
        Error::param(
            "out",
            format!(
                "`{}` must end in .png, .jpg, .jpeg or .webp",
                a.out.display()
            ),
        )
    })?;
    let request = a.request(format);
    if a.latents.is_some() && request.num_images() != 1 {
        return Err(Error::param(
            "latents",
            "given latents make one image; use --num-images 1",
        ));
    }
    let device = parse_device(&a.model.device)?;
    let precision = Precision::new(
        parse_dtype(&a.sampling.dtype, &device)?,
        a.sampling.vae_upcast,
    );
    let src = ModelSource::from_arg(a.model.models.clone());
    let specs = ModelSpecs::read(&src)?;
    let bounds = Bounds::new(&specs, Limits::default())?;
    // Every parameter is checked before any model loads.
    request.validate(&bounds)?;
    let bytes = std::fs::read(&a.image).map_err(|e| Error::io(&a.image, e))?;
    let img = guide::decode_named(&bytes, bounds.layout.max_image_pixels, &a.image)?.to_rgb8();
    let plan = request.resolve(&bounds, &GuideInfo::image(img.dimensions()))?;
    let latents = a.latents.as_ref().map(read_latents).transpose()?;

    // The layout first; the encoder is freed before the diffusion weights
    // load, unless it scores the images afterwards.
    let lm = LayoutModel::load_spec(&src, specs.layout, &device)?;
    let prepared = lm.prepare(&img, Some(plan.layout_size))?;
    let full = lm
        .layouts(&[(&prepared, bounds.layout.max_components)])?
        .pop()
        .ok_or_else(|| Error::Internal("no layout computed".into()))?;
    let key = guide_key(&bounds.model, plan.layout_size, &bytes);
    let mut record = plan.parameters(layout_id(&key, plan.components), &bounds.model);
    record.latents = a.latents.as_ref().map(|p| p.display().to_string());
    // The encoder stays loaded only to score the images afterwards.
    let scorer = plan.score.then_some(lm);
    let steps = plan.settings.steps as u64;

    let model = SynthesisModel::load_spec(&src, specs.synthesis, &device, precision)?;
    let mut gens = [Generation::start(&model, plan, Arc::new(full), latents)?];
    let bar = progress_bar(steps, a.quiet, "denoise");
    run_to_end(&model, &mut gens, &mut |step, _| {
        bar.set_position(step as u64)
    })?;
    bar.finish_and_clear();
    let [gen] = gens;
    let Generated { images, scores, .. } = gen.finish(&model, scorer.as_ref())?;
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or(format.name())
        .to_string();
    for (i, img) in images.iter().enumerate() {
        let path = if images.len() == 1 {
            a.out.clone()
        } else {
            let stem = a.out.with_extension("");
            PathBuf::from(format!("{}-{i}.{ext}", stem.display()))
        };
        let r = record.for_image(i);
        let bytes = format.encode(img, &r)?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        match scores.get(i) {
            Some(s) => println!("wrote {} (seed {}, score {s:.4})", path.display(), r.seed),
            None => println!("wrote {} (seed {})", path.display(), r.seed),
        }
    }
    Ok(())
}

/// `--latents`: tensor `latents` of a safetensors file, as f32.
fn read_latents(p: &PathBuf) -> Result<candle_core::Tensor> {
    let t = candle_core::safetensors::load(p, &Device::Cpu)
        .map_err(|e| Error::param("latents", format!("{}: {e}", p.display())))?;
    let l = t.get("latents").ok_or_else(|| {
        Error::param(
            "latents",
            format!("{} has no tensor `latents`", p.display()),
        )
    })?;
    Ok(l.to_dtype(DType::F32)?)
}
