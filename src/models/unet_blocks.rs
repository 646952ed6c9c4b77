//! The UNet's down path, mid block and up blocks: candle-transformers'
//! public `ResnetBlock2D` and lumen's [`Transformer2D`], with every size
//! taken from [`UNetLayout`] — candle's own down/up blocks fix GroupNorm at
//! 32 groups, which real configs need not use. Shared by the UNet and the
//! ControlNet, whose down paths are identical.
//!
//! Keys: `down_blocks.N.{resnets.M, attentions.M, downsamplers.0.conv}`,
//! `mid_block.{resnets.M, attentions.0}`,
//! `up_blocks.N.{resnets.M, attentions.M, upsamplers.0.conv}`.

use super::nn::{conv2d, group_norm, Conv2d, GroupNorm};
use crate::models::resnet::{ResnetBlock2D, ResnetConfig};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use crate::models::transformer2d::Transformer2D;
use crate::models::unet_layout::{BlockLayout, UNetLayout};

type CResult<T> = candle_core::Result<T>;

fn resnet(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    l: &UNetLayout,
    scale: f64,
) -> CResult<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(l.time_embed_dim()),
            groups: l.norm_num_groups,
            eps: l.norm_eps,
            output_scale_factor: scale,
        },
    )
}

fn transformer(
    vb: VarBuilder,
    channels: usize,
    heads: usize,
    depth: usize,
    l: &UNetLayout,
) -> CResult<Transformer2D> {
    Transformer2D::new(&vb, channels, heads, depth, l)
}

/// A resnet followed, in cross-attention blocks, by a spatial transformer.
struct Layer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2D>,
}

impl Layer {
    fn forward(&self, x: &Tensor, temb: &Tensor, text: &Tensor) -> CResult<Tensor> {
        let x = self.resnet.forward(x, Some(temb))?;
        match &self.attention {
            Some(a) => a.forward(&x, text),
            None => Ok(x),
        }
    }
}

struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Conv2d>,
}

/// Timestep embedding, `conv_in`, down blocks and mid block.
pub struct DownPath {
    pub conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    blocks: Vec<DownBlock>,
    mid_first: ResnetBlock2D,
    mid_layers: Vec<(Transformer2D, ResnetBlock2D)>,
}

fn layers(
    vb: &VarBuilder,
    b: &BlockLayout,
    ins: &[usize],
    cout: usize,
    l: &UNetLayout,
) -> CResult<Vec<Layer>> {
    ins.iter()
        .enumerate()
        .map(|(j, &cin)| {
            Ok(Layer {
                resnet: resnet(vb.pp("resnets").pp(j), cin, cout, l, 1.0)?,
                attention: match b.cross_attn_layers {
                    Some(depth) => Some(transformer(
                        vb.pp("attentions").pp(j),
                        cout,
                        b.heads,
                        depth,
                        l,
                    )?),
                    None => None,
                },
            })
        })
        .collect()
}

impl DownPath {
    pub fn new(vb: &VarBuilder, l: &UNetLayout) -> CResult<Self> {
        let c0 = l.blocks[0].out_channels;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(l.in_channels, c0, 3, pad1, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(c0, l.flip_sin_to_cos, l.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), c0, l.time_embed_dim())?;
        let n = l.blocks.len();
        let mut blocks = Vec::with_capacity(n);
        for (i, b) in l.blocks.iter().enumerate() {
            let cin = if i == 0 {
                c0
            } else {
                l.blocks[i - 1].out_channels
            };
            let vbi = vb.pp("down_blocks").pp(i);
            let ins: Vec<usize> = (0..l.layers_per_block)
                .map(|j| if j == 0 { cin } else { b.out_channels })
                .collect();
            let downsampler = if i < n - 1 {
                let cfg = Conv2dConfig {
                    padding: l.downsample_padding,
                    stride: 2,
                    ..Default::default()
                };
                Some(conv2d(
                    b.out_channels,
                    b.out_channels,
                    3,
                    cfg,
                    vbi.pp("downsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            blocks.push(DownBlock {
                layers: layers(&vbi, b, &ins, b.out_channels, l)?,
                downsampler,
            });
        }
        let last = l.blocks.last().expect("at least one block");
        let c = last.out_channels;
        let vm = vb.pp("mid_block");
        let mid_first = resnet(vm.pp("resnets").pp(0), c, c, l, l.mid_block_scale_factor)?;
        let mid_layers = vec![(
            transformer(
                vm.pp("attentions").pp(0),
                c,
                last.heads,
                l.mid_transformer_layers,
                l,
            )?,
            resnet(vm.pp("resnets").pp(1), c, c, l, l.mid_block_scale_factor)?,
        )];
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            blocks,
            mid_first,
            mid_layers,
        })
    }

    /// The time embedding of each batch row: `[1, C]` when every row shares
    /// one timestep (broadcast over the batch by the resnets), else `[B, C]`.
    /// Each distinct timestep is embedded as one row of its own: a fixed
    /// shape keeps the result independent of the batch and of its other
    /// rows (gemm takes other paths for other row counts), so an image gets
    /// the same bits alone or beside items at other steps.
    pub fn time(&self, timesteps: &[f64], like: &Tensor) -> CResult<Tensor> {
        // The sinusoidal projection runs in f32 and is cast to the model's
        // dtype only after it, as diffusers does: in f16 the timestep itself
        // rounds (Euler's fractional steps) and the phase at t near 1000
        // errs by up to half a radian.
        let one = |t: f64| -> CResult<Tensor> {
            let t = (Tensor::ones(1, DType::F32, like.device())? * t)?;
            let projected = self.time_proj.forward(&t)?.to_dtype(like.dtype())?;
            self.time_embedding.forward(&projected)
        };
        let Some(&first) = timesteps.first() else {
            candle_core::bail!("no timestep for the batch");
        };
        if timesteps.iter().all(|&t| t == first) {
            return one(first);
        }
        let mut distinct: Vec<(f64, Tensor)> = Vec::new();
        let mut rows = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let row = match distinct.iter().find(|(d, _)| *d == t) {
                Some((_, r)) => r.clone(),
                None => {
                    let r = one(t)?;
                    distinct.push((t, r.clone()));
                    r
                }
            };
            rows.push(row);
        }
        Tensor::cat(&rows, 0)
    }

    /// Run the down blocks and the mid block on `x` (already through
    /// `conv_in`, plus any conditioning). Returns the mid output and every
    /// skip connection (the input first).
    pub fn forward(
        &self,
        x: Tensor,
        temb: &Tensor,
        text: &Tensor,
    ) -> CResult<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![x.clone()];
        let mut x = x;
        for block in &self.blocks {
            for layer in &block.layers {
                x = layer.forward(&x, temb, text)?;
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsampler {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_first.forward(&x, Some(temb))?;
        for (attn, res) in &self.mid_layers {
            x = res.forward(&attn.forward(&x, text)?, Some(temb))?;
        }
        Ok((x, skips))
    }
}

struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Conv2d>,
}

/// The up blocks, `conv_norm_out` and `conv_out`.
pub struct UpPath {
    blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UpPath {
    pub fn new(vb: &VarBuilder, l: &UNetLayout, out_channels: usize) -> CResult<Self> {
        let n = l.blocks.len();
        let rev: Vec<&BlockLayout> = l.blocks.iter().rev().collect();
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut blocks = Vec::with_capacity(n);
        let mut prev_out = rev[0].out_channels;
        for i in 0..n {
            let b = rev[i];
            let cout = b.out_channels;
            let skip_in = rev[(i + 1).min(n - 1)].out_channels;
            let num = l.layers_per_block + 1;
            let ins: Vec<usize> = (0..num)
                .map(|j| {
                    let res_in = if j == 0 { prev_out } else { cout };
                    let skip = if j == num - 1 { skip_in } else { cout };
                    res_in + skip
                })
                .collect();
            let vbi = vb.pp("up_blocks").pp(i);
            let upsampler = if i < n - 1 {
                Some(conv2d(
                    cout,
                    cout,
                    3,
                    pad1,
                    vbi.pp("upsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            blocks.push(UpBlock {
                layers: layers(&vbi, b, &ins, cout, l)?,
                upsampler,
            });
            prev_out = cout;
        }
        let c0 = l.blocks[0].out_channels;
        Ok(Self {
            blocks,
            norm_out: group_norm(l.norm_num_groups, c0, l.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(c0, out_channels, 3, pad1, vb.pp("conv_out"))?,
        })
    }

    /// Consume the skip connections from the end, upsampling between blocks.
    pub fn forward(
        &self,
        x: Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        text: &Tensor,
    ) -> CResult<Tensor> {
        let mut x = x;
        for block in &self.blocks {
            for layer in &block.layers {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("ran out of skip connections".into()))?;
                x = layer.forward(&Tensor::cat(&[&x, &skip], 1)?, temb, text)?;
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the skip this block's successor consumes.
                let (h, w) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (2 * x.dim(2)?, 2 * x.dim(3)?),
                };
                x = up.forward(&x.upsample_nearest2d(h, w)?)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
