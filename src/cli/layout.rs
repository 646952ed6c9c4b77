//! `lumen layout` and `lumen fit-pca`.

use std::path::PathBuf;

use candle_core::DType;
use clap::Args;

use super::{check_extension, ModelArgs};
use crate::config::parse_device;
use crate::error::{Error, Result};
use crate::guide;
use crate::model_folder::ModelSource;
use crate::models::dinov2::Dinov2;
use crate::pipeline::fit_pca::{fit_pca, list_images};
use crate::pipeline::layout::LayoutModel;
use crate::pipeline::request::{check_layout_size_within, LayoutBounds, LayoutRequest, Limits};
use crate::pipeline::spec::LayoutSpec;

#[derive(Args)]
pub struct LayoutArgs {
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
    /// Also write tensor `conditioning` (f32 [Kmax, H, W]): what the ControlNet
    /// gets for this layout at an output of WIDTHxHEIGHT (.safetensors only).
    #[arg(long, env = "LUMEN_CONDITIONING", value_name = "WIDTHxHEIGHT")]
    conditioning: Option<String>,
}

/// `WIDTHxHEIGHT` → (width, height), both positive.
fn parse_size(s: &str) -> Result<(u32, u32)> {
    let bad = || Error::param("conditioning", format!("`{s}` is not WIDTHxHEIGHT"));
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h) = (
        w.trim().parse::<u32>().map_err(|_| bad())?,
        h.trim().parse::<u32>().map_err(|_| bad())?,
    );
    if w == 0 || h == 0 || w > 8192 || h > 8192 {
        return Err(bad());
    }
    Ok((w, h))
}

#[derive(Args)]
pub struct FitPcaArgs {
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

pub fn run_layout(a: LayoutArgs) -> Result<()> {
    let ext = check_extension(&a.out, &["safetensors", "png"])?;
    let conditioning = a.conditioning.as_deref().map(parse_size).transpose()?;
    if conditioning.is_some() && ext != "safetensors" {
        return Err(Error::param(
            "conditioning",
            "is written into a .safetensors output",
        ));
    }
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    let request = LayoutRequest {
        components: a.components,
        layout_size: a.layout_size,
    };
    let bounds = LayoutBounds::new(&LayoutSpec::read(&src)?, &Limits::default())?;
    let (k, layout_size) = request.resolve(&bounds)?;
    let img = guide::open(&a.image, bounds.max_image_pixels)?.to_rgb8();
    let model = LayoutModel::load(&src, &device)?;
    let prepared = model.prepare(&img, Some(layout_size))?;
    let layout = model
        .layouts(&[(&prepared, k)])?
        .pop()
        .ok_or_else(|| Error::Internal("no layout computed".into()))?;
    if ext == "png" {
        let (w, h) = prepared.source_size;
        layout
            .preview(w, h)?
            .save(&a.out)
            .map_err(|e| Error::io(&a.out, std::io::Error::other(e)))?;
    } else {
        let mut tensors = vec![("layout".to_string(), layout.data.clone())];
        if let Some((w, h)) = conditioning {
            let kmax = model.spec().max_components;
            tensors.push(("conditioning".into(), layout.conditioning(kmax, w, h)?));
        }
        let map = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, &a.out)
            .map_err(|e| Error::io(&a.out, std::io::Error::other(e.to_string())))?;
    }
    println!(
        "wrote layout K={k} grid {}x{} to {}",
        layout.grid.0,
        layout.grid.1,
        a.out.display()
    );
    Ok(())
}

pub fn run_fit_pca(a: FitPcaArgs) -> Result<()> {
    check_extension(&a.out, &["safetensors"])?;
    let device = parse_device(&a.model.device)?;
    let src = ModelSource::from_arg(a.model.models);
    // The basis is what is being made: the folder's own (if any) is not read.
    let settings = crate::config::LumenSettings::load(&src)?;
    let encoder = Dinov2::load(&src, &device, DType::F32)?;
    let layout_size = check_layout_size_within(
        a.layout_size.unwrap_or(settings.layout_size),
        encoder.patch_size() as u32,
        Limits::default().max_layout_size,
    )?;
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
        Some(layout_size),
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
