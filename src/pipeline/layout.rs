//! Guide image → neural layout: resize and normalize on the host, run the
//! encoder over batches of same-sized inputs, project the patch tokens onto
//! the top K PCA components. No HTTP and no file formats beyond the layout's
//! own outputs.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::guide;
use crate::model_folder::ModelSource;
use crate::models::dinov2::Dinov2;
use crate::models::pca::Pca;
use crate::pipeline::spec::LayoutSpec;

pub use crate::guide::PreparedGuide;

/// Largest number of images one encoder call processes.
pub const MAX_ENCODER_BATCH: usize = 8;

/// The layout half of a model set, resident on one device.
pub struct LayoutModel {
    pub encoder: Dinov2,
    pub pca: Pca,
    spec: LayoutSpec,
}

/// A neural layout: `[K, rows, cols]` f32 on the host.
#[derive(Clone, Debug)]
pub struct Layout {
    pub data: Tensor,
    pub components: usize,
    pub grid: (usize, usize),
}

impl LayoutModel {
    /// Load encoder and PCA basis of a model folder onto `device` (in f32).
    pub fn load(src: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_spec(src, LayoutSpec::read(src)?, device)
    }

    /// [`Self::load`] with the spec already read (see [`crate::pipeline::spec::ModelSpecs`]).
    pub fn load_spec(src: &ModelSource, spec: LayoutSpec, device: &Device) -> Result<Self> {
        let encoder = Dinov2::load(src, device, DType::F32)?;
        let pca = Pca::load(src, device)?;
        Ok(Self { encoder, pca, spec })
    }

    /// What request handling needs to know about this model, as plain data.
    pub fn spec(&self) -> &LayoutSpec {
        &self.spec
    }

    /// Resize and normalize a decoded guide (host only; safe to run off the
    /// inference thread).
    pub fn prepare(&self, img: &RgbImage, layout_size: Option<u32>) -> Result<PreparedGuide> {
        self.spec.prepare(img, layout_size)
    }

    /// Patch tokens `[rows·cols, D]` for each guide (see [`encode_guides`]).
    pub fn encode(&self, guides: &[&PreparedGuide]) -> Result<Vec<Tensor>> {
        encode_guides(&self.encoder, guides, MAX_ENCODER_BATCH)
    }

    /// Project patch tokens onto the top `k` components: `[k, rows, cols]` on the host.
    pub fn project(&self, tokens: &Tensor, grid: (usize, usize), k: usize) -> Result<Layout> {
        let data = self
            .pca
            .project(tokens, k)?
            .t()?
            .reshape((k, grid.0, grid.1))?
            .to_device(&Device::Cpu)?;
        Ok(Layout {
            data,
            components: k,
            grid,
        })
    }

    /// Layouts for several guides, each with its own K, encoded in batches.
    pub fn layouts(&self, guides: &[(&PreparedGuide, usize)]) -> Result<Vec<Layout>> {
        self.layouts_batched(guides, MAX_ENCODER_BATCH)
    }

    /// [`Self::layouts`] with at most `max_batch` images per encoder call.
    pub fn layouts_batched(
        &self,
        guides: &[(&PreparedGuide, usize)],
        max_batch: usize,
    ) -> Result<Vec<Layout>> {
        let refs: Vec<&PreparedGuide> = guides.iter().map(|(g, _)| *g).collect();
        let tokens = encode_guides(&self.encoder, &refs, max_batch)?;
        tokens
            .iter()
            .zip(guides)
            .map(|(t, (g, k))| self.project(t, g.grid, *k))
            .collect()
    }
}

/// Resize and normalize a decoded guide for `encoder` at `layout_size`.
pub fn prepare_guide(encoder: &Dinov2, img: &RgbImage, layout_size: u32) -> Result<PreparedGuide> {
    guide::prepare_pixels(encoder.patch_size(), img, layout_size)
}

/// Patch tokens `[rows·cols, D]` for each guide. Guides with the same input
/// size run through the encoder together, up to `max_batch` at a time.
pub fn encode_guides(
    encoder: &Dinov2,
    guides: &[&PreparedGuide],
    max_batch: usize,
) -> Result<Vec<Tensor>> {
    let max_batch = max_batch.max(1);
    let mut out: Vec<Option<Tensor>> = vec![None; guides.len()];
    let mut groups: Vec<(&[usize], Vec<usize>)> = Vec::new();
    for (i, g) in guides.iter().enumerate() {
        let dims = g.pixels.dims();
        match groups
            .iter_mut()
            .find(|(d, idx)| *d == dims && idx.len() < max_batch)
        {
            Some((_, idx)) => idx.push(i),
            None => groups.push((dims, vec![i])),
        }
    }
    for (_, idx) in groups {
        let batch: Vec<Tensor> = idx.iter().map(|&i| guides[i].pixels.clone()).collect();
        let pixels = Tensor::stack(&batch, 0)?.to_device(encoder.device())?;
        let tokens = encoder.patch_tokens(&pixels)?;
        for (j, &i) in idx.iter().enumerate() {
            out[i] = Some(tokens.get(j)?);
        }
    }
    out.into_iter()
        .map(|t| t.ok_or_else(|| Error::Internal("a guide was not encoded".into())))
        .collect()
}

impl Layout {
    /// The first `k` components (a PCA projection onto k components is the
    /// first k rows of the projection onto more).
    pub fn truncate(&self, k: usize) -> Result<Layout> {
        if k == 0 || k > self.components {
            return Err(Error::param(
                "components",
                format!("{k} is out of range 1..={}", self.components),
            ));
        }
        Ok(Layout {
            data: self.data.narrow(0, 0, k)?,
            components: k,
            grid: self.grid,
        })
    }

    /// The ControlNet input for this layout at `width × height`: its K
    /// channels zero-padded to `kmax` and upsampled bilinearly
    /// (align_corners = false), `[kmax, height, width]` f32 on the host. The
    /// trainer builds the same tensor (tested against `lumen layout
    /// --conditioning`).
    pub fn conditioning(&self, kmax: usize, width: u32, height: u32) -> Result<Tensor> {
        let (k, gh, gw) = self.data.dims3()?;
        if k > kmax {
            return Err(Error::param(
                "components",
                format!("{k} is more than the {kmax} conditioning channels"),
            ));
        }
        let data = self.data.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let padded = if k < kmax {
            let zeros = Tensor::zeros((kmax - k, gh, gw), DType::F32, &Device::Cpu)?;
            Tensor::cat(&[&data, &zeros], 0)?
        } else {
            data
        };
        Ok(padded
            .unsqueeze(0)?
            .upsample_bilinear2d(height as usize, width as usize, false)?
            .squeeze(0)?)
    }

    /// The layout as safetensors bytes with one tensor, `layout` (f32 [K, h, w]).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let data = self.data.to_device(&Device::Cpu)?.contiguous()?;
        safetensors::serialize([("layout", &data)], None)
            .map_err(|e| Error::Internal(format!("cannot serialize the layout: {e}")))
    }

    /// Little-endian f32 values in `[K, h, w]` order.
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        let v = self.data.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Write the layout as safetensors with one tensor, `layout` (f32 [K, h, w]).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let map = [("layout".to_string(), self.data.clone())]
            .into_iter()
            .collect();
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
    }

    /// The preview picture at the guide's size.
    pub fn preview(&self, width: u32, height: u32) -> Result<RgbImage> {
        guide::preview(&self.data, width, height)
    }
}
