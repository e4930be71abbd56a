//! The geometric kernels: flips, quarter turns, and warps through an inverse map
//! (images bilinear with clamped edges, labels at the nearest pixel).

use super::Sample;

/// Resamples a sample through `source(y, x)`, the input position (pixels) that output
/// pixel (y, x) shows: images bilinearly with edges clamped, labels at the nearest pixel
/// with background outside.
pub(super) fn warp(s: &mut Sample, source: impl Fn(f64, f64) -> (f64, f64)) {
    let n = s.size;
    let last = n as f64 - 1.0;
    let map: Vec<(f64, f64)> = (0..n * n)
        .map(|i| source((i / n) as f64, (i % n) as f64))
        .collect();
    for plane in s.planes_mut() {
        let src = plane.to_vec();
        for (o, &(y, x)) in plane.iter_mut().zip(&map) {
            let (y, x) = (y.clamp(0.0, last), x.clamp(0.0, last));
            let (y0, x0) = (y.floor() as usize, x.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(n - 1), (x0 + 1).min(n - 1));
            let (fy, fx) = ((y - y0 as f64) as f32, (x - x0 as f64) as f32);
            let at = |yy: usize, xx: usize| src[yy * n + xx];
            let top = at(y0, x0) + (at(y0, x1) - at(y0, x0)) * fx;
            let bottom = at(y1, x0) + (at(y1, x1) - at(y1, x0)) * fx;
            *o = top + (bottom - top) * fy;
        }
    }
    let labels = s.labels.clone();
    for (o, &(y, x)) in s.labels.iter_mut().zip(&map) {
        let (y, x) = (y.round(), x.round());
        *o = if (0.0..=last).contains(&y) && (0.0..=last).contains(&x) {
            labels[y as usize * n + x as usize]
        } else {
            0
        };
    }
}

pub(super) fn flip_h<T>(p: &mut [T], n: usize) {
    for row in p.chunks_mut(n) {
        row.reverse();
    }
}

pub(super) fn flip_v<T: Copy>(p: &mut [T], n: usize) {
    for y in 0..n / 2 {
        let (a, b) = p.split_at_mut((n - 1 - y) * n);
        a[y * n..(y + 1) * n].swap_with_slice(&mut b[..n]);
    }
}

/// Rotates a square plane by k quarter turns counter-clockwise.
pub(super) fn rot90<T: Copy>(p: &mut [T], n: usize, k: usize) {
    for _ in 0..k % 4 {
        let src = p.to_vec();
        for y in 0..n {
            for x in 0..n {
                // (y, x) <- (x, n - 1 - y)
                p[y * n + x] = src[x * n + (n - 1 - y)];
            }
        }
    }
}
