//! 2-D convolution for f32 NCHW tensors on the CPU.
//!
//! candle 0.11 lowers a convolution to a full NHWC copy of the input, a
//! kernel repack and an im2col matrix on every call, then transposes the
//! product back to NCHW; in a VAE decode that bookkeeping (single-threaded
//! copies and page faults on freshly allocated buffers) costs more than the
//! arithmetic. Here the output stays NCHW and is written in place by `gemm`:
//! for each block of output rows, the im2col columns of just that block
//! (`[c_in·kh·kw, pixels]`, a few MB, one reused buffer per thread) are built
//! straight from NCHW with contiguous row copies, and
//! `out[:, block] = bias + weight · columns` runs on the gemm microkernels.
//! A 1×1, stride-1, unpadded convolution reads the input as the columns.
//! Blocks (and, for small images, slices of the output channels) run in
//! parallel on rayon's pool.
//!
//! 3×3 stride-1 convolutions over images of at least [`WINOGRAD_MIN_TILES`]
//! 2×2 output tiles (every 3×3 convolution of a UNet, ControlNet or VAE but
//! at the smallest resolutions) use Winograd's F(2×2, 3×3) instead: per
//! block of tiles, 4×4 input patches are transformed (Bᵀ·d·B), 16 GEMMs
//! `[c_out, c_in] × [c_in, tiles]` multiply them with the transformed kernel
//! (G·g·Gᵀ, computed per call so no second copy of the weights stays
//! resident), and each 4×4 product is folded back into a 2×2 output tile
//! (Aᵀ·m·A). That is 16 multiplications per 4 outputs where direct
//! convolution needs 36: 2.25× fewer, with transform matrices of 0, ±1 and
//! ±½ only, so the result stays within f32 rounding of the direct one.
//!
//! Results agree with the definition to f32 rounding (summation order
//! differs). Every decision depends on one image's shape only, never on the
//! batch size, so an image gives the same bits alone or in a batch.

use std::cell::RefCell;

use rayon::prelude::*;

thread_local! {
    /// Per-thread scratch buffers (im2col columns; Winograd's V and M), kept
    /// between calls: fresh multi-MB allocations cost page faults each time.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Run `f` with this thread's scratch buffers, each at least the given size.
fn with_scratch<R>(sizes: [usize; 3], f: impl FnOnce(&mut [Vec<f32>; 3]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut bufs = cell.borrow_mut();
        for (b, &n) in bufs.iter_mut().zip(&sizes) {
            if b.len() < n {
                b.resize(n, 0.0);
            }
        }
        f(&mut bufs)
    })
}

/// Output pixels per task, about: enough to amortise gemm's packing of the
/// weight, small enough for the columns to stay near the cache.
const PIXELS_PER_TASK: usize = 512;

/// Winograd needs at least this many 2×2 output tiles per image (32×32
/// outputs): below it, transforming the kernel costs more than the
/// multiplications save (measured at 320–1280 channels on 2 cores).
pub const WINOGRAD_MIN_TILES: usize = 256;

/// 2×2 output tiles per Winograd task, about.
const TILES_PER_TASK: usize = 256;

/// Shape and hyper-parameters of one convolution (groups = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl ConvShape {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.dilation * (self.kh - 1) - 1) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.dilation * (self.kw - 1) - 1) / self.stride + 1
    }

    /// Whether the input itself is the im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Whether this convolution runs as Winograd F(2×2, 3×3).
    pub fn uses_winograd(&self) -> bool {
        self.kh == 3
            && self.kw == 3
            && self.stride == 1
            && self.dilation == 1
            && self.out_h().div_ceil(2) * self.out_w().div_ceil(2) >= WINOGRAD_MIN_TILES
    }

    /// Whether the shape is valid (the output has at least one pixel).
    pub fn is_valid(&self) -> bool {
        self.stride > 0
            && self.dilation > 0
            && self.kh > 0
            && self.kw > 0
            && self.h + 2 * self.padding > self.dilation * (self.kh - 1)
            && self.w + 2 * self.padding > self.dilation * (self.kw - 1)
    }
}

/// A raw output pointer that tasks share; each task writes a disjoint block.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (channel range × pixel range) blocks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `x` [batch, c_in, h, w], `weight` [c_out, c_in, kh, kw], `bias` [c_out],
/// all contiguous; returns [batch, c_out, out_h, out_w].
pub fn conv2d_f32(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    assert!(s.is_valid(), "convolution shape {s:?}");
    let (oh, ow) = (s.out_h(), s.out_w());
    let k = s.c_in * s.kh * s.kw;
    assert_eq!(x.len(), s.batch * s.c_in * s.h * s.w, "input size");
    assert_eq!(weight.len(), s.c_out * k, "weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.c_out, "bias size");
    }
    if s.uses_winograd() {
        return winograd_f32(x, weight, bias, s);
    }
    let pixels = oh * ow;
    let mut out = Vec::<f32>::with_capacity(s.batch * s.c_out * pixels);
    let dst = OutPtr(out.as_mut_ptr());
    let tasks = split_tasks(s.batch, oh, (PIXELS_PER_TASK / ow.max(1)).max(1), s.c_out);
    tasks.into_par_iter().for_each(|(b, r0, rows, c0, nc)| {
        let n = rows * ow;
        let p0 = r0 * ow;
        let xb = &x[b * s.c_in * s.h * s.w..][..s.c_in * s.h * s.w];
        let cols_len = if s.is_pointwise() { 0 } else { k * n };
        with_scratch([cols_len, 0, 0], |[cols, _, _]| {
            // The columns [k, n]: row stride `rs`.
            let (rhs, rs): (*const f32, usize) = if s.is_pointwise() {
                (xb[p0..].as_ptr(), s.h * s.w)
            } else {
                im2col_rows(xb, s, r0, rows, ow, &mut cols[..k * n]);
                (cols.as_ptr(), n)
            };
            // SAFETY: this task's block of the output: channels c0..c0+nc of
            // image b, pixels p0..p0+n; written below before anything reads it.
            let out_ptr = unsafe { dst.get().add((b * s.c_out + c0) * pixels + p0) };
            if let Some(bias) = bias {
                for c in 0..nc {
                    // SAFETY: inside this task's block (row c, n pixels).
                    let row = unsafe { std::slice::from_raw_parts_mut(out_ptr.add(c * pixels), n) };
                    row.fill(bias[c0 + c]);
                }
            }
            // SAFETY: lhs is weight rows c0..c0+nc ([nc, k], row-major), rhs is
            // [k, n] with row stride rs, dst is [nc, n] with row stride
            // `pixels`; all in bounds by construction.
            unsafe {
                gemm_rows(
                    (nc, n, k),
                    (out_ptr, pixels),
                    bias.is_some(),
                    (weight[c0 * k..].as_ptr(), k),
                    (rhs, rs),
                )
            }
        })
    });
    // SAFETY: the tasks cover every (image, channel, pixel) exactly once and
    // each wrote its block (bias fill or gemm without read_dst).
    unsafe { out.set_len(s.batch * s.c_out * pixels) };
    out
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, single-threaded, all row-major
/// with the given row strides (elements); with `accumulate`, dst is added to.
///
/// # Safety
/// Each (pointer, row stride) must address a matrix of the given size.
unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_rs): (*const f32, usize),
    (rhs, rhs_rs): (*const f32, usize),
) {
    // SAFETY: forwarded to the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Tasks (image, first row, rows, first channel, channels) covering `batch`
/// images of `rows_total` rows (of output pixels, or of tiles) and `c_out`
/// channels. Small images also split their output channels, so that every
/// thread has work; decided per image, never from the batch size.
fn split_tasks(
    batch: usize,
    rows_total: usize,
    rows_per_task: usize,
    c_out: usize,
) -> Vec<(usize, usize, usize, usize, usize)> {
    let rows_per_task = rows_per_task.clamp(1, rows_total.max(1));
    let row_blocks = rows_total.div_ceil(rows_per_task);
    let threads = rayon::current_num_threads().max(1);
    let channel_splits = if row_blocks >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(row_blocks)
            .min(c_out.div_ceil(16))
            .max(1)
    };
    let per_split = c_out.div_ceil(channel_splits);
    let mut tasks = Vec::with_capacity(batch * row_blocks * channel_splits);
    for b in 0..batch {
        for rb in 0..row_blocks {
            let r0 = rb * rows_per_task;
            let rows = rows_per_task.min(rows_total - r0);
            for cs in 0..channel_splits {
                let c0 = cs * per_split;
                if c0 < c_out {
                    tasks.push((b, r0, rows, c0, per_split.min(c_out - c0)));
                }
            }
        }
    }
    tasks
}

/// U[e, co, ci] = (G·g·Gᵀ)[e], e over the 4×4 positions, for `weight`
/// [c_out, c_in, 3, 3].
fn winograd_kernel(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let plane = c_out * c_in;
    let mut u = vec![0f32; 16 * plane];
    let u_ptr = OutPtr(u.as_mut_ptr());
    (0..c_out).into_par_iter().for_each(|co| {
        for ci in 0..c_in {
            let g = &weight[(co * c_in + ci) * 9..][..9];
            // G·g: 4×3.
            let mut gg = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            for (r, row) in gg.iter().enumerate() {
                let v = [
                    row[0],
                    0.5 * (row[0] + row[1] + row[2]),
                    0.5 * (row[0] - row[1] + row[2]),
                    row[2],
                ];
                for (c, &val) in v.iter().enumerate() {
                    // SAFETY: index (e, co, ci) < 16·plane; each co is one task.
                    unsafe { *u_ptr.get().add((r * 4 + c) * plane + co * c_in + ci) = val };
                }
            }
        }
    });
    u
}

/// Winograd F(2×2, 3×3) (see the module docs); `s.uses_winograd()`.
fn winograd_f32(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    let (oh, ow) = (s.out_h(), s.out_w());
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let (c_in, c_out) = (s.c_in, s.c_out);
    let u = winograd_kernel(weight, c_out, c_in);
    let pixels = oh * ow;
    let mut out = Vec::<f32>::with_capacity(s.batch * c_out * pixels);
    let dst = OutPtr(out.as_mut_ptr());
    let tasks = split_tasks(s.batch, th, (TILES_PER_TASK / tw).max(1), c_out);
    tasks.into_par_iter().for_each(|(b, t0, trows, c0, nc)| {
        let n = trows * tw;
        let xb = &x[b * c_in * s.h * s.w..][..c_in * s.h * s.w];
        // Row scratch: 4 padded input rows, or 8 rows of tile values.
        let row_len = 2 * tw + 2;
        with_scratch([16 * c_in * n, 16 * nc * n, 8 * row_len], |[v, m, rows]| {
            let (v, m) = (&mut v[..16 * c_in * n], &mut m[..16 * nc * n]);
            winograd_input(xb, s, t0, trows, tw, v, &mut rows[..4 * row_len]);
            for e in 0..16 {
                // SAFETY: U[e] rows c0..c0+nc ([nc, c_in]), V[e] [c_in, n] and
                // M[e] [nc, n], all row-major and inside their buffers.
                unsafe {
                    gemm_rows(
                        (nc, n, c_in),
                        (m[e * nc * n..].as_mut_ptr(), n),
                        false,
                        (u[(e * c_out + c0) * c_in..].as_ptr(), c_in),
                        (v[e * c_in * n..].as_ptr(), n),
                    )
                }
            }
            // Aᵀ·m·A per tile, plus the bias, into this task's output block.
            let (t_a, t_b) = rows[..8 * tw].split_at_mut(4 * tw);
            for c in 0..nc {
                let co = c0 + c;
                let bv = bias.map_or(0.0, |b| b[co]);
                for ty in 0..trows {
                    let me = |e: usize| &m[(e * nc + c) * n + ty * tw..][..tw];
                    // Aᵀ·m: two rows of 4 columns, each `tw` tiles wide.
                    for col in 0..4 {
                        let (m0, m1, m2, m3) = (me(col), me(4 + col), me(8 + col), me(12 + col));
                        let (a, bb) = (&mut t_a[col * tw..][..tw], &mut t_b[col * tw..][..tw]);
                        for i in 0..tw {
                            a[i] = m0[i] + m1[i] + m2[i];
                            bb[i] = m1[i] - m2[i] - m3[i];
                        }
                    }
                    let oy = 2 * (t0 + ty);
                    for (r, t) in [&*t_a, &*t_b].into_iter().enumerate() {
                        if oy + r >= oh {
                            break;
                        }
                        // SAFETY: row oy + r < oh of channel co of image b
                        // belongs to this task only.
                        let out_row = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add((b * c_out + co) * pixels + (oy + r) * ow),
                                ow,
                            )
                        };
                        let (t0r, t1r, t2r, t3r) =
                            (&t[..tw], &t[tw..2 * tw], &t[2 * tw..3 * tw], &t[3 * tw..]);
                        let pairs = out_row.chunks_exact_mut(2);
                        let full = pairs.len();
                        for (i, pair) in pairs.enumerate() {
                            pair[0] = t0r[i] + t1r[i] + t2r[i] + bv;
                            pair[1] = t1r[i] - t2r[i] - t3r[i] + bv;
                        }
                        if full < tw {
                            out_row[2 * full] = t0r[full] + t1r[full] + t2r[full] + bv;
                        }
                    }
                }
            }
        })
    });
    // SAFETY: the tasks' tiles cover every output pixel of every channel of
    // every image exactly once.
    unsafe { out.set_len(s.batch * c_out * pixels) };
    out
}

/// Bᵀ·d·B of the 4×4 input patch of every tile in tile rows t0..t0+trows of
/// one image `xb` [c_in, h, w], into `v` [16, c_in, trows·tw]. `rows` is
/// scratch for 4 zero-padded input rows of 2·tw + 2 values.
fn winograd_input(
    xb: &[f32],
    s: ConvShape,
    t0: usize,
    trows: usize,
    tw: usize,
    v: &mut [f32],
    rows: &mut [f32],
) {
    let n = trows * tw;
    let row_len = 2 * tw + 2;
    let pad = s.padding as isize;
    // Input columns -pad .. -pad + row_len, clipped to the image.
    let j_lo = s.padding.min(row_len);
    let j_hi = ((s.w as isize + pad).max(0) as usize).min(row_len);
    for ci in 0..s.c_in {
        let plane = &xb[ci * s.h * s.w..][..s.h * s.w];
        for ty in 0..trows {
            let y0 = 2 * (t0 + ty) as isize - pad;
            // d rows 0..4, then Bᵀ·d in place: t0 = d0 − d2, t1 = d1 + d2,
            // t2 = d2 − d1, t3 = d1 − d3.
            for r in 0..4 {
                let row = &mut rows[r * row_len..][..row_len];
                let iy = y0 + r as isize;
                if iy < 0 || iy >= s.h as isize || j_lo >= j_hi {
                    row.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * s.w..][..s.w];
                row[..j_lo].fill(0.0);
                row[j_hi..].fill(0.0);
                row[j_lo..j_hi].copy_from_slice(&src[j_lo - s.padding..j_hi - s.padding]);
            }
            let (d01, d23) = rows[..4 * row_len].split_at_mut(2 * row_len);
            let (d0, d1) = d01.split_at_mut(row_len);
            let (d2, d3) = d23.split_at_mut(row_len);
            for j in 0..row_len {
                let (a, b, c, d) = (d0[j], d1[j], d2[j], d3[j]);
                d0[j] = a - c;
                d1[j] = b + c;
                d2[j] = c - b;
                d3[j] = b - d;
            }
            // ·B along each row: for tile tx, columns 2tx .. 2tx + 4.
            for (r, t) in [&*d0, &*d1, &*d2, &*d3].into_iter().enumerate() {
                let base = ty * tw;
                for c in 0..4 {
                    let dst = &mut v[((r * 4 + c) * s.c_in + ci) * n + base..][..tw];
                    match c {
                        0 => dst
                            .iter_mut()
                            .enumerate()
                            .for_each(|(i, o)| *o = t[2 * i] - t[2 * i + 2]),
                        1 => dst
                            .iter_mut()
                            .enumerate()
                            .for_each(|(i, o)| *o = t[2 * i + 1] + t[2 * i + 2]),
                        2 => dst
                            .iter_mut()
                            .enumerate()
                            .for_each(|(i, o)| *o = t[2 * i + 2] - t[2 * i + 1]),
                        _ => dst
                            .iter_mut()
                            .enumerate()
                            .for_each(|(i, o)| *o = t[2 * i + 1] - t[2 * i + 3]),
                    }
                }
            }
        }
    }
}

/// im2col of output rows r0..r0+rows of one image `xb` [c_in, h, w] into
/// `cols` [c_in·kh·kw, rows·ow] (zero where the window leaves the image).
fn im2col_rows(xb: &[f32], s: ConvShape, r0: usize, rows: usize, ow: usize, cols: &mut [f32]) {
    let n = rows * ow;
    let (h, w) = (s.h as isize, s.w as isize);
    let pad = s.padding as isize;
    for ci in 0..s.c_in {
        let plane = &xb[ci * s.h * s.w..][..s.h * s.w];
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let row = ((ci * s.kh + ky) * s.kw + kx) * n;
                let dst = &mut cols[row..row + n];
                let dx = (kx * s.dilation) as isize - pad;
                // Output columns whose input column is inside the image.
                let ox_lo = if dx >= 0 {
                    0
                } else {
                    ((-dx) as usize).div_ceil(s.stride)
                };
                let ox_hi = if w - dx <= 0 {
                    0
                } else {
                    (((w - dx - 1) as usize) / s.stride + 1).min(ow)
                };
                for r in 0..rows {
                    let d = &mut dst[r * ow..(r + 1) * ow];
                    let iy = ((r0 + r) * s.stride + ky * s.dilation) as isize - pad;
                    if iy < 0 || iy >= h || ox_lo >= ox_hi {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * s.w..][..s.w];
                    d[..ox_lo].fill(0.0);
                    d[ox_hi..].fill(0.0);
                    let ix0 = (ox_lo as isize * s.stride as isize + dx) as usize;
                    if s.stride == 1 {
                        d[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                    } else {
                        for (j, v) in d[ox_lo..ox_hi].iter_mut().enumerate() {
                            *v = src[ix0 + j * s.stride];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct definition of the convolution, in f64.
    fn naive(x: &[f32], wt: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
        let (oh, ow) = (s.out_h(), s.out_w());
        let mut out = vec![0f32; s.batch * s.c_out * oh * ow];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..s.c_in {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky * s.dilation) as isize
                                        - s.padding as isize;
                                    let ix = (ox * s.stride + kx * s.dilation) as isize
                                        - s.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.c_in + ci) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = wt[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * s.c_out + co) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_definition_for_every_stride_padding_and_kernel() {
        let cases = [
            // (batch, c_in, h, w, c_out, k, stride, padding, dilation)
            (2, 3, 9, 7, 5, 3, 1, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 1, 1),
            (1, 4, 9, 11, 3, 3, 2, 0, 1),
            (2, 5, 6, 6, 4, 1, 1, 0, 1),
            (1, 2, 10, 10, 3, 1, 2, 0, 1),
            (1, 3, 12, 5, 2, 5, 1, 2, 1),
            (1, 2, 9, 9, 3, 3, 1, 2, 2),
            (1, 3, 7, 33, 70, 3, 1, 1, 1),
            (3, 2, 40, 30, 2, 4, 4, 0, 1),
            (1, 1, 1, 1, 2, 3, 1, 1, 1),
            // Winograd (≥ 256 output tiles): odd sizes, padding 0 and 2,
            // several tile blocks and channel splits.
            (2, 5, 33, 35, 9, 3, 1, 1, 1),
            (1, 4, 36, 36, 6, 3, 1, 0, 1),
            (1, 3, 32, 32, 5, 3, 1, 2, 1),
            (1, 16, 70, 66, 40, 3, 1, 1, 1),
        ];
        let mut winograd_cases = 0;
        for (i, &(batch, c_in, h, w, c_out, k, stride, padding, dilation)) in
            cases.iter().enumerate()
        {
            let s = ConvShape {
                batch,
                c_in,
                h,
                w,
                c_out,
                kh: k,
                kw: k,
                stride,
                padding,
                dilation,
            };
            winograd_cases += usize::from(s.uses_winograd());
            let x = values(batch * c_in * h * w, i as u32);
            let wt = values(c_out * c_in * k * k, 100 + i as u32);
            let bias = values(c_out, 200 + i as u32);
            for bias in [None, Some(bias.as_slice())] {
                let got = conv2d_f32(&x, &wt, bias, s);
                let want = naive(&x, &wt, bias, s);
                assert_eq!(got.len(), want.len());
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "case {i} {s:?} bias {}: max error {err}",
                    bias.is_some()
                );
            }
        }
        assert_eq!(winograd_cases, 4, "the cases meant for Winograd use it");
    }

    #[test]
    fn the_same_image_gives_the_same_bits_alone_or_in_a_batch() {
        // Direct (20×40) and Winograd (40×40) convolutions.
        for (h, w) in [(20, 40), (40, 40)] {
            let s1 = ConvShape {
                batch: 1,
                c_in: 8,
                h,
                w,
                c_out: 64,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
                dilation: 1,
            };
            let s3 = ConvShape { batch: 3, ..s1 };
            let x = values(3 * 8 * h * w, 7);
            let wt = values(64 * 8 * 9, 8);
            let all = conv2d_f32(&x, &wt, None, s3);
            let (inp, per) = (8 * h * w, 64 * h * w);
            for b in 0..3 {
                let one = conv2d_f32(&x[b * inp..(b + 1) * inp], &wt, None, s1);
                assert!(one == all[b * per..(b + 1) * per], "{h}×{w} image {b}");
            }
        }
    }
}
