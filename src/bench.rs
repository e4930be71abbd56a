//! `kpipe bench`: throughput measurements, printed as medians over repeats. Speed is
//! measured here, never asserted in tests. The Python sides of the comparisons live in
//! `scripts/`.

use std::path::Path;
use std::time::Instant;

use crate::data::nifti::{NiftiError, Volume};
use crate::data::resample::Filter;
use crate::data::slices::{NonSquare, Normalization, prepare_case};

/// Median of a set of timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The slice stage's per-case work, without writing: read both volumes, window and
/// normalise, transpose to slices, resize images (area) and labels (nearest) to `size`.
/// Returns the number of slices.
pub fn slice_case(imaging: &Path, segmentation: &Path, size: usize) -> Result<usize, NiftiError> {
    let img = Volume::read(imaging)?;
    let seg = Volume::read(segmentation)?;
    let norm = Normalization::Unit {
        lo: -79.0,
        hi: 304.0,
    };
    let p = prepare_case(&img, &seg, norm, size, Filter::Area, NonSquare::Pad)?;
    Ok(p.depth)
}

/// Runs [`slice_case`] `repeat` times; (median seconds, slices).
pub fn bench_slicing(
    imaging: &Path,
    segmentation: &Path,
    size: usize,
    repeat: usize,
) -> Result<(f64, usize), NiftiError> {
    let mut times = Vec::new();
    let mut slices = 0;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        slices = slice_case(imaging, segmentation, size)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((median(times), slices))
}
