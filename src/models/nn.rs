//! Small building blocks shared by the models.

use candle_core::{Module, Result, Tensor};

/// `nn.Linear` with its weight kept transposed (`[in, out]`, contiguous):
/// a row-major right-hand side runs markedly faster in candle's CPU gemm
/// than the strided transpose of the checkpoint's `[out, in]` layout.
#[derive(Clone, Debug)]
pub struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a checkpoint weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// Stack several linears that read the same input into one (outputs concatenated).
    pub fn stack(parts: &[Linear]) -> Result<Self> {
        let w: Vec<&Tensor> = parts.iter().map(|l| &l.weight_t).collect();
        let weight_t = Tensor::cat(&w, 1)?;
        let bias = if parts.iter().any(|l| l.bias.is_some()) {
            let b = parts
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.out_dim(), l.weight_t.dtype(), l.weight_t.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        Ok(Self { weight_t, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.weight_t.dims()[1]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight_t)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim();
        y.reshape(out_dims)
    }
}

/// The activations transformers configs name in `hidden_act`.
#[derive(Clone, Copy, Debug)]
pub enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
    Silu,
    QuickGelu,
}

impl Activation {
    /// Parse a transformers `hidden_act` name.
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            "quick_gelu" => Self::QuickGelu,
            other => return Err(format!("bad config: unsupported hidden_act `{other}`")),
        })
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// `nn.Linear(in_dim, out_dim, bias)` from a checkpoint (`weight` [out, in],
/// optional `bias` [out]).
pub fn linear(
    w: &crate::model_folder::Weights,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> crate::Result<Linear> {
    let (weight, bias) = w.linear_parts(in_dim, out_dim, bias)?;
    Ok(Linear::new(weight, bias)?)
}
