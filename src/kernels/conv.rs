//! `k x k` convolutions with stride 1 and 'same' zero padding (`k` odd: the networks' 3x3
//! and 1x1): the forward pass and both gradients.
//!
//! One work item is a band of output rows of one image: its columns (im2col, a shifted
//! copy of each input row) go to a buffer of the item's own, and one GEMM multiplies the
//! weights, as stored (`[co, ci*k*k]`), into the output rows, written in place in NCHW.
//! A 1x1 convolution needs no columns: the GEMM reads the input where it lies.

use rayon::prelude::*;

use super::gemm::{Mat, gemm, gemm_ptr, mat};
use super::{Nchw, REDUCE_GROUPS, Shared, band, filled, reduce_in_order, scratch, with_scratch};

/// Floats a band's column buffer aims at (128 KiB: it and the GEMM's packed panels stay
/// in L2; larger bands measured slower on a Zen 3 core).
const TILE_FLOATS: usize = 32 * 1024;
/// Pixels a band has at least (narrower GEMMs lose to their own overheads).
const MIN_TILE_PX: usize = 256;

/// Output rows per band for columns `depth` deep on rows `w` wide (at most `h`).
pub(super) fn band_rows(depth: usize, h: usize, w: usize) -> usize {
    let px = (TILE_FLOATS / depth.max(1)).max(MIN_TILE_PX);
    px.div_ceil(w.max(1)).clamp(1, h.max(1))
}

/// The (image, band) items of a batch: item `i` is image `i / bands`, rows
/// `r0..r1` of band `i % bands`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bands {
    pub rows: usize,
    pub count: usize,
    pub h: usize,
}

impl Bands {
    pub fn new(rows: usize, h: usize) -> Self {
        Bands {
            rows,
            count: h.div_ceil(rows),
            h,
        }
    }

    /// (image, first row, end row) of item `i`.
    pub fn item(&self, i: usize) -> (usize, usize, usize) {
        let (n, b) = (i / self.count, i % self.count);
        (n, b * self.rows, ((b + 1) * self.rows).min(self.h))
    }
}

/// A work item of a convolution: rows `r0..r1` of images `n0..n1` (a band of one image,
/// or several whole small images, whose columns then sit side by side).
#[derive(Debug, Clone, Copy)]
struct Item {
    n0: usize,
    n1: usize,
    r0: usize,
    r1: usize,
}

/// How a batch is cut into [`Item`]s: by its shape alone, never by the thread count.
#[derive(Debug, Clone, Copy)]
struct Tiling {
    bands: Bands,
    /// Images per item (more than one only when a band is a whole image).
    imgs: usize,
    n: usize,
}

impl Tiling {
    /// Bands of columns `depth` deep; small images grouped so an item has at least
    /// [`MIN_TILE_PX`] pixels, keeping two items or more for two threads.
    fn new(depth: usize, s: Nchw) -> Self {
        let rows = band_rows(depth, s.h, s.w);
        let imgs = if rows >= s.h {
            (MIN_TILE_PX / s.plane().max(1)).clamp(1, (s.n / 2).max(1))
        } else {
            1
        };
        Tiling::with(rows, imgs, s)
    }

    fn with(rows: usize, imgs: usize, s: Nchw) -> Self {
        let bands = Bands::new(rows, s.h);
        let imgs = if bands.count == 1 { imgs.max(1) } else { 1 };
        Tiling {
            bands,
            imgs,
            n: s.n,
        }
    }

    fn count(&self) -> usize {
        if self.imgs > 1 {
            self.n.div_ceil(self.imgs)
        } else {
            self.n * self.bands.count
        }
    }

    fn item(&self, i: usize) -> Item {
        if self.imgs > 1 {
            let n0 = i * self.imgs;
            Item {
                n0,
                n1: (n0 + self.imgs).min(self.n),
                r0: 0,
                r1: self.bands.h,
            }
        } else {
            let (n, r0, r1) = self.bands.item(i);
            Item {
                n0: n,
                n1: n + 1,
                r0,
                r1,
            }
        }
    }
}

/// Columns of output rows `r0..r1` of one image `x` (`c x h x w`): row `(ci, dy, dx)`,
/// at `col[row * ld..]`, `(r1 - r0) * w` long, holds `x[ci, r + dy - p, j + dx - p]`,
/// zero outside the image.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r0: usize,
    r1: usize,
    col: &mut [f32],
    ld: usize,
) {
    let p = k / 2;
    let px = (r1 - r0) * w;
    let mut row = 0;
    for plane in x[..c * h * w].chunks_exact(h * w) {
        for dy in 0..k {
            for dx in 0..k {
                let dst = &mut col[row * ld..][..px];
                row += 1;
                for (out, r) in dst.chunks_exact_mut(w).zip(r0..r1) {
                    // Source row r + dy - p, if inside the image.
                    let Some(sr) = (r + dy).checked_sub(p).filter(|&sr| sr < h) else {
                        out.fill(0.0);
                        continue;
                    };
                    let src = &plane[sr * w..(sr + 1) * w];
                    // out[j] = src[j + dx - p]
                    if dx >= p {
                        let s = (dx - p).min(w);
                        out[..w - s].copy_from_slice(&src[s..]);
                        out[w - s..].fill(0.0);
                    } else {
                        let s = (p - dx).min(w);
                        out[..s].fill(0.0);
                        out[s..].copy_from_slice(&src[..w - s]);
                    }
                }
            }
        }
    }
}

/// The columns of an item, `depth x px` (images side by side), at the start of `buf`.
fn item_columns<'a>(
    x: &[f32],
    s: Nchw,
    k: usize,
    it: Item,
    buf: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let plane = s.plane();
    let band = (it.r1 - it.r0) * s.w;
    let px = (it.n1 - it.n0) * band;
    let col = scratch(buf, s.c * k * k * px);
    for (i, n) in (it.n0..it.n1).enumerate() {
        let xn = &x[n * s.c * plane..(n + 1) * s.c * plane];
        im2col(xn, s.c, s.h, s.w, k, it.r0, it.r1, &mut col[i * band..], px);
    }
    (col, px)
}

/// What the GEMM of an item multiplies the weights with: the input itself for a 1x1
/// convolution of one image's band, else the item's columns (built in `col`).
fn item_matrix<'a>(x: &'a [f32], s: Nchw, k: usize, it: Item, col: &'a mut Vec<f32>) -> Mat<'a> {
    if k == 1 && it.n1 - it.n0 == 1 {
        band(x, s, it.n0, it.r0, it.r1)
    } else {
        let (col, px) = item_columns(x, s, k, it, col);
        mat(col, s.c * k * k, px)
    }
}

/// `y = conv(x, weight) + bias`: `x` of shape `s`, `weight` `[co, s.c, k, k]`, `bias`
/// `[co]`; `y` is `[s.n, co, s.h, s.w]`.
pub fn forward(
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    forward_tiled(x, s, weight, co, k, bias, Tiling::new(s.c * k * k, s))
}

fn forward_tiled(
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    k: usize,
    bias: Option<&[f32]>,
    tiling: Tiling,
) -> Vec<f32> {
    assert!(
        k % 2 == 1,
        "'same' convolutions need an odd kernel, not {k}"
    );
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let depth = s.c * k * k;
    assert_eq!(weight.len(), co * depth, "weight is not [co, ci, k, k]");
    let plane = s.plane();
    if let Some(b) = bias {
        assert_eq!(b.len(), co, "bias is not [co]");
    }
    let wm = mat(weight, co, depth);
    let run = |out: Shared| {
        (0..tiling.count()).into_par_iter().for_each(|i| {
            with_scratch(|col, tmp| {
                let it = tiling.item(i);
                if it.n1 - it.n0 == 1 {
                    // One band of one image: the GEMM writes its output rows in place.
                    let n = it.n0;
                    let px = (it.r1 - it.r0) * s.w;
                    let start = n * co * plane + it.r0 * s.w;
                    if let Some(b) = bias {
                        for (c, &v) in b.iter().enumerate() {
                            // SAFETY: row c of this band, inside `y` (checked length) and
                            // written by this item alone (items are disjoint).
                            unsafe {
                                std::slice::from_raw_parts_mut(out.ptr().add(start + c * plane), px)
                            }
                            .fill(v);
                        }
                    }
                    let rhs = item_matrix(x, s, k, it, col);
                    // SAFETY: rows c < co, columns < px of this band start at `start + c *
                    // plane`, inside `y`; no other item writes them.
                    unsafe { gemm_ptr(out.ptr().add(start), plane, 1, wm, rhs, bias.is_some()) };
                } else {
                    // Whole small images side by side: one wider GEMM into `tmp`, then each
                    // image's rows to their place.
                    let (col, px) = item_columns(x, s, k, it, col);
                    let tmp = scratch(tmp, co * px);
                    if let Some(b) = bias {
                        for (row, &v) in tmp.chunks_exact_mut(px).zip(b) {
                            row.fill(v);
                        }
                    }
                    gemm(tmp, px, 1, wm, mat(col, depth, px), bias.is_some());
                    for (i, n) in (it.n0..it.n1).enumerate() {
                        // SAFETY: image n of `y` (inside: checked length), this item's alone.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out.ptr().add(n * co * plane),
                                co * plane,
                            )
                        };
                        for (c, d) in dst.chunks_exact_mut(plane).enumerate() {
                            d.copy_from_slice(&tmp[c * px + i * plane..][..plane]);
                        }
                    }
                }
            });
        });
    };
    // SAFETY: the items cover every (image, row) of the output once, and each writes all
    // `co` channels of its rows: the bias fill then an accumulating GEMM, a GEMM that
    // does not read its destination, or a copy of whole images.
    unsafe { filled(s.n * co * plane, run) }
}

/// The input's gradient: `dy` of shape `s` (`[n, co, h, w]`), `weight` `[co, ci, k, k]`,
/// `dx` `[n, ci, h, w]`. A convolution of `dy` with the weights flipped in space and
/// transposed in channels.
pub fn backward_input(dy: &[f32], s: Nchw, weight: &[f32], ci: usize, k: usize) -> Vec<f32> {
    backward_input_tiled(dy, s, weight, ci, k, Tiling::new(s.c * k * k, s))
}

fn backward_input_tiled(
    dy: &[f32],
    s: Nchw,
    weight: &[f32],
    ci: usize,
    k: usize,
    tiling: Tiling,
) -> Vec<f32> {
    let co = s.c;
    assert_eq!(
        weight.len(),
        co * ci * k * k,
        "weight is not [co, ci, k, k]"
    );
    let mut flipped = vec![0.0; weight.len()];
    for o in 0..co {
        for i in 0..ci {
            for a in 0..k {
                for b in 0..k {
                    flipped[((i * co + o) * k + a) * k + b] =
                        weight[((o * ci + i) * k + (k - 1 - a)) * k + (k - 1 - b)];
                }
            }
        }
    }
    forward_tiled(dy, s, &flipped, ci, k, None, tiling)
}

/// Pixels a weight-gradient group covers at least (fewer groups for smaller maps).
const DW_GROUP_PX: usize = 2048;
/// Output channels per block of a weight gradient split by channels.
const DW_BLOCK_CHANNELS: usize = 64;

/// The weights' gradient `[co, s.c, k, k]`: `x` of shape `s`, `dy` `[s.n, co, s.h, s.w]`.
/// Per item one GEMM `dy_item x columns^T`, the pixels its depth. Items fall into fixed
/// groups (fewer for small maps), each summed in order, the groups then in order; with
/// few groups the output channels are split into blocks as well, for the threads.
pub fn backward_weight(x: &[f32], s: Nchw, dy: &[f32], co: usize, k: usize) -> Vec<f32> {
    backward_weight_tiled(x, s, dy, co, k, Tiling::new(s.c * k * k, s))
}

fn backward_weight_tiled(
    x: &[f32],
    s: Nchw,
    dy: &[f32],
    co: usize,
    k: usize,
    tiling: Tiling,
) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let plane = s.plane();
    assert_eq!(
        dy.len(),
        s.n * co * plane,
        "gradient does not match its shape"
    );
    let depth = s.c * k * k;
    let items = tiling.count();
    if items == 0 || plane == 0 {
        return vec![0.0; co * depth];
    }
    let groups = (s.n * plane / DW_GROUP_PX)
        .clamp(1, REDUCE_GROUPS)
        .min(items);
    let blocks = if groups < 4 {
        (co / DW_BLOCK_CHANNELS).clamp(1, 4)
    } else {
        1
    };
    let parts: Vec<Vec<f32>> = (0..groups * blocks)
        .into_par_iter()
        .map(|gb| {
            let (g, b) = (gb / blocks, gb % blocks);
            let (c0, c1) = (b * co / blocks, (b + 1) * co / blocks);
            let mut acc = vec![0.0; (c1 - c0) * depth];
            with_scratch(|col, dyb| {
                for (j, i) in (g * items / groups..(g + 1) * items / groups).enumerate() {
                    let it = tiling.item(i);
                    let band = (it.r1 - it.r0) * s.w;
                    let px = (it.n1 - it.n0) * band;
                    let lhs = if it.n1 - it.n0 == 1 {
                        Mat {
                            data: &dy[(it.n0 * co + c0) * plane + it.r0 * s.w..],
                            rows: c1 - c0,
                            cols: px,
                            rs: plane,
                            cs: 1,
                        }
                    } else {
                        let dyb = scratch(dyb, (c1 - c0) * px);
                        for (i, n) in (it.n0..it.n1).enumerate() {
                            for c in c0..c1 {
                                dyb[(c - c0) * px + i * band..][..band].copy_from_slice(
                                    &dy[(n * co + c) * plane + it.r0 * s.w..][..band],
                                );
                            }
                        }
                        mat(dyb, c1 - c0, px)
                    };
                    let cols = item_matrix(x, s, k, it, col);
                    gemm(&mut acc, depth, 1, lhs, cols.t(), j > 0);
                }
            });
            acc
        })
        .collect();
    // Each group's blocks are its rows in order; then the groups are summed in order.
    let groups_full: Vec<Vec<f32>> = parts.chunks(blocks).map(|b| b.concat()).collect();
    reduce_in_order(groups_full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{adjoint, rel_err, values};

    /// The definition, as loops.
    fn naive(x: &[f32], s: Nchw, w: &[f32], co: usize, k: usize, b: &[f32]) -> Vec<f32> {
        let p = k as isize / 2;
        let mut y = vec![0.0; s.n * co * s.plane()];
        for n in 0..s.n {
            for o in 0..co {
                for r in 0..s.h {
                    for j in 0..s.w {
                        let mut acc = b[o] as f64;
                        for i in 0..s.c {
                            for a in 0..k {
                                for bb in 0..k {
                                    let (sr, sc) =
                                        (r as isize + a as isize - p, j as isize + bb as isize - p);
                                    if sr >= 0
                                        && sc >= 0
                                        && (sr as usize) < s.h
                                        && (sc as usize) < s.w
                                    {
                                        acc += (w[((o * s.c + i) * k + a) * k + bb]
                                            * x[((n * s.c + i) * s.h + sr as usize) * s.w
                                                + sc as usize])
                                            as f64;
                                    }
                                }
                            }
                        }
                        y[((n * co + o) * s.h + r) * s.w + j] = acc as f32;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        for (k, rows, imgs) in [
            (3, 2, 1),
            (3, 100, 1),
            (1, 3, 1),
            (5, 1, 1),
            (3, 5, 2),
            (1, 5, 2),
            (3, 5, 3),
        ] {
            let s = Nchw {
                n: 3,
                c: 3,
                h: 5,
                w: 7,
            };
            let tiling = Tiling::with(rows, imgs, s);
            let tiling_o = Tiling::with(rows, imgs, Nchw { c: 4, ..s });
            let co = 4;
            let x = values(s.len(), 1);
            let w = values(co * s.c * k * k, 2);
            let b = values(co, 3);
            let y = forward_tiled(&x, s, &w, co, k, Some(&b), tiling);
            assert!(
                rel_err(&y, &naive(&x, s, &w, co, k, &b)) < 1e-5,
                "forward k={k} rows={rows} imgs={imgs}"
            );

            let so = Nchw { c: co, ..s };
            let dy = values(so.len(), 4);
            let zero_b = vec![0.0; co];
            // Input gradient: entry e = <conv(unit_e, w), dy>.
            let dx = backward_input_tiled(&dy, so, &w, s.c, k, tiling_o);
            let want = adjoint(s.len(), &dy, |u| naive(u, s, &w, co, k, &zero_b));
            assert!(
                rel_err(&dx, &want) < 1e-5,
                "input gradient k={k} rows={rows} imgs={imgs}"
            );
            // Weight gradient: entry e = <conv(x, unit_e), dy>.
            let dw = backward_weight_tiled(&x, s, &dy, co, k, tiling);
            let want = adjoint(w.len(), &dy, |u| naive(&x, s, u, co, k, &zero_b));
            assert!(
                rel_err(&dw, &want) < 1e-5,
                "weight gradient k={k} rows={rows} imgs={imgs}"
            );
        }
    }

    /// The weight gradient by its definition.
    fn naive_dw(x: &[f32], s: Nchw, dy: &[f32], co: usize, k: usize) -> Vec<f32> {
        let p = k as isize / 2;
        let mut dw = vec![0.0f64; co * s.c * k * k];
        for n in 0..s.n {
            for o in 0..co {
                for i in 0..s.c {
                    for a in 0..k {
                        for b in 0..k {
                            let mut acc = 0.0f64;
                            for r in 0..s.h {
                                let sr = r as isize + a as isize - p;
                                if sr < 0 || sr as usize >= s.h {
                                    continue;
                                }
                                for j in 0..s.w {
                                    let sc = j as isize + b as isize - p;
                                    if sc >= 0 && (sc as usize) < s.w {
                                        acc += (dy[((n * co + o) * s.h + r) * s.w + j]
                                            * x[((n * s.c + i) * s.h + sr as usize) * s.w
                                                + sc as usize])
                                            as f64;
                                    }
                                }
                            }
                            dw[((o * s.c + i) * k + a) * k + b] += acc;
                        }
                    }
                }
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn weight_gradients_split_into_groups_and_channel_blocks_are_right() {
        // 2 x 32 x 32: one group, two blocks of 64 channels; 4 x 40 x 40: three groups
        // and two blocks; 8 x 4 x 4: small images four to an item.
        for (n, hw, co) in [(2, 32, 128), (4, 40, 128), (8, 4, 70)] {
            let s = Nchw {
                n,
                c: 2,
                h: hw,
                w: hw,
            };
            let x = values(s.len(), 11);
            let dy = values(n * co * s.plane(), 12);
            let got = backward_weight(&x, s, &dy, co, 3);
            assert!(
                rel_err(&got, &naive_dw(&x, s, &dy, co, 3)) < 1e-5,
                "n={n} hw={hw} co={co}"
            );
        }
    }

    #[test]
    fn bands_do_not_change_a_bit_of_the_forward_pass() {
        // Different band heights split the work differently; every output element is
        // still one dot product in the same order.
        let s = Nchw {
            n: 3,
            c: 5,
            h: 9,
            w: 11,
        };
        let x = values(s.len(), 7);
        let w = values(6 * s.c * 9, 8);
        let run = |rows, imgs| forward_tiled(&x, s, &w, 6, 3, None, Tiling::with(rows, imgs, s));
        let (a, b, c) = (run(1, 1), run(9, 1), run(9, 3));
        assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
