//! [`Weights`]: one component's checkpoint, viewed by key prefix.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// A view into one component's checkpoint. Paths mirror the checkpoint keys
/// (`w.pp("encoder").pp("layer").pp(3).get(...)`), and every failure names the
/// file and the full tensor key.
#[derive(Clone)]
pub struct Weights {
    vb: VarBuilder<'static>,
    file: String,
}

impl Weights {
    pub(super) fn new(vb: VarBuilder<'static>, file: String) -> Self {
        Self { vb, file }
    }

    /// Descend into a sub-module (`encoder`, `layer`, `3`, …).
    pub fn pp(&self, name: impl ToString) -> Weights {
        Weights {
            vb: self.vb.pp(name),
            file: self.file.clone(),
        }
    }

    /// The tensor `name` under the current prefix, checked against `shape`.
    pub fn get(&self, shape: impl Into<candle_core::Shape>, name: &str) -> Result<Tensor> {
        self.vb
            .get(shape, name)
            .map_err(|e| Error::model_file(&self.file, candle_message(&e)))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// The checkpoint's file name, as errors give it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The underlying candle `VarBuilder`, for candle's own building blocks.
    /// Errors from it should be mapped with [`Weights::wrap`].
    pub fn vb(&self) -> &VarBuilder<'static> {
        &self.vb
    }

    /// Attach this checkpoint's file name to a loading error.
    pub fn wrap(&self, e: candle_core::Error) -> Error {
        Error::model_file(&self.file, candle_message(&e))
    }

    /// The `weight` [out, in] and optional `bias` [out] of an `nn.Linear`,
    /// as transformers and diffusers store them.
    pub fn linear_parts(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.get((out_dim, in_dim), "weight")?;
        let b = if bias {
            Some(self.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok((w, b))
    }

    /// `nn.LayerNorm(dim, eps)` with affine `weight` and `bias`.
    pub fn layer_norm(&self, dim: usize, eps: f64) -> Result<candle_nn::LayerNorm> {
        let w = self.get(dim, "weight")?;
        let b = self.get(dim, "bias")?;
        Ok(candle_nn::LayerNorm::new(w, b, eps))
    }
}

/// A candle error's message without backtrace noise.
pub fn candle_message(e: &candle_core::Error) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().to_string()
}
