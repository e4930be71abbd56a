//! Transposes of blocks of up to [`B`] by [`B`] floats: an NCHW image's channels into
//! rows of pixels (NHWC), as the weight gradient reads its input. With AVX-512 a block is
//! sixteen loads, 64 shuffles and sixteen stores; an element at a time it was a load and
//! a store per float (and, for the rows, a `memcpy` call each): most of the weight
//! gradient's time outside its GEMM.

#[cfg(target_arch = "x86_64")]
use super::isa::{Isa, isas};

/// A block's side: one AVX-512 register of floats.
pub const B: usize = 16;

/// `dst[j * ds + i] = src[i * ss + j]` for `i < rows`, `j < cols` (both at most [`B`]).
///
/// # Safety
/// `src.add(i * ss + j)` is valid for reads and `dst.add(j * ds + i)` for writes, for
/// every such `(i, j)`; the two do not overlap.
pub unsafe fn block(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    assert!(rows <= B && cols <= B, "a block of {rows}x{cols}");
    #[cfg(target_arch = "x86_64")]
    if isas()[0] == Isa::Avx512 {
        // SAFETY: the processor has AVX-512F; the rest is the caller's promise.
        return unsafe { avx512::block(src, ss, dst, ds, rows, cols) };
    }
    // SAFETY: the caller's promise.
    unsafe { portable(src, ss, dst, ds, rows, cols) }
}

/// [`block`] an element at a time.
///
/// # Safety
/// As [`block`]'s.
unsafe fn portable(src: *const f32, ss: usize, dst: *mut f32, ds: usize, rows: usize, cols: usize) {
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: the caller's promise.
            unsafe { *dst.add(j * ds + i) = *src.add(i * ss + j) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::B;
    use std::arch::x86_64::*;

    /// [`super::block`] with AVX-512: rows past `rows` are zeros, and masks keep the
    /// loads to `cols` floats and the stores to `rows`.
    ///
    /// # Safety
    /// As [`super::block`]'s, and the processor has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        src: *const f32,
        ss: usize,
        dst: *mut f32,
        ds: usize,
        rows: usize,
        cols: usize,
    ) {
        let load_mask = (((1u32 << cols) - 1) & 0xffff) as __mmask16;
        let store_mask = (((1u32 << rows) - 1) & 0xffff) as __mmask16;
        let mut r = [_mm512_setzero_ps(); B];
        // SAFETY: masked loads touch only the caller's `cols` floats of each row.
        unsafe {
            for (i, r) in r.iter_mut().enumerate().take(rows) {
                *r = _mm512_maskz_loadu_ps(load_mask, src.add(i * ss));
            }
        }
        // Pairs of rows interleaved, then quadruples: t[4k + m] holds, in each 128-bit
        // lane L, column 4 L + m of rows 4k..4k + 4.
        let mut t = [_mm512_setzero_ps(); B];
        for k in 0..B / 2 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        let mut u = [_mm512_setzero_ps(); B];
        for k in 0..B / 4 {
            u[4 * k] = _mm512_shuffle_ps::<0x44>(t[4 * k], t[4 * k + 2]);
            u[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * k], t[4 * k + 2]);
            u[4 * k + 2] = _mm512_shuffle_ps::<0x44>(t[4 * k + 1], t[4 * k + 3]);
            u[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * k + 1], t[4 * k + 3]);
        }
        // Lanes across the four groups of rows: column 4 L + m is lane L of u[m],
        // u[4 + m], u[8 + m], u[12 + m].
        for m in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
            let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
            let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
            let out = [
                _mm512_shuffle_f32x4::<0x88>(v0, w0),
                _mm512_shuffle_f32x4::<0x88>(v1, w1),
                _mm512_shuffle_f32x4::<0xDD>(v0, w0),
                _mm512_shuffle_f32x4::<0xDD>(v1, w1),
            ];
            for (l, o) in out.into_iter().enumerate() {
                let j = 4 * l + m;
                if j < cols {
                    // SAFETY: a masked store of the caller's `rows` floats of row j.
                    unsafe { _mm512_mask_storeu_ps(dst.add(j * ds), store_mask, o) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;

    #[test]
    fn blocks_of_every_size_land_transposed_and_touch_nothing_else() {
        let (ss, ds) = (37, 21);
        let src = values(B * ss, 1);
        for (how, block) in [
            (
                "fastest",
                block as unsafe fn(*const f32, usize, *mut f32, usize, usize, usize),
            ),
            ("portable", portable),
        ] {
            for rows in [1, 3, 15, 16] {
                for cols in [1, 7, 16] {
                    let mut dst = vec![f32::NAN; B * ds];
                    // SAFETY: rows of `src` are 37 apart (16 rows), of `dst` 21 apart (16
                    // rows), and the blocks are at most 16 by 16.
                    unsafe { block(src.as_ptr(), ss, dst.as_mut_ptr(), ds, rows, cols) };
                    for j in 0..B {
                        for i in 0..ds {
                            let got = dst[j * ds + i];
                            if i < rows && j < cols {
                                assert_eq!(
                                    got,
                                    src[i * ss + j],
                                    "{how} {rows}x{cols} at ({i}, {j})"
                                );
                            } else {
                                assert!(got.is_nan(), "{how} {rows}x{cols}: ({j}, {i}) written");
                            }
                        }
                    }
                }
            }
        }
    }
}
