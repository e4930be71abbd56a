//! Batch normalisation with an optional ReLU, fused: statistics, the normalised output
//! and the gradients each in one or two passes over an NCHW batch, where burn's generic
//! batch norm transposes the batch to `[channels, rest]` and makes a pass per operation.
//!
//! Sums run per channel plane in f32 lanes, then in f64 over the planes in order:
//! the same bits whatever the thread count.

use rayon::prelude::*;

use super::isa::wide;
use super::{Nchw, Shared, filled, lane_sum, relu_gradient};

/// Plane `(n, c)` of `x` (shape `s`).
#[inline(always)]
fn plane(x: &[f32], s: Nchw, n: usize, c: usize) -> &[f32] {
    &x[(n * s.c + c) * s.plane()..][..s.plane()]
}

/// Per-channel mean and biased variance (two passes: the mean, then squared deviations).
pub fn channel_stats(x: &[f32], s: Nchw) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    (0..s.c)
        .into_par_iter()
        .map(|c| {
            wide(
                #[inline(always)]
                || mean_and_variance(x, s, c),
            )
        })
        .unzip()
}

/// The mean and biased variance of channel `c` of `x` (shape `s`): lane sums per plane,
/// in f64 over the planes in order. Loops, not iterator adaptors: those compile to
/// functions of their own, outside [`wide`]'s vector instructions.
#[inline(always)]
fn mean_and_variance(x: &[f32], s: Nchw, c: usize) -> (f32, f32) {
    let count = (s.n * s.plane()).max(1) as f64;
    let mut sum = 0.0;
    for n in 0..s.n {
        sum += lane_sum(plane(x, s, n, c), |v| v);
    }
    let mean = (sum / count) as f32;
    let mut dev = 0.0;
    for n in 0..s.n {
        dev += lane_sum(plane(x, s, n, c), |v| (v - mean) * (v - mean));
    }
    (mean, (dev / count) as f32)
}

/// Per-channel `(scale, shift)` with `y = x * scale + shift`.
fn affine(mean: &[f32], var: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> Vec<(f32, f32)> {
    (0..mean.len())
        .map(|c| {
            let inv = 1.0 / ((var[c] as f64 + eps).sqrt());
            let scale = (gamma[c] as f64 * inv) as f32;
            (scale, beta[c] - mean[c] * scale)
        })
        .collect()
}

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta`, then `max(0, y)` with `relu`.
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    x: &[f32],
    s: Nchw,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "input does not match its shape");
    for t in [mean, var, gamma, beta] {
        assert_eq!(t.len(), s.c, "per-channel tensor is not [channels]");
    }
    let plane = s.plane();
    let coef = affine(mean, var, gamma, beta, eps);
    let run = |y: Shared| {
        (0..s.n * s.c).into_par_iter().for_each(|i| {
            // SAFETY: plane i of the output, written by this item alone.
            let out = unsafe { std::slice::from_raw_parts_mut(y.ptr().add(i * plane), plane) };
            let inp = &x[i * plane..][..plane];
            wide(
                #[inline(always)]
                || affine_plane(out, inp, coef[i % s.c], relu),
            );
        });
    };
    // SAFETY: the items are the n*c planes, each written whole.
    unsafe { filled(s.len(), run) }
}

/// `out = x * scale + shift`, then `max(0, out)` with `relu`.
#[inline(always)]
fn affine_plane(out: &mut [f32], x: &[f32], (scale, shift): (f32, f32), relu: bool) {
    if relu {
        for (o, v) in out.iter_mut().zip(x) {
            *o = (v * scale + shift).max(0.0);
        }
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}

/// Gradients of [`normalize`] with the batch's own statistics (`mean`, `var` from
/// [`channel_stats`] of `x`): `(dx, dgamma, dbeta)`. `y` is the forward output (its sign
/// is the ReLU's mask).
#[allow(clippy::too_many_arguments)]
pub fn normalize_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    s: Nchw,
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    for t in [x, y, dy] {
        assert_eq!(t.len(), s.len(), "tensor does not match its shape");
    }
    let count = (s.n * s.plane()).max(1) as f32;
    let inv: Vec<f32> = var
        .iter()
        .map(|v| (1.0 / (*v as f64 + eps).sqrt()) as f32)
        .collect();
    let mut sums: Vec<(f32, f32)> = Vec::new();
    let run = |out: Shared| {
        // A channel at a time: its sums, then its gradient while its planes are still in
        // L2 (3 x 8 planes of 16 KiB at 64x64), so the batch streams from memory once,
        // not twice.
        sums = (0..s.c)
            .into_par_iter()
            .map(|c| {
                let t = (x, y, dy);
                let k = (mean[c], inv[c], gamma[c], count);
                if relu {
                    wide(
                        #[inline(always)]
                        || channel_backward::<true>(t, s, c, k, out),
                    )
                } else {
                    wide(
                        #[inline(always)]
                        || channel_backward::<false>(t, s, c, k, out),
                    )
                }
            })
            .collect();
    };
    // SAFETY: the items are the channels, each writing its n planes whole.
    let dx = unsafe { filled(s.len(), run) };
    let (dgamma, dbeta) = sums.into_iter().unzip();
    (dx, dgamma, dbeta)
}

/// Channel `c`'s input gradient, written into its planes of `out` (`[n, c, h, w]`), and
/// its `(dgamma, dbeta)`; `(mean, inv, gamma, count)` are its statistics, scale and the
/// batch's elements per channel.
#[inline(always)]
fn channel_backward<const RELU: bool>(
    (x, y, dy): (&[f32], &[f32], &[f32]),
    s: Nchw,
    c: usize,
    (mean, inv, gamma, count): (f32, f32, f32, f32),
    out: Shared,
) -> (f32, f32) {
    let (dbeta, dgamma) = gradient_sums::<RELU>((x, y, dy), s, c, mean);
    let (dgamma, dbeta) = ((dgamma * inv as f64) as f32, dbeta as f32);
    let k = Coefs {
        mean,
        inv,
        scale: gamma * inv,
        dbeta: dbeta / count,
        dgamma: dgamma / count,
    };
    for n in 0..s.n {
        let off = (n * s.c + c) * s.plane();
        // SAFETY: plane (n, c) of the output, inside it, written by channel c's item
        // alone.
        let o = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(off), s.plane()) };
        let at = |t| plane(t, s, n, c);
        plane_dx::<RELU>(o, at(x), at(y), at(dy), k);
    }
    (dgamma, dbeta)
}

/// Lanes the gradient's loops run in (a 16-float register, or two of 8).
const LANES: usize = 16;

/// The gradient reaching the normalisation: `dy` where the ReLU (if `RELU`) passed it.
#[inline(always)]
fn passed<const RELU: bool>(dy: f32, y: f32) -> f32 {
    if RELU { relu_gradient(dy, y) } else { dy }
}

/// `(sum g, sum g (x - mean))` over a plane, `g` the gradient [`passed`], in [`LANES`]
/// lanes then in f64.
#[inline(always)]
fn plane_sums<const RELU: bool>(x: &[f32], y: &[f32], dy: &[f32], mean: f32) -> (f64, f64) {
    let (mut sb, mut sg) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (xc, xr) = x.as_chunks::<LANES>();
    let (yc, yr) = y.as_chunks::<LANES>();
    let (dc, dr) = dy.as_chunks::<LANES>();
    for ((x, y), d) in xc.iter().zip(yc).zip(dc) {
        for j in 0..LANES {
            let g = passed::<RELU>(d[j], y[j]);
            sb[j] += g;
            sg[j] += g * (x[j] - mean);
        }
    }
    let (mut b, mut g) = (0.0f64, 0.0f64);
    for ((x, y), d) in xr.iter().zip(yr).zip(dr) {
        let gv = passed::<RELU>(*d, *y);
        b += gv as f64;
        g += (gv * (x - mean)) as f64;
    }
    (
        b + sb.iter().map(|v| *v as f64).sum::<f64>(),
        g + sg.iter().map(|v| *v as f64).sum::<f64>(),
    )
}

/// `(sum g, sum g (x - mean))` over channel `c` of the `(x, y, dy)` batches, in f64
/// over the planes in order.
#[inline(always)]
fn gradient_sums<const RELU: bool>(
    (x, y, dy): (&[f32], &[f32], &[f32]),
    s: Nchw,
    c: usize,
    mean: f32,
) -> (f64, f64) {
    let (mut b, mut g) = (0.0, 0.0);
    for n in 0..s.n {
        let at = |t| plane(t, s, n, c);
        let (pb, pg) = plane_sums::<RELU>(at(x), at(y), at(dy), mean);
        b += pb;
        g += pg;
    }
    (b, g)
}

/// A channel's constants in its input gradient.
#[derive(Clone, Copy)]
struct Coefs {
    mean: f32,
    inv: f32,
    /// gamma / sqrt(var + eps)
    scale: f32,
    /// dbeta and dgamma over the element count
    dbeta: f32,
    dgamma: f32,
}

/// `dx = scale (g - dbeta/count - xhat dgamma/count)` over a plane, `g` [`passed`].
#[inline(always)]
fn plane_dx<const RELU: bool>(o: &mut [f32], x: &[f32], y: &[f32], dy: &[f32], k: Coefs) {
    let one = |x: f32, y: f32, d: f32| {
        let xhat = (x - k.mean) * k.inv;
        k.scale * (passed::<RELU>(d, y) - k.dbeta - xhat * k.dgamma)
    };
    let (oc, or) = o.as_chunks_mut::<LANES>();
    let (xc, xr) = x.as_chunks::<LANES>();
    let (yc, yr) = y.as_chunks::<LANES>();
    let (dc, dr) = dy.as_chunks::<LANES>();
    for (((o, x), y), d) in oc.iter_mut().zip(xc).zip(yc).zip(dc) {
        for j in 0..LANES {
            o[j] = one(x[j], y[j], d[j]);
        }
    }
    for (((o, x), y), d) in or.iter_mut().zip(xr).zip(yr).zip(dr) {
        *o = one(*x, *y, *d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::isa::{isas, on};
    use crate::kernels::testing::{rel_err, values};

    /// The element loops of the gradient and the statistics, bits out.
    #[inline(always)]
    fn loops(x: &[f32], y: &[f32], dy: &[f32], k: Coefs) -> (Vec<u32>, (f64, f64), f64) {
        let mut o = vec![0.0; x.len()];
        plane_dx::<true>(&mut o, x, y, dy, k);
        let sums = plane_sums::<true>(x, y, dy, k.mean);
        let stat = lane_sum(x, |v| (v - k.mean) * (v - k.mean));
        (o.iter().map(|v| v.to_bits()).collect(), sums, stat)
    }

    #[test]
    fn the_loops_give_the_same_bits_at_every_vector_width() {
        let (x, y, dy) = (values(1000, 1), values(1000, 2), values(1000, 3));
        let k = Coefs {
            mean: 0.1,
            inv: 1.7,
            scale: 0.9,
            dbeta: 0.01,
            dgamma: -0.02,
        };
        let want = loops(&x, &y, &dy, k);
        for &isa in isas() {
            assert_eq!(
                on(
                    isa,
                    #[inline(always)]
                    || loops(&x, &y, &dy, k)
                ),
                want,
                "{isa:?}"
            );
        }
    }

    /// The loss `sum(normalize(x) * w)` with batch statistics, in f64.
    fn loss(x: &[f32], s: Nchw, gamma: &[f32], beta: &[f32], w: &[f32], relu: bool) -> f64 {
        let plane = s.plane();
        let cnt = (s.n * plane) as f64;
        let mut total = 0.0;
        for c in 0..s.c {
            let vals: Vec<(usize, f64)> = (0..s.n)
                .flat_map(|n| (0..plane).map(move |p| (n * s.c + c) * plane + p))
                .map(|i| (i, x[i] as f64))
                .collect();
            let mean = vals.iter().map(|v| v.1).sum::<f64>() / cnt;
            let var = vals.iter().map(|v| (v.1 - mean).powi(2)).sum::<f64>() / cnt;
            for (i, v) in vals {
                let mut y = (v - mean) / (var + 1e-5).sqrt() * gamma[c] as f64 + beta[c] as f64;
                if relu {
                    y = y.max(0.0);
                }
                total += y * w[i] as f64;
            }
        }
        total
    }

    #[test]
    fn normalisation_and_its_gradients_match_finite_differences() {
        let s = Nchw {
            n: 2,
            c: 3,
            h: 3,
            w: 5,
        };
        let x: Vec<f32> = values(s.len(), 1).iter().map(|v| v * 3.0 + 0.5).collect();
        let gamma = values(s.c, 2);
        let beta = values(s.c, 3);
        let w = values(s.len(), 4);
        for relu in [false, true] {
            let (mean, var) = channel_stats(&x, s);
            let y = normalize(&x, s, &mean, &var, &gamma, &beta, 1e-5, relu);
            let want = loss(&x, s, &gamma, &beta, &w, relu);
            let got: f64 = y
                .iter()
                .zip(&w)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            assert!((got - want).abs() < 1e-4, "forward {got} vs {want}");
            let (dx, dgamma, dbeta) =
                normalize_backward(&x, &y, &w, s, &mean, &var, &gamma, 1e-5, relu);
            let h = 1e-3;
            let fd = |f: &dyn Fn(f32) -> f64| ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
            let want_dx: Vec<f32> = (0..s.len())
                .map(|i| {
                    fd(&|d| {
                        let mut xp = x.clone();
                        xp[i] += d;
                        loss(&xp, s, &gamma, &beta, &w, relu)
                    })
                })
                .collect();
            assert!(rel_err(&dx, &want_dx) < 2e-3, "dx relu={relu}");
            let want_dg: Vec<f32> = (0..s.c)
                .map(|c| {
                    fd(&|d| {
                        let mut g = gamma.clone();
                        g[c] += d;
                        loss(&x, s, &g, &beta, &w, relu)
                    })
                })
                .collect();
            assert!(rel_err(&dgamma, &want_dg) < 2e-3, "dgamma relu={relu}");
            let want_db: Vec<f32> = (0..s.c)
                .map(|c| {
                    fd(&|d| {
                        let mut b = beta.clone();
                        b[c] += d;
                        loss(&x, s, &gamma, &b, &w, relu)
                    })
                })
                .collect();
            assert!(rel_err(&dbeta, &want_db) < 2e-3, "dbeta relu={relu}");
        }
    }
}
