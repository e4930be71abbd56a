//! 2-D resampling of slices, row-major (`[h][w]`).
//!
//! Conventions, stated because libraries differ: pixel centres sit at `i + 0.5`
//! (PyTorch's `align_corners=False`). `bilinear` clamps at the borders, so halving a
//! slice equals a 2x2 mean; `area` averages every source pixel by its overlap with the
//! output pixel (OpenCV's `INTER_AREA` when shrinking); `nearest` takes the source pixel
//! whose centre is closest to the output pixel's centre (PyTorch's `nearest-exact`).

/// For one axis, each output index's source taps as (index, weight).
fn area_taps(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let (a, b) = (o as f64 * scale, (o + 1) as f64 * scale);
            let mut taps = Vec::new();
            let mut i = a.floor() as usize;
            while (i as f64) < b && i < n_in {
                let w = (b.min(i as f64 + 1.0) - a.max(i as f64)) / scale;
                if w > 0.0 {
                    taps.push((i, w as f32));
                }
                i += 1;
            }
            taps
        })
        .collect()
}

fn bilinear_taps(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let x = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (x.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let f = (x - i0 as f64) as f32;
            if i0 == i1 || f == 0.0 {
                vec![(i0, 1.0)]
            } else {
                vec![(i0, 1.0 - f), (i1, f)]
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    Area,
    Bilinear,
}

/// Resizes a `[h][w]` image to `[oh][ow]` with a separable filter.
pub fn resize(
    src: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    filter: Filter,
) -> Vec<f32> {
    if (h, w) == (oh, ow) {
        return src.to_vec();
    }
    let taps = |n, m| match filter {
        Filter::Area if m <= n => area_taps(n, m),
        _ => bilinear_taps(n, m),
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    // columns first: [h][w] -> [h][ow]
    let mut mid = vec![0.0f32; h * ow];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        let out = &mut mid[y * ow..(y + 1) * ow];
        for (o, t) in out.iter_mut().zip(&tx) {
            *o = t.iter().map(|&(i, wt)| row[i] * wt).sum();
        }
    }
    let mut out = vec![0.0f32; oh * ow];
    for (oy, t) in ty.iter().enumerate() {
        let dst = &mut out[oy * ow..(oy + 1) * ow];
        for &(y, wt) in t {
            let row = &mid[y * ow..(y + 1) * ow];
            for (d, s) in dst.iter_mut().zip(row) {
                *d += s * wt;
            }
        }
    }
    out
}

/// Nearest-neighbour resize of a label map.
pub fn resize_nearest<T: Copy>(
    src: &[T],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<T> {
    let pick = |n: usize, m: usize| -> Vec<usize> {
        (0..m)
            .map(|o| (((o as f64 + 0.5) * n as f64 / m as f64) as usize).min(n - 1))
            .collect()
    };
    let (ys, xs) = (pick(h, oh), pick(w, ow));
    let mut out = Vec::with_capacity(oh * ow);
    for &y in &ys {
        let row = &src[y * w..(y + 1) * w];
        out.extend(xs.iter().map(|&x| row[x]));
    }
    out
}

/// Pads a `[h][w]` image to a centred square with `fill`; returns it and (top, left).
pub fn pad_square<T: Copy>(
    src: &[T],
    (h, w): (usize, usize),
    fill: T,
) -> (Vec<T>, usize, (usize, usize)) {
    let n = h.max(w);
    let (top, left) = ((n - h) / 2, (n - w) / 2);
    let mut out = vec![fill; n * n];
    for y in 0..h {
        out[(y + top) * n + left..(y + top) * n + left + w]
            .copy_from_slice(&src[y * w..(y + 1) * w]);
    }
    (out, n, (top, left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_is_a_2x2_mean_for_both_filters() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect(); // 4x4
        for f in [Filter::Area, Filter::Bilinear] {
            let out = resize(&src, (4, 4), (2, 2), f);
            assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5], "{f:?}");
        }
    }

    #[test]
    fn area_keeps_the_mean_at_non_integer_factors() {
        let src: Vec<f32> = (0..36).map(|v| (v * 7 % 11) as f32).collect(); // 6x6
        let out = resize(&src, (6, 6), (4, 4), Filter::Area);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&src) - mean(&out)).abs() < 1e-4);
    }

    #[test]
    fn nearest_picks_centre_pixels_and_keeps_values() {
        let src: Vec<u8> = (0..16).collect();
        assert_eq!(resize_nearest(&src, (4, 4), (2, 2)), vec![5, 7, 13, 15]);
        assert_eq!(resize_nearest(&[1u8, 2], (1, 2), (1, 4)), vec![1, 1, 2, 2]);
    }

    #[test]
    fn pad_square_centres_the_image() {
        let (out, n, (top, left)) = pad_square(&[1u8, 2, 3, 4], (1, 4), 0);
        assert_eq!((n, top, left), (4, 1, 0));
        assert_eq!(&out[4..8], &[1, 2, 3, 4]);
        assert_eq!(out.iter().filter(|&&v| v == 0).count(), 12);
    }
}
