//! `lumen layouts`: export the layouts of an image folder as training data.

use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;
use crate::config::parse_device;
use crate::dataset::ImageFolder;
use crate::error::{Error, Result};
use crate::jobs::layouts::{export_layouts, summary, LayoutsOptions, Manifest, FORMAT};
use crate::model_folder::ModelSource;
use crate::models::pca::PCA_FILE;
use crate::pipeline::layout::LayoutModel;
use crate::pipeline::request::{LayoutBounds, LayoutRequest, Limits};
use crate::pipeline::spec::LayoutSpec;

#[derive(Args)]
pub struct LayoutsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image folder, searched recursively (PNG, JPEG, WebP); captions from a
    /// Hugging Face metadata.jsonl (`file_name`, `text`) or a NAME.txt beside NAME.png.
    #[arg(long, env = "LUMEN_IMAGES")]
    images: PathBuf,
    /// Output folder: shard-NNNNN.safetensors (f16 [Kmax, h, w] per image), index.jsonl,
    /// dataset.json. A rerun continues an interrupted export.
    #[arg(long, short = 'o', env = "LUMEN_OUT")]
    out: PathBuf,
    /// Longer side, in pixels, of the image fed to the encoder; default from lumen.json (518).
    #[arg(long, env = "LUMEN_LAYOUT_SIZE")]
    layout_size: Option<u32>,
    /// Images per encoder call.
    #[arg(long, env = "LUMEN_BATCH", default_value_t = 8)]
    batch: usize,
    /// Images per shard.
    #[arg(long, env = "LUMEN_SHARD_SIZE", default_value_t = 1000)]
    shard_size: usize,
    /// Hide the progress bar.
    #[arg(long, env = "LUMEN_QUIET")]
    quiet: bool,
}

pub fn run(a: LayoutsArgs) -> Result<()> {
    for (name, v) in [("batch", a.batch), ("shard_size", a.shard_size)] {
        if v == 0 {
            return Err(Error::param(name, "must be at least 1"));
        }
    }
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models.clone());
    let spec = LayoutSpec::read(&src)?;
    let bounds = LayoutBounds::new(&spec, &Limits::default())?;
    let (_, layout_size) = LayoutRequest {
        components: None,
        layout_size: a.layout_size,
    }
    .resolve(&bounds)?;
    let folder = ImageFolder::scan(&a.images, Some(&a.out))?;
    if folder.images.is_empty() {
        return Err(Error::param(
            "images",
            format!("{} holds no PNG, JPEG or WebP file", a.images.display()),
        ));
    }
    let mut encoder_files = vec!["encoder/config.json".to_string()];
    encoder_files.extend(src.weight_files("encoder", "model")?);
    let manifest = Manifest {
        format: FORMAT.into(),
        model: src.identity()?,
        encoder_sha256: src.sha256(&encoder_files)?,
        pca_sha256: src.sha256(&[PCA_FILE.to_string()])?,
        layout_size,
        components: spec.max_components,
        dtype: "f16".into(),
        shard_size: a.shard_size,
        files: folder.images.iter().map(|e| e.rel.clone()).collect(),
        lumen_version: env!("CARGO_PKG_VERSION").into(),
    };
    let model = LayoutModel::load(&src, &device)?;
    let report = export_layouts(
        &model,
        &folder,
        &manifest,
        &LayoutsOptions {
            out: a.out.clone(),
            layout_size,
            batch: a.batch,
            shard_size: a.shard_size,
            max_image_pixels: bounds.max_image_pixels,
            progress: !a.quiet,
        },
    )?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary(&report))
            .map_err(|e| Error::Internal(e.to_string()))?
    );
    Ok(())
}
