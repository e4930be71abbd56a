//! 2x2 transposed convolutions with stride 2 (the U-Net's up-sampling): each input pixel
//! becomes a 2x2 block of the output, so the forward pass is one GEMM `W^T x` per band of
//! input rows and a shuffle of its `co*4` rows into the blocks; the gradients gather the
//! blocks back ("unshuffle") and run one GEMM each.
//!
//! Weights are burn's and PyTorch's `[ci, co, 2, 2]`, read as a `[ci, co*4]` matrix.

use rayon::prelude::*;

use super::conv::{Bands, band_rows};
use super::gemm::{gemm, gemm_ptr, mat};
use super::isa::wide;
use super::{
    Nchw, REDUCE_GROUPS, Shared, band, filled, reduce_in_order, relu_gradient, scratch,
    with_scratch,
};

/// The `co*4 x (r1-r0)*w` blocks of input rows `r0..r1` of image `n` from the output
/// batch `dy` (`[s.n, co, 2h, 2w]`, `s` the input's shape): row `o*4 + a*2 + b`, column
/// `(r-r0)*w + j` is `dy[n, o, 2r+a, 2j+b]`.
fn unshuffle(dy: &[f32], co: usize, s: Nchw, n: usize, (r0, r1): (usize, usize), u: &mut [f32]) {
    let (h, w) = (s.h, s.w);
    let dy = &dy[n * co * 4 * h * w..][..co * 4 * h * w];
    let px = (r1 - r0) * w;
    let (oh, ow) = (2 * h, 2 * w);
    wide(
        #[inline(always)]
        || {
            for o in 0..co {
                for a in 0..2 {
                    // Output row 2r + a's even and odd pixels into rows b = 0 and 1.
                    let (even, odd) = u[(o * 4 + a * 2) * px..][..2 * px].split_at_mut(px);
                    for (i, r) in (r0..r1).enumerate() {
                        let src = &dy[(o * oh + 2 * r + a) * ow..][..ow];
                        let (e, d) = (&mut even[i * w..][..w], &mut odd[i * w..][..w]);
                        for ((e, d), pair) in e.iter_mut().zip(d).zip(src.as_chunks::<2>().0) {
                            *e = pair[0];
                            *d = pair[1];
                        }
                    }
                }
            }
        },
    );
}

/// `y = conv_transpose(x, weight) + bias`: `x` of shape `s`, `weight` `[s.c, co, 2, 2]`;
/// `y` is `[s.n, co, 2 s.h, 2 s.w]`.
pub fn forward(x: &[f32], s: Nchw, weight: &[f32], co: usize, bias: Option<&[f32]>) -> Vec<f32> {
    forward_with_rows(x, s, weight, co, bias, band_rows(s.c.max(co * 4), s.h, s.w))
}

/// [`forward`] in bands of `rows` input rows.
fn forward_with_rows(
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    rows: usize,
) -> Vec<f32> {
    let dest = Dest {
        first: 0,
        channels: co,
        relu: false,
    };
    // SAFETY: the bands write every element of the `[s.n, co, 2 s.h, 2 s.w]` output.
    unsafe {
        filled(s.n * co * 4 * s.plane(), |out| {
            forward_in_bands(x, s, weight, co, bias, rows, out, dest);
        })
    }
}

/// The U-Net's up step: `cat([skip, relu(conv_transpose(x, weight) + bias)], 1)`, the
/// transposed convolution written straight into its channels of the result. `skip` is
/// `[s.n, cs, 2 s.h, 2 s.w]`; the result `[s.n, cs + co, 2 s.h, 2 s.w]`.
pub fn forward_cat(
    skip: &[f32],
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let out_plane = 4 * s.plane();
    let cs = skip.len() / (s.n * out_plane).max(1);
    assert_eq!(
        skip.len(),
        s.n * cs * out_plane,
        "skip does not match the output's size"
    );
    let rows = band_rows(s.c.max(co * 4), s.h, s.w);
    let dest = Dest {
        first: cs,
        channels: cs + co,
        relu: true,
    };
    let run = |out: Shared| {
        // Each image's skip channels are one run of the result.
        skip.par_chunks(cs * out_plane)
            .with_min_len(1)
            .enumerate()
            .for_each(|(n, src)| {
                // SAFETY: image n's first cs channels, written by this item alone.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.ptr().add(n * (cs + co) * out_plane),
                        src.len(),
                    )
                };
                dst.copy_from_slice(src);
            });
        // SAFETY: channels cs.. of every image, disjoint from the skip's.
        unsafe { forward_in_bands(x, s, weight, co, bias, rows, out, dest) };
    };
    // SAFETY: the copies write the skip's channels of every image, the bands the rest.
    unsafe { filled(s.n * (cs + co) * out_plane, run) }
}

/// Where [`forward_in_bands`] writes: channels `first..first + co` of an output of
/// `channels` channels per image, through a ReLU with `relu`.
#[derive(Clone, Copy)]
struct Dest {
    first: usize,
    channels: usize,
    relu: bool,
}

/// # Safety
/// `out` holds `s.n * dest.channels` output planes (`2 s.h x 2 s.w`), `dest.first + co`
/// at most `dest.channels`, and nothing else touches their channels `dest.first..` during
/// the call.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_in_bands(
    x: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    rows: usize,
    out: Shared,
    dest: Dest,
) {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    assert_eq!(weight.len(), s.c * co * 4, "weight is not [ci, co, 2, 2]");
    assert!(dest.first + co <= dest.channels);
    if let Some(b) = bias {
        assert_eq!(b.len(), co, "bias is not [co]");
    }
    let bands = Bands::new(rows, s.h);
    let wt = mat(weight, s.c, co * 4).t();
    let (oh, ow) = (2 * s.h, 2 * s.w);
    (0..s.n * bands.count).into_par_iter().for_each(|i| {
        with_scratch(|t, _, _| {
            let (n, r0, r1) = bands.item(i);
            let px = (r1 - r0) * s.w;
            let rhs = band(x, s, n, r0, r1);
            let t = scratch(t, co * 4 * px);
            gemm(t, px, 1, wt, rhs, false);
            wide(
                #[inline(always)]
                || {
                    for o in 0..co {
                        let b = bias.map_or(0.0, |b| b[o]);
                        let ch = n * dest.channels + dest.first + o;
                        // SAFETY: output rows 2*r0..2*r1 of channel `ch`: inside `out` (the
                        // caller's promise), and no other item's rows.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out.ptr().add((ch * oh + 2 * r0) * ow),
                                2 * (r1 - r0) * ow,
                            )
                        };
                        let f = |v: f32| if dest.relu { (v + b).max(0.0) } else { v + b };
                        for a in 0..2 {
                            // Rows b = 0 and 1 as output row 2i + a's even and odd pixels.
                            let (even, odd) = t[(o * 4 + a * 2) * px..][..2 * px].split_at(px);
                            let lines = even.chunks_exact(s.w).zip(odd.chunks_exact(s.w));
                            for (i, (e, d)) in lines.enumerate() {
                                let row = dst[(2 * i + a) * ow..][..ow].as_chunks_mut::<2>().0;
                                for ((pair, e), d) in row.iter_mut().zip(e).zip(d) {
                                    *pair = [f(*e), f(*d)];
                                }
                            }
                        }
                    }
                },
            );
        });
    });
}

/// The gradient of [`forward_cat`]'s result `dy` (`[n, cs + co, h, w]`, `plane = h w`)
/// split into the skip's (`[n, cs, h, w]`) and the transposed convolution's before its
/// ReLU (`[n, co, h, w]`, zero where the result `y` is not positive).
pub fn split_cat_gradient(
    dy: &[f32],
    y: &[f32],
    n: usize,
    cs: usize,
    plane: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(dy.len(), y.len(), "gradient and result differ in size");
    let c = dy.len() / (n * plane).max(1);
    assert!(
        cs <= c && dy.len() == n * c * plane,
        "not [n, c, h, w] with c >= cs"
    );
    let co = c - cs;
    let img = c * plane;
    // SAFETY: one item per image writes all of its part.
    let dskip = unsafe {
        filled(n * cs * plane, |out| {
            (0..n).into_par_iter().for_each(|i| {
                let d = std::slice::from_raw_parts_mut(out.ptr().add(i * cs * plane), cs * plane);
                d.copy_from_slice(&dy[i * img..][..cs * plane]);
            });
        })
    };
    // SAFETY: as above.
    let du = unsafe {
        filled(n * co * plane, |out| {
            (0..n).into_par_iter().for_each(|i| {
                let d = std::slice::from_raw_parts_mut(out.ptr().add(i * co * plane), co * plane);
                let at = i * img + cs * plane;
                let (g, y) = (&dy[at..][..co * plane], &y[at..][..co * plane]);
                for ((d, g), y) in d.iter_mut().zip(g).zip(y) {
                    *d = relu_gradient(*g, *y);
                }
            });
        })
    };
    (dskip, du)
}

/// The input's gradient `[n, ci, h, w]` from `dy` (`[s.n, co, 2 s.h, 2 s.w]`; `s` is the
/// input's shape), `weight` `[s.c, co, 2, 2]`.
pub fn backward_input(dy: &[f32], s: Nchw, weight: &[f32], co: usize) -> Vec<f32> {
    let rows = band_rows(co * 4, s.h, s.w);
    backward_input_in_bands(dy, s, weight, co, rows)
}

fn backward_input_in_bands(
    dy: &[f32],
    s: Nchw,
    weight: &[f32],
    co: usize,
    rows: usize,
) -> Vec<f32> {
    let plane = s.plane();
    assert_eq!(
        dy.len(),
        s.n * co * 4 * plane,
        "gradient does not match its shape"
    );
    assert_eq!(weight.len(), s.c * co * 4, "weight is not [ci, co, 2, 2]");
    let bands = Bands::new(rows, s.h);
    let wm = mat(weight, s.c, co * 4);
    let run = |out: Shared| {
        (0..s.n * bands.count).into_par_iter().for_each(|i| {
            with_scratch(|u, _, _| {
                let (n, r0, r1) = bands.item(i);
                let px = (r1 - r0) * s.w;
                let u = scratch(u, co * 4 * px);
                unshuffle(dy, co, s, n, (r0, r1), u);
                // SAFETY: rows c < ci, columns < px of this band of image n, inside `dx`,
                // written by this item alone.
                unsafe {
                    gemm_ptr(
                        out.ptr().add(n * s.c * plane + r0 * s.w),
                        plane,
                        1,
                        wm,
                        mat(u, co * 4, px),
                        false,
                    );
                }
            });
        });
    };
    // SAFETY: the bands cover every row of every image once, and each GEMM writes all
    // `ci` channels of its band without reading them.
    unsafe { filled(s.len(), run) }
}

/// The weights' gradient `[s.c, co, 2, 2]`: `x` of shape `s`, `dy` `[s.n, co, 2 s.h, 2 s.w]`.
pub fn backward_weight(x: &[f32], s: Nchw, dy: &[f32], co: usize) -> Vec<f32> {
    let rows = band_rows(s.c.max(co * 4), s.h, s.w);
    backward_weight_in_bands(x, s, dy, co, rows)
}

fn backward_weight_in_bands(x: &[f32], s: Nchw, dy: &[f32], co: usize, rows: usize) -> Vec<f32> {
    let plane = s.plane();
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    assert_eq!(
        dy.len(),
        s.n * co * 4 * plane,
        "gradient does not match its shape"
    );
    let bands = Bands::new(rows, s.h);
    let items = s.n * bands.count;
    if items == 0 || plane == 0 {
        return vec![0.0; s.c * co * 4];
    }
    let groups = REDUCE_GROUPS.min(items);
    let parts = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut acc = vec![0.0; s.c * co * 4];
            with_scratch(|u, _, _| {
                for (j, i) in (g * items / groups..(g + 1) * items / groups).enumerate() {
                    let (n, r0, r1) = bands.item(i);
                    let px = (r1 - r0) * s.w;
                    let u = scratch(u, co * 4 * px);
                    unshuffle(dy, co, s, n, (r0, r1), u);
                    let lhs = band(x, s, n, r0, r1);
                    gemm(&mut acc, co * 4, 1, lhs, mat(u, co * 4, px).t(), j > 0);
                }
            });
            acc
        })
        .collect();
    reduce_in_order(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{adjoint, rel_err, values};

    fn naive(x: &[f32], s: Nchw, w: &[f32], co: usize, b: &[f32]) -> Vec<f32> {
        let (oh, ow) = (2 * s.h, 2 * s.w);
        let mut y = vec![0.0f64; s.n * co * oh * ow];
        for n in 0..s.n {
            for o in 0..co {
                for r in 0..oh {
                    for j in 0..ow {
                        y[((n * co + o) * oh + r) * ow + j] = b[o] as f64;
                    }
                }
                for i in 0..s.c {
                    for r in 0..s.h {
                        for j in 0..s.w {
                            for a in 0..2 {
                                for bb in 0..2 {
                                    y[((n * co + o) * oh + 2 * r + a) * ow + 2 * j + bb] += (x
                                        [((n * s.c + i) * s.h + r) * s.w + j]
                                        * w[((i * co + o) * 2 + a) * 2 + bb])
                                        as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        for rows in [1, 2, 100] {
            let s = Nchw {
                n: 2,
                c: 3,
                h: 4,
                w: 5,
            };
            let co = 2;
            let x = values(s.len(), 1);
            let w = values(s.c * co * 4, 2);
            let b = values(co, 3);
            let olen = s.n * co * 4 * s.plane();
            let y = forward_with_rows(&x, s, &w, co, Some(&b), rows);
            assert!(
                rel_err(&y, &naive(&x, s, &w, co, &b)) < 1e-5,
                "forward rows={rows}"
            );

            let dy = values(olen, 4);
            let zero_b = vec![0.0; co];
            let dx = backward_input_in_bands(&dy, s, &w, co, rows);
            let want = adjoint(s.len(), &dy, |u| naive(u, s, &w, co, &zero_b));
            assert!(rel_err(&dx, &want) < 1e-5, "input gradient rows={rows}");
            let dw = backward_weight_in_bands(&x, s, &dy, co, rows);
            let want = adjoint(w.len(), &dy, |u| naive(&x, s, u, co, &zero_b));
            assert!(rel_err(&dw, &want) < 1e-5, "weight gradient rows={rows}");
        }
    }

    #[test]
    fn the_up_step_is_the_skip_then_the_rectified_transposed_convolution() {
        let s = Nchw {
            n: 3,
            c: 4,
            h: 3,
            w: 5,
        };
        let (co, cs, out_plane) = (2, 3, 4 * s.plane());
        let x = values(s.len(), 5);
        let w = values(s.c * co * 4, 6);
        let b = values(co, 7);
        let skip = values(s.n * cs * out_plane, 8);
        let y = forward_cat(&skip, &x, s, &w, co, Some(&b));
        let up = forward(&x, s, &w, co, Some(&b));
        assert!(up.iter().any(|v| *v < 0.0), "the ReLU has something to do");
        let mut want = Vec::new();
        for n in 0..s.n {
            want.extend_from_slice(&skip[n * cs * out_plane..][..cs * out_plane]);
            want.extend(
                up[n * co * out_plane..][..co * out_plane]
                    .iter()
                    .map(|v| v.max(0.0)),
            );
        }
        assert_eq!(y, want);

        let dy = values(y.len(), 9);
        let (dskip, du) = split_cat_gradient(&dy, &y, s.n, cs, out_plane);
        for n in 0..s.n {
            let img = &dy[n * (cs + co) * out_plane..][..(cs + co) * out_plane];
            assert_eq!(
                &dskip[n * cs * out_plane..][..cs * out_plane],
                &img[..cs * out_plane]
            );
            for (i, g) in du[n * co * out_plane..][..co * out_plane]
                .iter()
                .enumerate()
            {
                let at = n * (cs + co) * out_plane + cs * out_plane + i;
                assert_eq!(*g, if y[at] > 0.0 { dy[at] } else { 0.0 });
            }
        }
    }
}
