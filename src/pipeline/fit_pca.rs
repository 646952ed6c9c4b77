//! Fitting a PCA basis over the patch tokens of an image collection.
//!
//! Tokens are streamed: only the running sum and the D×D scatter matrix (f64)
//! are kept, never an N×D matrix. The result matches
//! `sklearn.decomposition.PCA(n_components=K).fit(tokens)`: eigenvectors of the
//! sample covariance (denominator N − 1) by descending eigenvalue, each signed
//! so that its largest-magnitude entry is positive (sklearn's `svd_flip` on
//! the components), `explained_variance` = the eigenvalues.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::LumenSettings;
use crate::error::{Error, Result};
use crate::guide;
use crate::models::dinov2::Dinov2;
use crate::models::pca::Pca;
use crate::pipeline::layout::{encode_guides, prepare_guide, PreparedGuide, MAX_ENCODER_BATCH};

/// Running first and second moments of a token stream.
pub struct PcaAccumulator {
    dim: usize,
    count: u64,
    /// Subtracted from every token before accumulating, to keep the scatter
    /// matrix well conditioned (the first batch's mean).
    shift: Option<Tensor>,
    sum: Tensor,
    scatter: Tensor,
}

impl PcaAccumulator {
    pub fn new(dim: usize) -> Result<Self> {
        Ok(Self {
            dim,
            count: 0,
            shift: None,
            sum: Tensor::zeros(dim, DType::F64, &Device::Cpu)?,
            scatter: Tensor::zeros((dim, dim), DType::F64, &Device::Cpu)?,
        })
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Add tokens `[N, D]` (any device, any float dtype).
    pub fn add(&mut self, tokens: &Tensor) -> Result<()> {
        let (n, d) = tokens.dims2()?;
        if d != self.dim {
            return Err(Error::Internal(format!(
                "token width {d}, expected {}",
                self.dim
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let x = tokens.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let shift = match &self.shift {
            Some(s) => s.clone(),
            None => {
                let s = x.mean(0)?;
                self.shift = Some(s.clone());
                s
            }
        };
        let x = x.broadcast_sub(&shift)?;
        self.sum = (&self.sum + x.sum(0)?)?;
        self.scatter = (&self.scatter + x.t()?.matmul(&x)?)?;
        self.count += n as u64;
        Ok(())
    }

    /// Eigendecompose the covariance and keep the top `k` axes.
    pub fn finish(&self, k: usize) -> Result<Pca> {
        let n = self.count;
        let d = self.dim;
        if n < 2 {
            return Err(Error::param(
                "images",
                format!("{n} patch tokens are too few to fit a PCA basis"),
            ));
        }
        if k == 0 || k as u64 > n.min(d as u64) {
            return Err(Error::param(
                "components",
                format!(
                    "{k} is out of range: with {n} tokens of width {d} at most {} components can be fitted",
                    n.min(d as u64)
                ),
            ));
        }
        let nf = n as f64;
        let m = (&self.sum / nf)?;
        let outer = m.unsqueeze(1)?.matmul(&m.unsqueeze(0)?)?;
        let cov = ((&self.scatter - (outer * nf)?)? / (nf - 1.0))?;
        let cov = cov.to_vec2::<f64>()?;
        let mat = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (cov[i][j] + cov[j][i]));
        let eig = mat
            .self_adjoint_eigen(faer::Side::Lower)
            .map_err(|e| Error::Internal(format!("eigendecomposition failed: {e:?}")))?;
        let values: Vec<f64> = eig.S().column_vector().iter().copied().collect();
        let vectors = eig.U();
        // faer sorts ascending; PCA wants descending.
        let mut components = Vec::with_capacity(k * d);
        let mut variance = Vec::with_capacity(k);
        for r in 0..k {
            let col = d - 1 - r;
            let v: Vec<f64> = (0..d).map(|i| vectors[(i, col)]).collect();
            let (mut imax, mut vmax) = (0, 0.0f64);
            for (i, x) in v.iter().enumerate() {
                if x.abs() > vmax {
                    vmax = x.abs();
                    imax = i;
                }
            }
            let sign = if v[imax] < 0.0 { -1.0 } else { 1.0 };
            components.extend(v.iter().map(|x| (x * sign) as f32));
            let ev = values[col];
            if ev.is_nan() || ev <= 0.0 {
                return Err(Error::param(
                    "components",
                    format!("only {r} components have positive variance over these images; ask for at most {r}"),
                ));
            }
            variance.push(ev as f32);
        }
        let shift = self.shift.as_ref().expect("count >= 2 implies a shift");
        let mean: Vec<f32> = (shift + m)?
            .to_vec1::<f64>()?
            .iter()
            .map(|v| *v as f32)
            .collect();
        Pca::new(
            Tensor::from_vec(mean, d, &Device::Cpu)?,
            Tensor::from_vec(components, (k, d), &Device::Cpu)?,
            Tensor::from_vec(variance, k, &Device::Cpu)?,
            "fitted basis",
        )
    }
}

/// Image files (PNG, JPEG, WebP by extension) directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .map(|e| {
                        matches!(
                            e.to_ascii_lowercase().as_str(),
                            "png" | "jpg" | "jpeg" | "webp"
                        )
                    })
                    .unwrap_or(false)
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What a fit saw.
#[derive(Debug)]
pub struct FitReport {
    pub images: usize,
    pub skipped: Vec<(PathBuf, String)>,
    pub tokens: u64,
}

/// Stream `files` through the encoder and fit a `k`-component basis.
/// Unreadable images are skipped and reported, not fatal.
pub fn fit_pca(
    encoder: &Dinov2,
    settings: &LumenSettings,
    files: &[PathBuf],
    k: usize,
    layout_size: Option<u32>,
    show_progress: bool,
) -> Result<(Pca, FitReport)> {
    let d = encoder.hidden_size();
    let layout_size = layout_size.unwrap_or(settings.layout_size);
    if k == 0 || k > d {
        return Err(Error::param(
            "components",
            format!("{k} is out of range: the encoder's tokens have width {d}"),
        ));
    }
    let bar = if show_progress {
        ProgressBar::new(files.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("fit-pca");
    let mut acc = PcaAccumulator::new(d)?;
    let mut report = FitReport {
        images: 0,
        skipped: Vec::new(),
        tokens: 0,
    };
    for chunk in files.chunks(MAX_ENCODER_BATCH) {
        let mut prepared: Vec<PreparedGuide> = Vec::with_capacity(chunk.len());
        for path in chunk {
            match guide::open(path, settings.max_image_pixels)
                .and_then(|img| prepare_guide(encoder, &img.to_rgb8(), layout_size))
            {
                Ok(p) => prepared.push(p),
                Err(e @ Error::InvalidParameter { .. }) => return Err(e),
                Err(e) => {
                    bar.println(format!("skipping {}: {e}", path.display()));
                    report.skipped.push((path.clone(), e.to_string()));
                }
            }
        }
        let refs: Vec<&PreparedGuide> = prepared.iter().collect();
        for tokens in encode_guides(encoder, &refs, MAX_ENCODER_BATCH)? {
            acc.add(&tokens)?;
        }
        report.images += prepared.len();
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    report.tokens = acc.count();
    if report.images == 0 {
        return Err(Error::param("images", "no readable image to fit on"));
    }
    Ok((acc.finish(k)?, report))
}
