//! Slicing kernels: volumes in NIfTI order (the slice axis fastest, as KiTS19's) cut
//! into C-order slices, whole or shrunk by block means, in one blocked pass over the
//! voxels. The slice stage ([`super::slices::prepare_case`]) calls them.

use super::nifti::{NiftiError, Volume, by_datatype};

impl Volume {
    /// The 3-D volume as C-order slices shrunk by an integer `factor` in rows and columns
    /// by block means (what an area filter does at integer factors), `map` applied to
    /// every value first. One pass over the voxels, no full-size intermediate.
    pub fn pooled_slices_f32(
        &self,
        map: impl Fn(f32) -> f32 + Copy,
        factor: usize,
    ) -> Result<Vec<f32>, NiftiError> {
        let [n1, n2, n3] = self.shape3()?;
        if factor == 0 || n2 % factor != 0 || n3 % factor != 0 {
            return Err(NiftiError::Invalid {
                path: self.path.clone(),
                why: format!("{n2}x{n3} slices do not shrink by {factor}"),
            });
        }
        let (m2, m3) = (n2 / factor, n3 / factor);
        let scaling = self.scaling()?;
        let (raw, be) = (self.voxels(), self.big_endian);
        let weight = 1.0 / (factor * factor) as f32;
        // each output column (all slices at one pixel) sums factor^2 input columns, each
        // decoded by a typed, vectorisable loop; the order of the sum is row-major
        let mut column = vec![0.0f32; n1];
        macro_rules! go {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                gather_columns([n1, m2, m3], |r, c, sum: &mut [f32]| {
                    let map = map; // a local copy: its constants stay in registers
                    sum.fill(0.0);
                    for j in factor * r..factor * (r + 1) {
                        for l in factor * c..factor * (c + 1) {
                            let src = (n1 * j + n1 * n2 * l) * N;
                            let bytes = raw[src..src + n1 * N].chunks_exact(N);
                            let decode = |b: &[u8]| {
                                let b: [u8; N] = b.try_into().expect("chunk size");
                                if be {
                                    <$t>::from_be_bytes(b)
                                } else {
                                    <$t>::from_le_bytes(b)
                                }
                            };
                            match scaling {
                                None => column
                                    .iter_mut()
                                    .zip(bytes)
                                    .for_each(|(c, b)| *c = decode(b) as f32),
                                Some((s, o)) => column
                                    .iter_mut()
                                    .zip(bytes)
                                    .for_each(|(c, b)| *c = (decode(b) as f64 * s + o) as f32),
                            }
                            for (s, &v) in sum.iter_mut().zip(&column) {
                                *s += map(v) * weight;
                            }
                        }
                    }
                })
            }};
        }
        Ok(by_datatype!(self.datatype, go))
    }

    /// The 3-D volume as C-order slices along its first axis (the KiTS19 slice axis):
    /// `out[k][j][l] = v[k, j, l]`, with `map` applied to every value.
    /// Decoding, scaling and `map` happen inside the blocked transpose: one pass, no
    /// intermediate volume.
    pub fn to_slices_f32(&self, map: impl Fn(f32) -> f32) -> Result<Vec<f32>, NiftiError> {
        let dims = self.shape3()?;
        let scaling = self.scaling()?;
        let (raw, be) = (self.voxels(), self.big_endian);
        macro_rules! go {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                let value = |i: usize| -> f64 {
                    let b: [u8; N] = raw[i * N..i * N + N].try_into().expect("chunk size");
                    (if be {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    }) as f64
                };
                match scaling {
                    None => transpose_indexed(dims, |i| map(value(i) as f32)),
                    Some((s, b)) => transpose_indexed(dims, |i| map((value(i) * s + b) as f32)),
                }
            }};
        }
        Ok(by_datatype!(self.datatype, go))
    }
}

/// Blocked transpose of a Fortran-order (n1, n2, n3) array into C order, mapping values:
/// `out[(k * n2 + j) * n3 + l] = map(values[k + n1 * (j + n2 * l)])`.
pub fn transpose_fortran_to_c<T: Copy, U: Copy + Default>(
    values: &[T],
    dims: [usize; 3],
    map: impl Fn(T) -> U,
) -> Vec<U> {
    transpose_indexed(dims, |i| map(values[i]))
}

/// The transpose behind [`transpose_fortran_to_c`]: `value(i)` gives the element at
/// Fortran-order index `i`.
#[inline]
pub fn transpose_indexed<U: Copy + Default>(
    [n1, n2, n3]: [usize; 3],
    value: impl Fn(usize) -> U,
) -> Vec<U> {
    gather_columns([n1, n2, n3], |j, l, column: &mut [U]| {
        let src = n1 * j + n1 * n2 * l;
        for (k, c) in column.iter_mut().enumerate() {
            *c = value(src + k);
        }
    })
}

/// Builds C-order slices `out[k][r][c]` (`depth` slices of `rows` x `cols`) a column at a
/// time: `column(r, c, buf)` fills `buf` with the `depth` values along the slice axis at
/// pixel (r, c), which a volume in NIfTI order (slice axis fastest, as KiTS19's) holds
/// contiguously. The slice axis is the fastest in the file and the slowest in the
/// output, so the work goes in blocks of `ROWS` x `COLS` columns (an L2-sized tile):
/// within a block, consecutive calls read consecutive rows of one column of the file
/// (a sequential stream), and the block leaves as runs of `COLS` values per slice row.
pub fn gather_columns<U: Copy + Default>(
    [depth, rows, cols]: [usize; 3],
    mut column: impl FnMut(usize, usize, &mut [U]),
) -> Vec<U> {
    const COLS: usize = 32;
    const ROWS: usize = 8;
    let mut out = vec![U::default(); depth * rows * cols];
    if out.is_empty() {
        return out;
    }
    let mut tile = vec![U::default(); COLS * ROWS * depth];
    for c0 in (0..cols).step_by(COLS) {
        let width = COLS.min(cols - c0);
        for r0 in (0..rows).step_by(ROWS) {
            let height = ROWS.min(rows - r0);
            for c in 0..width {
                for r in 0..height {
                    column(r0 + r, c0 + c, &mut tile[(c * ROWS + r) * depth..][..depth]);
                }
            }
            for k in 0..depth {
                for r in 0..height {
                    let run = &mut out[(k * rows + r0 + r) * cols + c0..][..width];
                    for (c, o) in run.iter_mut().enumerate() {
                        *o = tile[(c * ROWS + r) * depth + k];
                    }
                }
            }
        }
    }
    out
}
