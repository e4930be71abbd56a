//! A safe face on the `gemm` crate: matrix views over slices with any (non-negative)
//! strides, checked against their slice before the kernel runs.

/// `rows x cols` elements of `data`, element `(r, c)` at `r * rs + c * cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A row-major `rows x cols` view (row stride `cols`).
pub fn mat(data: &[f32], rows: usize, cols: usize) -> Mat<'_> {
    Mat {
        data,
        rows,
        cols,
        rs: cols,
        cs: 1,
    }
}

impl<'a> Mat<'a> {
    /// The transpose, without moving anything.
    pub fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self, what: &str) {
        check_fits(
            self.data.len(),
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            what,
        );
    }
}

fn check_fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize, what: &str) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * rs + (cols - 1) * cs;
        assert!(
            last < len,
            "gemm: {what} view {rows}x{cols} (strides {rs}, {cs}) overruns its {len} elements"
        );
    }
}

/// `dst = lhs x rhs` (or `dst += lhs x rhs` with `accumulate`), `dst` being `rows x cols`
/// at `dst[r * rs + c * cs]`, on the calling thread.
///
/// # Panics
/// When the shapes disagree or a view overruns its slice.
pub fn gemm(dst: &mut [f32], rs: usize, cs: usize, lhs: Mat, rhs: Mat, accumulate: bool) {
    check_fits(dst.len(), lhs.rows, rhs.cols, rs, cs, "destination");
    // SAFETY: `dst` was checked to hold every element the product writes, and it is
    // borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe { gemm_ptr(dst.as_mut_ptr(), rs, cs, lhs, rhs, accumulate) }
}

/// [`gemm`] into a raw destination, for work items that each write their own part of a
/// shared buffer.
///
/// # Safety
/// `dst.add(r * rs + c * cs)` must be valid for reads and writes for every `r < lhs.rows`,
/// `c < rhs.cols`, and no other thread may touch those elements during the call.
pub unsafe fn gemm_ptr(dst: *mut f32, rs: usize, cs: usize, lhs: Mat, rhs: Mat, accumulate: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    lhs.check("left");
    rhs.check("right");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    // SAFETY: inside the destination the caller vouches for.
                    unsafe { *dst.add(r * rs + c * cs) = 0.0 };
                }
            }
        }
        return;
    }
    // SAFETY: the input views were checked to lie inside their slices (the largest offset
    // each can reach is below its length, strides are non-negative); the destination is
    // the caller's promise; the inputs are shared borrows, which no writer can alias.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            cs as isize,
            rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{rel_err, values};

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for r in 0..a.rows {
            for c in 0..b.cols {
                out[r * b.cols + c] = (0..a.cols)
                    .map(|i| a.data[r * a.rs + i * a.cs] * b.data[i * b.rs + c * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_a_naive_loop() {
        let (m, k, n) = (7, 13, 5);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        // Plain, and with the right factor read transposed from a [n, k] buffer.
        let want = naive(mat(&a, m, k), mat(&b, k, n));
        let mut got = vec![0.0; m * n];
        gemm(&mut got, n, 1, mat(&a, m, k), mat(&b, k, n), false);
        assert!(rel_err(&got, &want) < 1e-6);
        let want_t = naive(mat(&a, m, k), mat(&b, n, k).t());
        gemm(&mut got, n, 1, mat(&a, m, k), mat(&b, n, k).t(), false);
        assert!(rel_err(&got, &want_t) < 1e-6);
        // Accumulating adds to what is there.
        let before = got.clone();
        gemm(&mut got, n, 1, mat(&a, m, k), mat(&b, n, k).t(), true);
        let twice: Vec<f32> = before.iter().map(|v| 2.0 * v).collect();
        assert!(rel_err(&got, &twice) < 1e-6);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_its_slice_is_refused() {
        let a = values(6, 1);
        let mut d = vec![0.0; 4];
        gemm(&mut d, 2, 1, mat(&a, 2, 4), mat(&a, 4, 2), false);
    }
}
