//! `k x k` convolutions with stride 1 and 'same' zero padding (`k` odd: the networks' 3x3
//! and 1x1): the forward pass and both gradients.
//!
//! All three are GEMMs on [`packed`]'s kernel. The forward pass and the input gradient
//! (a convolution with the weights flipped and transposed) multiply the weights, read
//! where they are stored (`[co, ci*k*k]`; the input gradient gathers the flipped ones,
//! or on larger maps lays them out once), into bands of output rows, written in place
//! in NCHW; their `B` is the input's columns (its rows shifted by each tap), from a
//! zero-padded copy of the input: read in place for rows of [`NR`] pixels or more, else
//! packed. The weight gradient multiplies the output gradient by the columns
//! transposed, read in place from the input laid out as padded NHWC.

use rayon::prelude::*;

use super::packed::{self, Init, Lhs, NR, Out};
use super::{Nchw, REDUCE_GROUPS, Shared, filled, scratch, transpose, with_scratch};

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

/// Pixels a work item of the forward pass aims at (its packed columns stay in L2).
const ITEM_PX: usize = 256;

impl Tiling {
    /// Items of about [`ITEM_PX`] pixels: bands of whole rows, or whole small images
    /// side by side.
    fn packed(s: Nchw) -> Self {
        let rows = (ITEM_PX / s.w.max(1)).clamp(1, s.h.max(1));
        let imgs = (ITEM_PX / s.plane().max(1)).clamp(1, s.n.max(1));
        Tiling::with(rows, imgs, s)
    }
}

/// Writes rows `k0..k0 + kb` of item `it`'s columns (depth row `(ci, dy, dx)` holds
/// `x[ci, r + dy - p, j + dx - p]`, zero outside the image) into `buf` as packed panels
/// ([`packed::put`]), from `xp`, the input with `k / 2` zeros around each plane: each
/// image row's run of a depth row is `w` floats in a row of `xp`, at `offs[t]` (depth
/// row `k0 + t`'s place in an image's padded planes) past the row's own.
fn pack_columns(
    xp: &[f32],
    s: Nchw,
    k: usize,
    it: Item,
    (k0, kb): (usize, usize),
    buf: &mut [f32],
) {
    let (kk, hp, wp) = (k * k, s.h + k - 1, s.w + k - 1);
    let offs: Vec<usize> = (k0..k0 + kb)
        .map(|d| (d / kk * hp + d / k % k) * wp + d % k)
        .collect();
    match s.w {
        8 => pack_runs::<8>(xp, s, k, it, &offs, buf),
        4 => pack_runs::<4>(xp, s, k, it, &offs, buf),
        2 => pack_runs::<2>(xp, s, k, it, &offs, buf),
        1 => pack_runs::<1>(xp, s, k, it, &offs, buf),
        w => {
            let band = (it.r1 - it.r0) * w;
            for (t, &o) in offs.iter().enumerate() {
                for (i, n) in (it.n0..it.n1).enumerate() {
                    for r in it.r0..it.r1 {
                        let q = i * band + (r - it.r0) * w;
                        let run = &xp[(n * s.c * hp + r) * wp + o..][..w];
                        packed::put(buf, kb, t, q, run);
                    }
                }
            }
        }
    }
}

/// [`pack_columns`] for rows of `W` pixels, `W` dividing [`NR`]: a panel's columns are
/// `NR / W` whole runs, and it is written a row of [`NR`] floats at a time.
fn pack_runs<const W: usize>(
    xp: &[f32],
    s: Nchw,
    k: usize,
    it: Item,
    offs: &[usize],
    buf: &mut [f32],
) {
    let (hp, wp) = (s.h + k - 1, s.w + k - 1);
    let band = (it.r1 - it.r0) * W;
    let cols = (it.n1 - it.n0) * band;
    let kb = offs.len();
    for (j, panel) in buf
        .chunks_exact_mut(NR * kb)
        .take(cols.div_ceil(NR))
        .enumerate()
    {
        // Where each run of the panel starts in `xp` (its image and row), at depth 0.
        let mut starts = [0; NR];
        let runs = (NR / W).min((cols - j * NR).div_ceil(W));
        for (u, at) in starts[..runs].iter_mut().enumerate() {
            let q = j * NR + u * W;
            let (n, r) = (it.n0 + q / band, it.r0 + q % band / W);
            *at = (n * s.c * hp + r) * wp;
        }
        for (row, &o) in panel.chunks_exact_mut(NR).zip(offs) {
            for (u, &at) in starts[..runs].iter().enumerate() {
                let dst: &mut [f32; W] = (&mut row[u * W..][..W]).try_into().unwrap();
                *dst = xp[at + o..][..W].try_into().unwrap();
            }
        }
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
    let depth = s.c * k * k;
    assert_eq!(weight.len(), co * depth, "weight is not [co, ci, k, k]");
    forward_tiled(x, s, co, k, bias, Tiling::packed(s), |kc| {
        Lhs::rows(weight, co, depth, depth, kc)
    })
}

/// The forward pass with the weights `lhs(kc)` (`co` rows, element `(o, (i * k + a) * k
/// + b)`, in depth blocks of `kc`) and items `tiling`.
/// Items with few of them (deep layers of small images) also split the output channels,
/// for the threads; no cut changes a bit of the result ([`packed`]'s order).
fn forward_tiled<'a>(
    x: &[f32],
    s: Nchw,
    co: usize,
    k: usize,
    bias: Option<&[f32]>,
    tiling: Tiling,
    lhs: impl FnOnce(usize) -> Lhs<'a>,
) -> Vec<f32> {
    assert!(
        k % 2 == 1,
        "'same' convolutions need an odd kernel, not {k}"
    );
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let plane = s.plane();
    if let Some(b) = bias {
        assert_eq!(b.len(), co, "bias is not [co]");
    }
    let item_px = |it: Item| (it.n1 - it.n0) * (it.r1 - it.r0) * s.w;
    let depth = s.c * k * k;
    let in_place = reads_in_place(s);
    let kc = if in_place {
        packed::depth_block_in_place(co)
    } else {
        packed::depth_block(item_px(tiling.item(0)))
    };
    let a = lhs(kc);
    assert_eq!(a.height(), co, "weights of {co} output channels");
    let items = tiling.count();
    let panels = a.panels();
    let chunks = rayon::current_num_threads()
        .div_ceil(items.max(1))
        .clamp(1, panels.max(1));
    let unit_panels = |c: usize| (c * panels / chunks)..((c + 1) * panels / chunks);
    // B from a zero-padded copy of the input (a 1x1 convolution reads the input itself,
    // unless read in place on rows that leave a partial panel).
    let (p, hp, wp) = (k / 2, s.h + k - 1, s.w + k - 1);
    let copy;
    let xp: &[f32] = if p == 0 && (!in_place || s.w.is_multiple_of(NR)) {
        x
    } else {
        copy = padded(x, s, p);
        &copy
    };
    if in_place {
        // Rows at least a panel wide: B read straight from the padded copy.
        let offsets: Vec<usize> = (0..depth)
            .map(|d| (d / (k * k)) * hp * wp + (d / k % k) * wp + d % k)
            .collect();
        let tw = s.w.div_ceil(NR);
        let run = |out: Shared| {
            (0..items * chunks).into_par_iter().for_each(|u| {
                let (it, c) = (tiling.item(u / chunks), u % chunks);
                let per_img = (it.r1 - it.r0) * tw;
                let tile_at = |j: usize| {
                    let (n, r, j0) = (it.n0 + j / per_img, it.r0 + j % per_img / tw, j % tw * NR);
                    (
                        xp[(n * s.c * hp + r) * wp + j0..].as_ptr(),
                        out.ptr().wrapping_add((n * co * s.h + r) * s.w + j0),
                        NR.min(s.w - j0),
                    )
                };
                // SAFETY: B: the last read of a tile is at most the last element of its
                // image's last padded plane plus NR - 1, inside `xp` (its slack, or rows
                // a multiple of NR wide); C: the unit's channels of its images' rows,
                // inside `y` and no other unit's.
                unsafe {
                    packed::multiply_in_place(
                        &a,
                        unit_panels(c),
                        (it.n1 - it.n0) * per_img,
                        tile_at,
                        &offsets,
                        plane,
                        Init::Set(bias),
                    );
                };
            });
        };
        // SAFETY: the units cover every (image, row) of the output once in every
        // channel, each element set from the bias (or zero) before products are added.
        return unsafe { filled(s.n * co * plane, run) };
    }
    let run = |out: Shared| {
        (0..items * chunks).into_par_iter().for_each(|u| {
            let (it, c) = (tiling.item(u / chunks), u % chunks);
            let rows = unit_panels(c);
            let dst = Out {
                ptr: out.ptr().wrapping_add(it.n0 * co * plane + it.r0 * s.w),
                ldc: plane,
                seg: (it.r1 - it.r0) * s.w,
                seg_stride: co * plane,
            };
            with_scratch(|col, _, _| {
                let pack = |k0, kb, buf: &mut [f32]| pack_columns(xp, s, k, it, (k0, kb), buf);
                // SAFETY: the unit's rows (channels) of its images' bands: inside `y`
                // (`s.n * co * plane` floats), and no other unit's.
                unsafe {
                    packed::multiply(&a, rows, item_px(it), pack, dst, Init::Set(bias), col);
                };
            });
        });
    };
    // SAFETY: the units cover every (image, row) of the output once in every channel,
    // each element set from the bias (or zero) before products are added.
    unsafe { filled(s.n * co * plane, run) }
}

/// Whether a convolution over `s` reads its `B` in place, from a padded copy of the
/// input (rows at least a panel wide), rather than packed.
fn reads_in_place(s: Nchw) -> bool {
    s.w >= NR
}

/// `x` (shape `s`) with `p` zeros around each plane, and [`NR`] floats of slack at the end.
fn padded(x: &[f32], s: Nchw, p: usize) -> Vec<f32> {
    use std::mem::MaybeUninit;
    let (hp, wp) = (s.h + 2 * p, s.w + 2 * p);
    let body = s.n * s.c * hp * wp;
    let zero = MaybeUninit::new(0.0f32);
    let mut xp: Vec<f32> = Vec::with_capacity(body + NR);
    let spare = &mut xp.spare_capacity_mut()[..body + NR];
    // Each element written once (no zeroing pass first); planes in runs of ~16 KiB.
    spare[..body]
        .par_chunks_mut(hp * wp)
        .zip(x.par_chunks(s.plane()))
        .with_min_len((4096 / (hp * wp).max(1)).max(1))
        .for_each(|(dst, src)| {
            for (r, row) in dst.chunks_exact_mut(wp).enumerate() {
                if r < p || r >= p + s.h {
                    row.fill(zero);
                    continue;
                }
                row[..p].fill(zero);
                row[p + s.w..].fill(zero);
                let line = &src[(r - p) * s.w..][..s.w];
                for (d, v) in row[p..p + s.w].iter_mut().zip(line) {
                    d.write(*v);
                }
            }
        });
    spare[body..].fill(zero);
    // SAFETY: every one of the `body + NR` floats was written above.
    unsafe { xp.set_len(body + NR) };
    xp
}

/// The input's gradient: `dy` of shape `s` (`[n, co, h, w]`), `weight` `[co, ci, k, k]`,
/// `dx` `[n, ci, h, w]`. A convolution of `dy` with the weights flipped in space and
/// transposed in channels.
pub fn backward_input(dy: &[f32], s: Nchw, weight: &[f32], ci: usize, k: usize) -> Vec<f32> {
    backward_input_tiled(dy, s, weight, ci, k, Tiling::packed(s))
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
    // Element (i, c) of the flipped, transposed weights, c = o * kk + e, is
    // weight[o, i, kk - 1 - e].
    let kk = k * k;
    if reads_in_place(s) {
        // There the kernel already looks up each depth's offset in B: a second lookup
        // for A's cost 15% of a layer. The weights are laid out as rows once (on these
        // larger maps they are small next to the products): row i is weight[o, i]
        // flipped, for o in order.
        let mut wt = Vec::with_capacity(ci * co * kk);
        for i in 0..ci {
            for o in 0..co {
                wt.extend(weight[(o * ci + i) * kk..][..kk].iter().rev());
            }
        }
        return forward_tiled(dy, s, ci, k, None, tiling, |kc| {
            Lhs::rows(&wt, ci, co * kk, co * kk, kc)
        });
    }
    // Element (i, c) at at[c] + i * kk.
    let at: Vec<usize> = (0..co * kk)
        .map(|c| (c / kk) * ci * kk + kk - 1 - c % kk)
        .collect();
    forward_tiled(dy, s, ci, k, None, tiling, |kc| {
        Lhs::gathered(weight, ci, kk, &at, kc)
    })
}

/// Pixels a weight-gradient group covers at least (fewer groups for smaller maps).
const DW_GROUP_PX: usize = 2048;
/// Output channels a block of a weight gradient split by channels has at least.
const DW_BLOCK_CHANNELS: usize = 16;

/// The weights' gradient `[co, s.c, k, k]`: `x` of shape `s`, `dy` `[s.n, co, s.h, s.w]`.
/// `dW = dY X^T`, the pixels its depth, on [`packed`]'s kernel: `A` is `dY` (channels by
/// pixels), and `B` is read in place from `x` laid out as padded NHWC ([`padded_nhwc`]):
/// a row of `B` is one pixel's [`NR`] channels at one shift, contiguous. The products come
/// out with the depth ordered (shift, channel), and are put back in `[ci, k, k]` order at
/// the end. Items (bands, as the forward pass cuts them) fall into fixed groups (fewer
/// for small maps); each element of a group's sum is one FMA chain over the group's
/// pixels in order, and the groups are then added in order; with few groups the output
/// channels are split into blocks as well, for the threads. No cut depends on the thread
/// count.
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
    assert!(
        k % 2 == 1,
        "'same' convolutions need an odd kernel, not {k}"
    );
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let plane = s.plane();
    assert_eq!(
        dy.len(),
        s.n * co * plane,
        "gradient does not match its shape"
    );
    let (kk, c) = (k * k, s.c);
    let depth = c * kk;
    let items = tiling.count();
    if items == 0 || plane == 0 {
        return vec![0.0; co * depth];
    }
    let groups = (s.n * plane / DW_GROUP_PX)
        .clamp(1, REDUCE_GROUPS)
        .min(items);
    // Blocks of output channels are independent rows of the product: how many there are
    // changes no bit, so they follow the threads (two units or more per thread).
    let blocks = (2 * rayon::current_num_threads())
        .div_ceil(groups)
        .clamp(1, (co / DW_BLOCK_CHANNELS).max(1));
    let (p, hp, wp) = (k / 2, s.h + k - 1, s.w + k - 1);
    // Few channels (the first layer's one): a row of B is a pixel's whole depth, all taps
    // of all channels ([`tap_rows`]), one tile. Else B is read from padded NHWC: tiles
    // of shift e, channels cb * NR.., column 0 at depth e * c + cb * NR.
    let narrow = depth <= NR;
    let xt = if narrow {
        tap_rows(x, s, k)
    } else {
        padded_nhwc(x, s, p)
    };
    let per_shift = c.div_ceil(NR);
    let tiles = if narrow { 1 } else { kk * per_shift };
    let tile_of = |j: usize| {
        if narrow {
            return (0, 0, depth);
        }
        let (e, cb) = (j / per_shift, j % per_shift);
        (
            ((e / k) * wp + e % k) * c + cb * NR,
            e * c + cb * NR,
            NR.min(c - cb * NR),
        )
    };
    // Where pixel (n, r, j)'s row of B starts in `xt`.
    let pixel_at = |n: usize, r: usize, j: usize| {
        if narrow {
            ((n * s.h + r) * s.w + j) * NR
        } else {
            ((n * hp + r) * wp + j) * c
        }
    };
    let parts: Vec<Vec<f32>> = (0..groups * blocks)
        .into_par_iter()
        .map(|gb| {
            let (g, b) = (gb / blocks, gb % blocks);
            let (c0, c1) = (b * co / blocks, (b + 1) * co / blocks);
            let fill = |acc: Shared| {
                with_scratch(|dyb, _, _| {
                    for (j, i) in (g * items / groups..(g + 1) * items / groups).enumerate() {
                        let it = tiling.item(i);
                        let band = (it.r1 - it.r0) * s.w;
                        let px = (it.n1 - it.n0) * band;
                        // A: the item's gradient rows c0..c1, each `lda` after the last.
                        let (da, lda): (&[f32], usize) = if it.n1 - it.n0 == 1 {
                            (&dy[(it.n0 * co + c0) * plane + it.r0 * s.w..], plane)
                        } else {
                            let dyb = scratch(dyb, (c1 - c0) * px);
                            for (i, n) in (it.n0..it.n1).enumerate() {
                                for c in c0..c1 {
                                    dyb[(c - c0) * px + i * band..][..band].copy_from_slice(
                                        &dy[(n * co + c) * plane + it.r0 * s.w..][..band],
                                    );
                                }
                            }
                            (dyb, px)
                        };
                        let a =
                            Lhs::rows(da, c1 - c0, px, lda, packed::depth_block_in_place(c1 - c0));
                        // Pixel t of the item: image n0 + t / band, row r0 + t % band / w.
                        let offsets: Vec<usize> = (0..px)
                            .map(|t| {
                                let (n, q) = (it.n0 + t / band, t % band);
                                pixel_at(n, it.r0 + q / s.w, q % s.w)
                            })
                            .collect();
                        let out = acc.ptr();
                        let tile_at = |j: usize| {
                            let (b_at, c_at, ncols) = tile_of(j);
                            (xt[b_at..].as_ptr(), out.wrapping_add(c_at), ncols)
                        };
                        let init = if j == 0 { Init::Set(None) } else { Init::Add };
                        // SAFETY: B: tile j's reads start at its shift and channel block in
                        // `xt` and run at most NR past the last pixel's offset: inside its
                        // padded image plus the NR floats of slack; C: `acc`, this unit's own,
                        // `c1 - c0` rows of `depth`, the tile's columns inside a row.
                        unsafe {
                            packed::multiply_in_place(
                                &a,
                                0..a.panels(),
                                tiles,
                                tile_at,
                                &offsets,
                                depth,
                                init,
                            );
                        };
                    }
                });
            };
            // SAFETY: the group's first item sets every element (`Init::Set`: all of
            // `A`'s rows, tiles of every shift and channel).
            unsafe { filled((c1 - c0) * depth, fill) }
        })
        .collect();
    // Row o of the result: the groups' rows o (in block `o`'s part) summed in group order,
    // then (o, e * c + i) -> (o, i * kk + e); rows in parallel.
    let block_of: Vec<(usize, usize)> = (0..blocks)
        .flat_map(|b| {
            (b * co / blocks..(b + 1) * co / blocks).map(move |o| (b, o - b * co / blocks))
        })
        .collect();
    let mut dw: Vec<f32> = Vec::with_capacity(co * depth);
    dw.spare_capacity_mut()[..co * depth]
        .par_chunks_mut(depth.max(1))
        .zip(&block_of)
        .for_each_init(Vec::new, |sum, (row, &(b, r))| {
            // The groups' rows in order, whole rows at a time (they vectorise): each
            // element is still part 0 + part 1 + ... in group order.
            let part = |g: usize| &parts[g * blocks + b][r * depth..][..depth];
            sum.clear();
            sum.extend_from_slice(part(0));
            for g in 1..groups {
                for (v, p) in sum.iter_mut().zip(part(g)) {
                    *v += p;
                }
            }
            // (e, i) -> (i, e): `sum` is kk x c, the row c x kk.
            const T: usize = transpose::B;
            let dst = row.as_mut_ptr().cast::<f32>();
            for e0 in (0..kk).step_by(T) {
                for c0 in (0..c).step_by(T) {
                    let (eb, cb) = (T.min(kk - e0), T.min(c - c0));
                    // SAFETY: reads inside `sum` (kk rows of c), writes inside the row
                    // (c rows of kk).
                    unsafe {
                        transpose::block(
                            sum[e0 * c + c0..].as_ptr(),
                            c,
                            dst.add(c0 * kk + e0),
                            kk,
                            eb,
                            cb,
                        );
                    }
                }
            }
        });
    // SAFETY: each row was written whole: element i * kk + e for every channel and shift.
    unsafe { dw.set_len(co * depth) };
    dw
}

/// `x` (shape `s`, `s.c * k * k` at most [`NR`]) as one row of [`NR`] floats per pixel
/// `(n, r, j)`, at `((n h + r) w + j) NR`: column `e * c + i` holds channel `i` at tap
/// `e = (dy, dx)`, `x[n, i, r + dy - p, j + dx - p]` (zero outside the image), the rest
/// zeros.
fn tap_rows(x: &[f32], s: Nchw, k: usize) -> Vec<f32> {
    let (p, plane, kk) = (k / 2, s.plane(), k * k);
    assert!(
        s.c * kk <= NR,
        "{} channels of {kk} taps do not fit a row",
        s.c
    );
    let mut out = vec![0.0f32; s.n * plane * NR];
    out.par_chunks_mut((plane * NR).max(1))
        .zip(x.par_chunks((s.c * plane).max(1)))
        .for_each(|(rows, img)| {
            for (q, row) in rows.chunks_exact_mut(NR).enumerate() {
                let (r, j) = (q / s.w, q % s.w);
                for e in 0..kk {
                    let (sr, sc) = ((r + e / k).wrapping_sub(p), (j + e % k).wrapping_sub(p));
                    if sr < s.h && sc < s.w {
                        for i in 0..s.c {
                            row[e * s.c + i] = img[i * plane + sr * s.w + sc];
                        }
                    }
                }
            }
        });
    out
}

/// `x` (shape `s`) as padded NHWC: pixel `(n, r, j)` of the image padded by `p` zeros
/// (`h + 2p` by `w + 2p`) at `((n (h + 2p) + r) (w + 2p) + j) c`, its channels in a
/// row; [`NR`] floats of zeros after the last.
fn padded_nhwc(x: &[f32], s: Nchw, p: usize) -> Vec<f32> {
    use std::mem::MaybeUninit;
    let (hp, wp, c, plane) = (s.h + 2 * p, s.w + 2 * p, s.c, s.plane());
    let body = s.n * hp * wp * c;
    let zero = MaybeUninit::new(0.0f32);
    let mut xt: Vec<f32> = Vec::with_capacity(body + NR);
    let spare = &mut xt.spare_capacity_mut()[..body + NR];
    // Blocks of 16 channels by 16 pixels, transposed in registers ([`transpose`]).
    const T: usize = transpose::B;
    spare[..body]
        .par_chunks_mut((hp * wp * c).max(1))
        .zip(x.par_chunks((c * plane).max(1)))
        .for_each(|(dst, img)| {
            for (r, row) in dst.chunks_exact_mut(wp * c).enumerate() {
                if r < p || r >= p + s.h {
                    row.fill(zero);
                    continue;
                }
                row[..p * c].fill(zero);
                row[(p + s.w) * c..].fill(zero);
                let line = row[p * c..(p + s.w) * c].as_mut_ptr().cast::<f32>();
                let src = &img[(r - p) * s.w..];
                for c0 in (0..c).step_by(T) {
                    for j0 in (0..s.w).step_by(T) {
                        let (cb, jb) = (T.min(c - c0), T.min(s.w - j0));
                        // SAFETY: reads: channels c0..c0 + cb of the image, pixels
                        // j0..j0 + jb of row r - p; writes: those pixels' channels in
                        // this row's line (`s.w` pixels of `c`).
                        unsafe {
                            transpose::block(
                                src[c0 * plane + j0..].as_ptr(),
                                plane,
                                line.add(j0 * c + c0),
                                c,
                                cb,
                                jb,
                            );
                        }
                    }
                }
            }
        });
    spare[body..].fill(zero);
    // SAFETY: every one of the `body + NR` floats was written above.
    unsafe { xt.set_len(body + NR) };
    xt
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
        // Rows narrower than a panel (columns packed; 8 and 4 a panel's whole runs, the
        // last panel partial), and wider ones (read in place: 18 leaves a partial tile
        // per row; 1x1 at 16 reads the input itself). Three channels, and one (the
        // first layer: its weight gradient takes all taps in one row of B).
        for ((k, rows, imgs, w), c) in [
            (3, 2, 1, 8),
            (3, 5, 2, 4),
            (5, 5, 3, 8),
            (1, 5, 2, 4),
            (3, 2, 1, 7),
            (3, 100, 1, 7),
            (1, 3, 1, 7),
            (5, 1, 1, 7),
            (3, 5, 2, 7),
            (1, 5, 2, 7),
            (3, 5, 3, 7),
            (3, 2, 1, 18),
            (3, 5, 2, 18),
            (5, 1, 1, 18),
            (1, 2, 1, 16),
            (1, 5, 3, 18),
        ]
        .into_iter()
        .flat_map(|case| [(case, 3), (case, 1)])
        {
            let s = Nchw { n: 3, c, h: 5, w };
            let tiling = Tiling::with(rows, imgs, s);
            let tiling_o = Tiling::with(rows, imgs, Nchw { c: 4, ..s });
            let co = 4;
            let x = values(s.len(), 1);
            let w = values(co * s.c * k * k, 2);
            let b = values(co, 3);
            let depth = s.c * k * k;
            let y = forward_tiled(&x, s, co, k, Some(&b), tiling, |kc| {
                Lhs::rows(&w, co, depth, depth, kc)
            });
            assert!(
                rel_err(&y, &naive(&x, s, &w, co, k, &b)) < 1e-5,
                "forward c={c} k={k} rows={rows} imgs={imgs} width={}",
                s.w
            );

            let so = Nchw { c: co, ..s };
            let dy = values(so.len(), 4);
            let zero_b = vec![0.0; co];
            // Input gradient: entry e = <conv(unit_e, w), dy>.
            let dx = backward_input_tiled(&dy, so, &w, s.c, k, tiling_o);
            let want = adjoint(s.len(), &dy, |u| naive(u, s, &w, co, k, &zero_b));
            assert!(
                rel_err(&dx, &want) < 1e-5,
                "input gradient c={c} k={k} rows={rows} imgs={imgs} width={}",
                s.w
            );
            // Weight gradient: entry e = <conv(x, unit_e), dy>.
            let dw = backward_weight_tiled(&x, s, &dy, co, k, tiling);
            let want = adjoint(w.len(), &dy, |u| naive(&x, s, u, co, k, &zero_b));
            assert!(
                rel_err(&dw, &want) < 1e-5,
                "weight gradient c={c} k={k} rows={rows} imgs={imgs} width={}",
                s.w
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
        let run = |rows, imgs| {
            forward_tiled(&x, s, 6, 3, None, Tiling::with(rows, imgs, s), |kc| {
                Lhs::rows(&w, 6, s.c * 9, s.c * 9, kc)
            })
        };
        let (a, b, c) = (run(1, 1), run(9, 1), run(9, 3));
        assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
