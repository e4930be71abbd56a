//! Kernels for the CPU backend, on plain `f32` slices in NCHW order: convolutions, batch
//! norm, max pool, and Adam's step.
//!
//! burn-flex's own convolution re-lays the weights and copies the input to NHWC on every
//! call, and its gradients run through burn's generic defaults (a transposed convolution
//! with a scalar col2im for the input, a skinny GEMM for the weights). These kernels do
//! the study networks' shapes directly: the 3x3 and 1x1 convolutions on a GEMM of kpipe's
//! own ([`packed`]: the input's columns read in place or packed straight from NCHW rows,
//! the input gradient as a convolution with the flipped weights, the weight gradient
//! with the long pixel axis as its depth, from the input as padded NHWC); the 2x2
//! transposed convolutions on the `gemm` crate (AVX2 or AVX-512 chosen at run time),
//! written straight into the U-Net's concatenations ([`upconv::forward_cat`]); batch
//! norm fused with its ReLU ([`norm`]); the 2x2 max pool ([`pool`]); Adam's step in one
//! pass ([`adam`]).
//!
//! Work is split over (image, tile) items on rayon's pool, each item a single-threaded
//! GEMM whose result does not depend on which thread runs it; reductions (weight and
//! bias gradients) sum fixed groups in a fixed order. Results are therefore the same
//! bits whatever the thread count.
//!
//! This layer knows nothing of burn: `crate::models::ops` adapts burn's tensors to it.

pub mod adam;
pub mod conv;
pub mod gemm;
mod isa;
pub mod norm;
pub mod packed;
pub mod pool;
mod transpose;
pub mod upconv;

/// Shape of an NCHW batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nchw {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Nchw {
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pixels of one channel plane.
    pub fn plane(&self) -> usize {
        self.h * self.w
    }
}

/// Rows `r0..r1` of every channel of image `n` of an NCHW batch `t` of shape `s`, in
/// place: a `s.c x (r1 - r0) * s.w` matrix with row stride `s.h * s.w`.
fn band(t: &[f32], s: Nchw, n: usize, r0: usize, r1: usize) -> gemm::Mat<'_> {
    let plane = s.plane();
    gemm::Mat {
        data: &t[n * s.c * plane + r0 * s.w..],
        rows: s.c,
        cols: (r1 - r0) * s.w,
        rs: plane,
        cs: 1,
    }
}

/// A raw output pointer shared by work items that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

impl Shared {
    /// The pointer (a method, so closures capture the whole `Shared`, which is `Sync`).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user hands each work item a region no other item touches, and the
// buffer outlives the parallel loop (it is borrowed mutably across it).
unsafe impl Send for Shared {}
// SAFETY: as above; the pointer itself is only copied, never used to alias a write.
unsafe impl Sync for Shared {}

thread_local! {
    /// This thread's scratch buffers, kept from call to call: a fresh buffer per work
    /// item would be zeroed (a pass of its own) and often fresh pages from the OS.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Runs `f` with this thread's three scratch buffers. `f` must not start rayon work: the
/// pool could run another item on this thread while the buffers are lent (a panic).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    SCRATCH.with_borrow_mut(|[a, b, c]| f(a, b, c))
}

/// The first `len` floats of `v`, grown (never shrunk) to hold them; what they hold is
/// whatever was there: callers write before they read.
fn scratch(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// A buffer of `len` floats allocated without zeroing (a batch's activations are tens of
/// MB: zeroing them first is a pass of its own), which `fill` writes.
///
/// # Safety
/// `fill` must write every one of the `len` elements through the pointer it is given.
unsafe fn filled(len: usize, fill: impl FnOnce(Shared)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(Shared(v.as_mut_ptr()));
    // SAFETY: the capacity is `len` and `fill` initialised every element (the caller's
    // promise).
    unsafe { v.set_len(len) };
    v
}

/// A ReLU's gradient: `g` where its output `y` is positive, else `+0`, as a bit mask: a
/// branch mispredicts on half the elements of a feature map (the batch norm's gradient
/// ran 3x slower with one), and the mask vectorises.
#[inline(always)]
fn relu_gradient(g: f32, y: f32) -> f32 {
    f32::from_bits(g.to_bits() & ((y > 0.0) as u32).wrapping_neg())
}

/// Groups a reduction over `items` is cut into: fixed, so sums do not depend on the
/// number of threads.
const REDUCE_GROUPS: usize = 8;

/// Sums `parts` (each `len` long) in order into the first.
fn reduce_in_order(mut parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut acc = parts.remove(0);
    for p in &parts {
        for (a, b) in acc.iter_mut().zip(p) {
            *a += b;
        }
    }
    acc
}

/// Sum of `f(v)` over `v` in eight f32 lanes, then the lanes in f64: it vectorises
/// (a plain sum is one chain of dependent adds).
#[inline(always)]
pub(crate) fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0.0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f(*x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| f(*x)).sum();
    acc.iter().map(|a| *a as f64).sum::<f64>() + tail as f64
}

/// Per-channel sums of an NCHW batch (a bias's gradient): [`lane_sum`]s of the planes,
/// added in f64 in image order.
pub fn channel_sums(dy: &[f32], s: Nchw) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(
        dy.len(),
        s.len(),
        "gradient buffer does not match its shape"
    );
    let plane = s.plane();
    (0..s.c)
        .into_par_iter()
        .map(|c| {
            let planes = (0..s.n).map(|n| &dy[(n * s.c + c) * plane..][..plane]);
            isa::wide(
                #[inline(always)]
                || {
                    let mut sum = 0.0;
                    for p in planes {
                        sum += lane_sum(p, |v| v);
                    }
                    sum as f32
                },
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    /// Deterministic pseudo-random values in [-1, 1).
    pub fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The gradient of `<f(v), dy>` with respect to `v` (`len` long) for a linear `f`:
    /// entry `e` is `<f(unit e), dy>`, in f64.
    pub fn adjoint(len: usize, dy: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
        (0..len)
            .map(|e| {
                let mut u = vec![0.0; len];
                u[e] = 1.0;
                f(&u)
                    .iter()
                    .zip(dy)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// Largest absolute difference, relative to the largest magnitude of `want`.
    pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }
}
