//! The PCA basis that turns encoder patch tokens into a K-channel neural
//! layout (the *semantic separation* step), stored as `pca.safetensors`:
//!
//! ```text
//! mean                [D]        mean patch token
//! components          [Kmax, D]  principal axes as rows, by descending variance
//! explained_variance  [Kmax]     variance along each axis
//! ```
//!
//! layout = (tokens − mean) · components[:K]ᵀ / sqrt(explained_variance[:K]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model_folder::ModelSource;

pub const PCA_FILE: &str = "pca.safetensors";

/// A PCA basis resident on a device.
pub struct Pca {
    mean: Tensor,
    components: Tensor,
    explained_variance: Tensor,
    /// `components / sqrt(explained_variance)` per row, `[Kmax, D]`.
    whitened: Tensor,
}

impl Pca {
    /// Build a basis from its three tensors, checking shapes and values.
    pub fn new(
        mean: Tensor,
        components: Tensor,
        explained_variance: Tensor,
        file: &str,
    ) -> Result<Self> {
        let bad = |m: String| Error::model_file(file, m);
        let mean = mean.to_dtype(DType::F32)?;
        let components = components.to_dtype(DType::F32)?;
        let explained_variance = explained_variance.to_dtype(DType::F32)?;
        let d = match mean.dims() {
            [d] => *d,
            s => return Err(bad(format!("tensor `mean` has shape {s:?}, expected [D]"))),
        };
        let kmax = match components.dims() {
            [k, dd] if *dd == d && *k > 0 => *k,
            s => {
                return Err(bad(format!(
                    "tensor `components` has shape {s:?}, expected [Kmax, {d}]"
                )))
            }
        };
        if explained_variance.dims() != [kmax] {
            return Err(bad(format!(
                "tensor `explained_variance` has shape {:?}, expected [{kmax}]",
                explained_variance.dims()
            )));
        }
        let ev = explained_variance
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        if let Some(i) = ev.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(bad(format!(
                "explained_variance[{i}] = {} must be finite and positive",
                ev[i]
            )));
        }
        let finite = |t: &Tensor| -> Result<bool> {
            Ok(t.to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite()))
        };
        if !finite(&mean)? || !finite(&components)? {
            return Err(bad("`mean` or `components` holds non-finite values".into()));
        }
        let whitened = components.broadcast_div(&explained_variance.sqrt()?.unsqueeze(1)?)?;
        Ok(Self {
            mean,
            components,
            explained_variance,
            whitened,
        })
    }

    /// Load `pca.safetensors` from a model folder onto `device`.
    pub fn load(src: &ModelSource, device: &Device) -> Result<Self> {
        let mut t = src.load_tensors(PCA_FILE, device)?;
        let file = src.path(PCA_FILE);
        let mut take = |name: &str| {
            t.remove(name)
                .ok_or_else(|| Error::model_file(&file, format!("missing tensor `{name}`")))
        };
        let mean = take("mean")?;
        let components = take("components")?;
        let ev = take("explained_variance")?;
        Self::new(mean, components, ev, &file)
    }

    /// Write the basis as `pca.safetensors` (f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let tensors = [
            ("mean", cpu(&self.mean)?),
            ("components", cpu(&self.components)?),
            ("explained_variance", cpu(&self.explained_variance)?),
        ];
        candle_core::safetensors::save(&tensors.into_iter().collect(), path)
            .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
    }

    /// Kmax: the most components a layout can keep.
    pub fn max_components(&self) -> usize {
        self.whitened.dims()[0]
    }

    /// D: the token width this basis expects.
    pub fn dim(&self) -> usize {
        self.mean.dims()[0]
    }

    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    pub fn components(&self) -> &Tensor {
        &self.components
    }

    pub fn explained_variance(&self) -> &Tensor {
        &self.explained_variance
    }

    /// Project tokens `[N, D]` onto the top `k` whitened components: `[N, k]`.
    pub fn project(&self, tokens: &Tensor, k: usize) -> Result<Tensor> {
        let kmax = self.max_components();
        if k == 0 || k > kmax {
            // Requests are checked against Kmax before they get here.
            return Err(Error::Internal(format!(
                "projection onto {k} components of a basis of {kmax}"
            )));
        }
        let centered = tokens.to_dtype(DType::F32)?.broadcast_sub(&self.mean)?;
        Ok(centered.matmul(&self.whitened.narrow(0, 0, k)?.t()?)?)
    }
}
