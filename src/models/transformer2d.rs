//! diffusers' `Transformer2DModel` with `BasicTransformerBlock`s — the
//! spatial transformer inside the UNet's and ControlNet's cross-attention
//! blocks. Written here rather than taken from candle-transformers because
//! candle's feed-forward uses the tanh approximation of GELU where diffusers'
//! GEGLU uses the exact one, and so that attention runs through lumen's fused
//! kernel (bounded memory).
//!
//! Keys, under `…attentions.N`:
//!
//! ```text
//! norm                                   GroupNorm (eps 1e-6)
//! proj_in, proj_out                      1×1 conv, or linear with use_linear_projection
//! transformer_blocks.M.norm{1,2,3}       LayerNorm (eps 1e-5)
//! transformer_blocks.M.attn1.to_{q,k,v}  self-attention (no bias), to_out.0 (bias)
//! transformer_blocks.M.attn2.to_{q,k,v}  cross-attention on the text embeddings
//! transformer_blocks.M.ff.net.0.proj     GEGLU: C → 2·4C, value · gelu(gate)
//! transformer_blocks.M.ff.net.2          4C → C
//! ```

use super::nn::{conv2d, Conv2d};
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::models::attention;
use crate::models::nn::{group_norm, linear_vb as linear, GroupNorm, Linear};
use crate::models::unet_layout::UNetLayout;

fn layer_norm(vb: &VarBuilder, dim: usize) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(dim, "weight")?,
        vb.get(dim, "bias")?,
        1e-5,
    ))
}

struct Attention {
    q: Linear,
    kv: Linear,
    out: Linear,
    heads: usize,
    /// Self-attention reads keys and values from its own input.
    cross: bool,
    /// Scores and softmax in f32 (`upcast_attention`).
    upcast: bool,
}

impl Attention {
    fn new(
        vb: &VarBuilder,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        let cdim = context_dim.unwrap_or(dim);
        Ok(Self {
            q: linear(&vb.pp("to_q"), dim, dim, false)?,
            kv: Linear::stack(&[
                linear(&vb.pp("to_k"), cdim, dim, false)?,
                linear(&vb.pp("to_v"), cdim, dim, false)?,
            ])?,
            out: linear(&vb.pp("to_out").pp(0), dim, dim, true)?,
            heads,
            cross: context_dim.is_some(),
            upcast,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let q = attention::split_heads(&self.q.forward(x)?, self.heads)?;
        let kv = self.kv.forward(if self.cross { context } else { x })?;
        let k = attention::split_heads(&kv.narrow(2, 0, d)?, self.heads)?;
        let v = attention::split_heads(&kv.narrow(2, d, d)?, self.heads)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let a = attention::sdpa_upcast(&q, &k, &v, scale, self.upcast)?;
        self.out.forward(&attention::merge_heads(&a)?)
    }
}

struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    inner: usize,
}

impl Block {
    fn new(
        vb: &VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: layer_norm(&vb.pp("norm1"), dim)?,
            attn1: Attention::new(&vb.pp("attn1"), dim, None, heads, upcast)?,
            norm2: layer_norm(&vb.pp("norm2"), dim)?,
            attn2: Attention::new(&vb.pp("attn2"), dim, Some(context_dim), heads, upcast)?,
            norm3: layer_norm(&vb.pp("norm3"), dim)?,
            ff_in: linear(
                &vb.pp("ff").pp("net").pp(0).pp("proj"),
                dim,
                2 * inner,
                true,
            )?,
            ff_out: linear(&vb.pp("ff").pp("net").pp(2), inner, dim, true)?,
            inner,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, context)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + &x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let value = h.narrow(2, 0, self.inner)?;
        let gate = h.narrow(2, self.inner, self.inner)?;
        let h = self.ff_out.forward(&(value * gate.gelu_erf()?)?)?;
        h + x
    }
}

enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// A spatial transformer over `[B, C, H, W]` feature maps.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<Block>,
    proj_out: Proj,
}

impl Transformer2D {
    /// Norm groups, context width, projection kind and attention upcast
    /// come from the UNet's layout.
    pub fn new(
        vb: &VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        l: &UNetLayout,
    ) -> Result<Self> {
        let linear_projection = l.use_linear_projection;
        let proj = |name: &str| -> Result<Proj> {
            Ok(if linear_projection {
                Proj::Linear(linear(&vb.pp(name), channels, channels, true)?)
            } else {
                Proj::Conv(conv2d(
                    channels,
                    channels,
                    1,
                    Default::default(),
                    vb.pp(name),
                )?)
            })
        };
        Ok(Self {
            norm: group_norm(l.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    Block::new(
                        &vb.pp("transformer_blocks").pp(i),
                        channels,
                        l.cross_attention_dim,
                        heads,
                        l.upcast_attention,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&n)?)?,
            Proj::Linear(l) => l.forward(&to_tokens(&n)?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let y = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_map(&t)?)?,
            Proj::Linear(l) => to_map(&l.forward(&t)?)?,
        };
        y + x
    }
}
