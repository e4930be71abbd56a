//! 2x2 max pooling with stride 2 (no padding, odd last rows and columns dropped): the
//! forward pass and its gradient, one pass each over an NCHW batch.
//!
//! burn-flex pools through a general 3-D kernel that works out each window's bounds per
//! output and fills an index buffer of `i64`s; these take a row pair at a time. The
//! window's maximum is its first largest value in row order, a NaN winning over any
//! number (burn's rule); the gradient goes to that one element.

use rayon::prelude::*;

use super::isa::wide;
use super::{Nchw, Shared, filled};

/// Planes a work item takes at least (a plane of a deep layer is a few hundred floats).
const MIN_FLOATS: usize = 16 * 1024;

/// The window's maximum (`0..4`, row order) and its index: the first largest, a NaN
/// winning (the last NaN). Selects, not branches: a branch on which element is largest
/// mispredicts on every other window of a feature map.
#[inline(always)]
fn window_max(v: [f32; 4]) -> (f32, usize) {
    let (mut m, mut at) = (v[0], 0);
    for (i, &x) in v.iter().enumerate().skip(1) {
        let take = (x > m) | x.is_nan();
        m = if take { x } else { m };
        at = if take { i } else { at };
    }
    (m, at)
}

/// The pooled shape of `s`.
pub fn pooled(s: Nchw) -> Nchw {
    Nchw {
        h: s.h / 2,
        w: s.w / 2,
        ..s
    }
}

/// Planes per work item for planes of `len` floats.
fn planes_per_item(len: usize) -> usize {
    (MIN_FLOATS / len.max(1)).max(1)
}

/// One plane of [`forward`]: `src` rows `w` wide into `dst` (`o.h x o.w`).
#[inline(always)]
fn plane_forward(src: &[f32], w: usize, dst: &mut [f32], o: Nchw) {
    for (i, row) in dst.chunks_exact_mut(o.w.max(1)).take(o.h).enumerate() {
        let (a, b) = (&src[2 * i * w..][..w], &src[(2 * i + 1) * w..][..w]);
        for (j, y) in row.iter_mut().enumerate() {
            *y = window_max([a[2 * j], a[2 * j + 1], b[2 * j], b[2 * j + 1]]).0;
        }
    }
}

/// `y[n, c, i, j] = max(x[n, c, 2i..2i+2, 2j..2j+2])`.
pub fn forward(x: &[f32], s: Nchw) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let o = pooled(s);
    let per = planes_per_item(s.plane());
    let run = |out: Shared| {
        (0..s.n * s.c)
            .into_par_iter()
            .with_min_len(per)
            .for_each(|p| {
                let src = &x[p * s.plane()..][..s.plane()];
                // SAFETY: plane p of the output, written by this item alone.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.ptr().add(p * o.plane()), o.plane())
                };
                wide(
                    #[inline(always)]
                    || plane_forward(src, s.w, dst, o),
                );
            });
    };
    // SAFETY: each item writes every element of its planes.
    unsafe { filled(o.len(), run) }
}

/// One plane of [`backward`]: each window's `dx` (rows `w` wide) is `dy` at its maximum
/// and zero elsewhere, written whole (no scatter).
#[inline(always)]
fn plane_backward(dx: &mut [f32], x: &[f32], w: usize, dy: &[f32], o: Nchw) {
    for (i, g) in dy.chunks_exact(o.w.max(1)).take(o.h).enumerate() {
        let (r0, r1) = (2 * i * w, (2 * i + 1) * w);
        for (j, &g) in g.iter().enumerate() {
            let (a, b) = (r0 + 2 * j, r1 + 2 * j);
            let (_, at) = window_max([x[a], x[a + 1], x[b], x[b + 1]]);
            let keep = |k| if at == k { g } else { 0.0 };
            dx[a] = keep(0);
            dx[a + 1] = keep(1);
            dx[b] = keep(2);
            dx[b + 1] = keep(3);
        }
    }
}

/// The gradient of [`forward`]: `dy` (the pooled shape) goes to each window's maximum of
/// `x` (shape `s`); every other element of `dx` is zero.
pub fn backward(x: &[f32], s: Nchw, dy: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    let o = pooled(s);
    assert_eq!(
        dy.len(),
        o.len(),
        "gradient does not match the pooled shape"
    );
    let mut dx = vec![0.0f32; s.len()];
    let per = planes_per_item(s.plane());
    dx.par_chunks_mut(s.plane().max(1))
        .zip(x.par_chunks(s.plane().max(1)))
        .zip(dy.par_chunks(o.plane().max(1)))
        .with_min_len(per)
        .for_each(|((dx, x), dy)| {
            wide(
                #[inline(always)]
                || plane_backward(dx, x, s.w, dy, o),
            );
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;

    #[test]
    fn pools_take_each_windows_first_largest_value_and_route_the_gradient_there() {
        // Odd sizes: the last row and column are dropped.
        let s = Nchw {
            n: 2,
            c: 3,
            h: 5,
            w: 7,
        };
        let mut x = values(s.len(), 11);
        // A tie (the first wins) and a NaN (it wins) in plane 0's first windows.
        x[0] = 2.0;
        x[1] = 2.0;
        x[s.w + 2] = f32::NAN;
        let y = forward(&x, s);
        let o = pooled(s);
        assert_eq!((o.h, o.w), (2, 3));
        let dy = values(o.len(), 12);
        let dx = backward(&x, s, &dy);
        for p in 0..s.n * s.c {
            for i in 0..o.h {
                for j in 0..o.w {
                    let at = |r: usize, c: usize| p * s.plane() + (2 * i + r) * s.w + 2 * j + c;
                    let win = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
                    let want = win
                        .iter()
                        .copied()
                        .reduce(|b, k| if x[k] > x[b] || x[k].is_nan() { k } else { b })
                        .unwrap();
                    let yi = p * o.plane() + i * o.w + j;
                    assert_eq!(y[yi].to_bits(), x[want].to_bits(), "value at {p},{i},{j}");
                    for k in win {
                        let g = if k == want { dy[yi] } else { 0.0 };
                        assert_eq!(dx[k], g, "gradient at {k}");
                    }
                }
            }
        }
        assert!(y[1].is_nan() && dx[s.w + 2] == dy[1] && dx[0] == dy[0] && dx[1] == 0.0);
        // The dropped last column and row get no gradient.
        for p in 0..s.n * s.c {
            for r in 0..s.h {
                assert_eq!(dx[p * s.plane() + r * s.w + s.w - 1], 0.0);
            }
            for c in 0..s.w {
                assert_eq!(dx[p * s.plane() + (s.h - 1) * s.w + c], 0.0);
            }
        }
    }
}
