//! The convolutions' GEMM: `C = A B` with `A` (the weights, or an output gradient) read
//! where it lies in panels of up to [`MR`] rows ([`Lhs`]), `B` (a work item's columns)
//! read in place or packed by the caller straight from the image into panels of [`NR`]
//! columns (im2col and packing in one pass), and an `MR x NR` microkernel: AVX-512 where
//! the processor has it (one 16-float register per row), else AVX2 with FMA (two 8-float
//! registers per row), else the same arithmetic in plain Rust.
//!
//! Every element of `C` is its initial value (zero, a bias, or what `C` held) followed by
//! the products `A[r, k] B[k, q]` added one at a time with a fused multiply-add, in `k`
//! order. Blocking (the depth is cut into blocks that fit the caches; each block loads
//! `C` and goes on from it) does not change that order, nor do the tiling, the thread
//! count or the vector width: results are the same bits on every x86-64 machine with
//! AVX-512, or AVX2 and FMA, and in the portable kernel (where `f32::mul_add` is a true fused
//! multiply-add).

use super::isa::{Isa, isas};
use std::ops::Range;

/// Rows of `A` (and of `C`) per microkernel call.
pub const MR: usize = 6;
/// Columns of `B` (and of `C`) per microkernel call: one AVX-512 register, or two AVX
/// ones.
pub const NR: usize = 16;
/// Floats a packed block of `B` aims at (256 KiB: half a Zen 3 core's L2).
const B_BLOCK_FLOATS: usize = 64 * 1024;
/// Floats a block of `A` aims at, when `B` is read in place (half of L2).
const A_BLOCK_FLOATS: usize = 64 * 1024;

/// `A` (`m x k`) read where it lies, never copied: element `(r, t)` at
/// `data[r * rs + col(t)]`, `col(t)` being `t` (rows of a matrix, `rs` apart) or
/// `cols[t]` (any gather that is the same for every row, e.g. the flipped, transposed
/// weights of an input gradient). It is cut into panels of at most [`MR`] rows, which
/// the kernel reads a row each, and into depth blocks of `kc`.
///
/// Packing `A` into panels first cost a read, a write and a second read of the weights
/// in every call: a tenth of a deep layer's time on small images, whose weights are
/// larger than their activations.
pub struct Lhs<'a> {
    data: &'a [f32],
    rs: usize,
    cols: Option<&'a [usize]>,
    /// First row of each panel, and `m` last.
    starts: Vec<usize>,
    k: usize,
    kc: usize,
}

/// Panel heights for `m` rows: [`MR`] each, the rest in panels of 4 where it can be (a
/// 4-row panel runs at the full rate of the kernel; 2 rows at half of it).
fn heights(m: usize) -> Vec<usize> {
    let (full, rest) = (m / MR, m % MR);
    let mut h = vec![MR; full];
    match rest {
        0 => {}
        2 if full > 0 => {
            h.pop();
            h.extend([4, 4]);
        }
        r => h.push(r),
    }
    h
}

impl<'a> Lhs<'a> {
    /// The `m x k` matrix whose row `r` is `data[r * rs..][..k]`, in depth blocks of
    /// `kc` ([`depth_block`], [`depth_block_in_place`]).
    ///
    /// # Panics
    /// When a row overruns `data`.
    pub fn rows(data: &'a [f32], m: usize, k: usize, rs: usize, kc: usize) -> Self {
        Self::new(data, m, k, rs, None, kc)
    }

    /// The `m x cols.len()` matrix whose element `(r, t)` is `data[r * rs + cols[t]]`.
    ///
    /// # Panics
    /// When an element lies outside `data`.
    pub fn gathered(data: &'a [f32], m: usize, rs: usize, cols: &'a [usize], kc: usize) -> Self {
        Self::new(data, m, cols.len(), rs, Some(cols), kc)
    }

    fn new(
        data: &'a [f32],
        m: usize,
        k: usize,
        rs: usize,
        cols: Option<&'a [usize]>,
        kc: usize,
    ) -> Self {
        if m > 0 && k > 0 {
            let last_col = cols.map_or(k - 1, |c| c.iter().copied().max().unwrap_or(0));
            let last = (m - 1) * rs + last_col;
            assert!(
                last < data.len(),
                "A: {m} rows {rs} apart, columns to {last_col}, overrun {} floats",
                data.len()
            );
        }
        let mut starts = vec![0];
        for h in heights(m) {
            starts.push(starts.last().unwrap() + h);
        }
        Lhs {
            data,
            rs,
            cols,
            starts,
            k,
            kc: kc.max(1),
        }
    }

    pub fn height(&self) -> usize {
        *self.starts.last().unwrap()
    }

    /// Panels (of at most [`MR`] rows).
    pub fn panels(&self) -> usize {
        self.starts.len() - 1
    }

    /// The depth blocks: `(k0, kb)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + use<> {
        let (k, kc) = (self.k, self.kc);
        (0..k).step_by(kc).map(move |k0| (k0, kc.min(k - k0)))
    }

    /// Panel `i`'s first row and height.
    fn panel_rows(&self, i: usize) -> (usize, usize) {
        (self.starts[i], self.starts[i + 1] - self.starts[i])
    }
}

/// Depth of a block for packed `B` operands `p` columns wide: the packed block of `B`
/// stays near [`B_BLOCK_FLOATS`].
pub fn depth_block(p: usize) -> usize {
    (B_BLOCK_FLOATS / p.div_ceil(NR).max(1) / NR).clamp(64, 1024)
}

/// Depth of a block for `m` rows of `A` with `B` read in place ([`multiply_in_place`]):
/// the block of `A` stays near [`A_BLOCK_FLOATS`].
pub fn depth_block_in_place(m: usize) -> usize {
    (A_BLOCK_FLOATS / heights(m).len().max(1) / MR).max(64)
}

/// Where column `q` of `C` lies: `ptr + (q / seg) * seg_stride + q % seg`, row `r` of it
/// `ldc` further per row (columns come in runs of `seg`, e.g. one image's band each).
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub ptr: *mut f32,
    pub ldc: usize,
    pub seg: usize,
    pub seg_stride: usize,
}

impl Out {
    fn at(&self, r: usize, q: usize) -> *mut f32 {
        self.ptr
            .wrapping_add((q / self.seg) * self.seg_stride + q % self.seg + r * self.ldc)
    }
}

/// What `C` starts from.
#[derive(Debug, Clone, Copy)]
pub enum Init<'a> {
    /// Row `r` starts at `bias[r]` (zero without a bias).
    Set(Option<&'a [f32]>),
    /// `C` goes on from what it holds.
    Add,
}

/// `C[r, q] = init + sum_t A[r, t] B[t, q]` for the rows of panels `panels` of `a` and
/// the `p` columns `pack` packs: called with `(k0, kb, buf)` it writes `B`'s rows
/// `k0..k0 + kb` into `buf` (`p` rounded up to [`NR`], times `kb` floats) as panels
/// `[kb][NR]`, one per [`NR`] columns (columns past `p` are ignored). `bbuf` is the
/// caller's scratch space.
///
/// # Safety
/// Every `out.at(r, q)`, `r` a row of the panels, `q < p`, must be valid for
/// reads and writes and touched by no other thread during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply(
    a: &Lhs,
    panels: Range<usize>,
    p: usize,
    pack: impl FnMut(usize, usize, &mut [f32]),
    out: Out,
    init: Init,
    bbuf: &mut Vec<f32>,
) {
    // SAFETY: the caller's promise.
    unsafe {
        match a.cols {
            None => multiply_by(a, Run::at(a), panels, p, pack, out, init, bbuf),
            Some(cols) => multiply_by(a, Gather::at(a, cols), panels, p, pack, out, init, bbuf),
        }
    }
}

/// [`multiply`] with `A`'s panels read by `panel(r0, k0)`.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_by<A: Panel>(
    a: &Lhs,
    panel: impl Fn(usize, usize) -> A,
    panels: Range<usize>,
    p: usize,
    mut pack: impl FnMut(usize, usize, &mut [f32]),
    out: Out,
    init: Init,
    bbuf: &mut Vec<f32>,
) {
    check(a, &panels, init);
    let np = p.div_ceil(NR) * NR;
    let kernels = Kernels::<A, Packed>::new();
    for (k0, kb) in a.blocks() {
        let b = super::scratch(bbuf, np * kb);
        pack(k0, kb, b);
        for i in panels.clone() {
            // One panel at a time: it stays in L1 while the block of B streams from L2.
            let (r0, nrows) = a.panel_rows(i);
            let ap = panel(r0, k0);
            let start = start_rows(init, k0, r0, nrows);
            let next = (i + 1 < panels.end).then(|| {
                let (r0, nrows) = a.panel_rows(i + 1);
                (panel(r0, k0), nrows)
            });
            let tiles = np / NR;
            for (j, bp) in b.chunks_exact(NR * kb).enumerate() {
                if let Some((an, rows)) = next {
                    // The next panel of `A` on its way to L1 while this one works: its
                    // first tile would otherwise wait on memory (deep layers of small
                    // images, whose weights are read once per block).
                    // SAFETY: depths below kb, rows of the next panel.
                    unsafe { prefetch_panel(an, a.rs, rows, j * kb / tiles..(j + 1) * kb / tiles) };
                }
                let q0 = j * NR;
                let ncols = NR.min(p - q0);
                let straight = ncols == NR && q0 % out.seg + NR <= out.seg;
                let at = |r, c| out.at(r0 + r, q0 + c);
                // SAFETY: the tile's elements are the caller's promise; `A`'s rows were
                // checked against its data, B's panel holds NR * kb floats.
                unsafe {
                    tile(
                        kernels.get(nrows),
                        (kb, a.rs),
                        ap,
                        Packed(bp.as_ptr()),
                        start,
                        (nrows, ncols),
                        straight.then(|| (at(0, 0), out.ldc)),
                        at,
                    );
                };
            }
        }
    }
    if a.k == 0
        && let Init::Set(bias) = init
    {
        // No products: C is its initial value.
        for r in a.starts[panels.start]..a.starts[panels.end] {
            for q in 0..p {
                // SAFETY: an element the caller vouches for.
                unsafe { *out.at(r, q) = bias.map_or(0.0, |b| b[r]) };
            }
        }
    }
}

/// Asks for the cache lines of depths `ts` of the `rows` rows (`rs` apart) of panel `a`
/// (every eighth depth: a line holds sixteen floats of a row, and a gathered panel's
/// runs are nine long).
///
/// # Safety
/// `ts` below the depth the panel was made for.
#[inline(always)]
unsafe fn prefetch_panel<A: Panel>(a: A, rs: usize, rows: usize, ts: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    for t in ts.step_by(8) {
        // SAFETY: `t` is below the panel's depth (the caller's promise).
        let p = unsafe { a.row(t) };
        for r in 0..rows {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(r * rs).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (a, rs, rows, ts);
}

/// The panels are `A`'s and a bias has a value for each of their rows.
fn check(a: &Lhs, panels: &Range<usize>, init: Init) {
    assert!(
        panels.end <= a.panels(),
        "panels {panels:?} of {}",
        a.panels()
    );
    if let Init::Set(Some(b)) = init {
        assert!(b.len() >= a.height(), "bias shorter than the rows");
    }
}

/// `C[r, q] = init + sum_t A[r, t] B[t, q]` as [`multiply`] computes it, with `B` read
/// in place: column `c` of tile `j` (of `tiles`) at depth `t` is
/// `base[offsets[t] + c]`, where `tile(j)` gives `(base, C's column 0 of the tile,
/// columns in the tile)`; a tile of fewer than [`NR`] columns may still read all [`NR`]
/// floats from each `base + offsets[t]`. `C`'s rows are `ldc` apart.
///
/// # Safety
/// For every tile, `base + offsets[t] + c` is valid for reads for `t < a`'s depth,
/// `c < NR`; the tile's `C` elements (the rows of panels `panels`) valid for reads and
/// writes, touched by no other thread during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply_in_place(
    a: &Lhs,
    panels: Range<usize>,
    tiles: usize,
    tile_at: impl Fn(usize) -> (*const f32, *mut f32, usize),
    offsets: &[usize],
    ldc: usize,
    init: Init,
) {
    // SAFETY: the caller's promise.
    unsafe {
        match a.cols {
            None => in_place_by(a, Run::at(a), panels, tiles, tile_at, offsets, ldc, init),
            Some(cols) => {
                let panel = Gather::at(a, cols);
                in_place_by(a, panel, panels, tiles, tile_at, offsets, ldc, init);
            }
        }
    }
}

/// [`multiply_in_place`] with `A`'s panels read by `panel(r0, k0)`.
#[allow(clippy::too_many_arguments)]
unsafe fn in_place_by<A: Panel>(
    a: &Lhs,
    panel: impl Fn(usize, usize) -> A,
    panels: Range<usize>,
    tiles: usize,
    tile_at: impl Fn(usize) -> (*const f32, *mut f32, usize),
    offsets: &[usize],
    ldc: usize,
    init: Init,
) {
    check(a, &panels, init);
    assert_eq!(offsets.len(), a.k, "one offset per depth");
    let kernels = Kernels::<A, Gather>::new();
    for (k0, kb) in a.blocks() {
        let offs = offsets[k0..k0 + kb].as_ptr();
        for j in 0..tiles {
            let (base, c, ncols) = tile_at(j);
            let b = Gather(base, offs);
            for i in panels.clone() {
                let (r0, nrows) = a.panel_rows(i);
                let start = start_rows(init, k0, r0, nrows);
                let at = |r: usize, q: usize| c.wrapping_add((r0 + r) * ldc + q);
                // SAFETY: the caller's promise, for B and C; `A`'s rows were checked
                // against its data.
                unsafe {
                    tile(
                        kernels.get(nrows),
                        (kb, a.rs),
                        panel(r0, k0),
                        b,
                        start,
                        (nrows, ncols),
                        (ncols == NR).then(|| (at(0, 0), ldc)),
                        at,
                    );
                };
            }
        }
    }
    if a.k == 0
        && let Init::Set(bias) = init
    {
        // No products: C is its initial value.
        for j in 0..tiles {
            let (_, c, ncols) = tile_at(j);
            for r in a.starts[panels.start]..a.starts[panels.end] {
                for q in 0..ncols {
                    // SAFETY: an element the caller vouches for.
                    unsafe { *c.wrapping_add(r * ldc + q) = bias.map_or(0.0, |b| b[r]) };
                }
            }
        }
    }
}

/// The values rows `r0..r0 + nrows` start from in depth block `k0`: the bias (or zeros)
/// in the first block of [`Init::Set`], else none (`C` goes on from what it holds).
/// A view, not a copy: copying it for each tile stalled the kernel's call behind the
/// copy's stores (6% of a 64x64 layer).
fn start_rows<'a>(init: Init<'a>, k0: usize, r0: usize, nrows: usize) -> Option<&'a [f32]> {
    const ZEROS: [f32; MR] = [0.0; MR];
    match init {
        Init::Set(bias) if k0 == 0 => Some(bias.map_or(&ZEROS[..nrows], |b| &b[r0..r0 + nrows])),
        _ => None,
    }
}

/// One `nrows x ncols` tile of `C` (element `(r, c)` at `at(r, c)`): by the kernel in
/// place when `straight` gives its rows' start and stride (whole columns, contiguous),
/// else through a local `MR x NR` tile.
///
/// # Safety
/// As the kernel's, for `a`, `b` and each `at(r, c)`, `r < nrows`, `c < ncols`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<A: Panel, B: Panel>(
    kernel: Kernel<A, B>,
    (kb, rs): (usize, usize),
    a: A,
    b: B,
    start: Option<&[f32]>,
    (nrows, ncols): (usize, usize),
    straight: Option<(*mut f32, usize)>,
    at: impl Fn(usize, usize) -> *mut f32,
) {
    if let Some((c, ldc)) = straight {
        // SAFETY: the caller's promise.
        unsafe { kernel(kb, a, rs, b, c, ldc, start, nrows) };
        return;
    }
    let mut tile = [0.0f32; MR * NR];
    if start.is_none() {
        for r in 0..nrows {
            for c in 0..ncols {
                // SAFETY: an element the caller vouches for.
                tile[r * NR + c] = unsafe { *at(r, c) };
            }
        }
    }
    // SAFETY: the local tile is MR x NR with rows NR apart; `a` and `b` the caller's.
    unsafe { kernel(kb, a, rs, b, tile.as_mut_ptr(), NR, start, nrows) };
    for r in 0..nrows {
        for c in 0..ncols {
            // SAFETY: as above.
            unsafe { *at(r, c) = tile[r * NR + c] };
        }
    }
}

/// Where the kernel finds depth `t` of a panel: for `B`, the [`NR`] contiguous columns
/// of its row `t`; for `A`, the element of the panel's first row (row `r` is `r * rs`
/// further).
pub trait Panel: Copy {
    /// # Safety
    /// `t` below the depth the panel was made for.
    unsafe fn row(self, t: usize) -> *const f32;
}

/// A packed panel of `B`: row `t` at `t * NR`.
#[derive(Clone, Copy)]
pub struct Packed(*const f32);

impl Panel for Packed {
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        self.0.wrapping_add(t * NR)
    }
}

/// Depth `t` at `base + offsets[t]`: `B` read in place, or `A`'s gathered columns.
#[derive(Clone, Copy)]
pub struct Gather(*const f32, *const usize);

impl Gather {
    /// `A`'s panels from row `r0`, depth `k0`, over the columns `cols`.
    fn at<'a>(a: &'a Lhs, cols: &'a [usize]) -> impl Fn(usize, usize) -> Gather + 'a {
        move |r0, k0| Gather(a.data.as_ptr().wrapping_add(r0 * a.rs), cols[k0..].as_ptr())
    }
}

impl Panel for Gather {
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        // SAFETY: `t` is below the offsets' length (the caller's promise).
        self.0.wrapping_add(unsafe { *self.1.add(t) })
    }
}

/// `A`'s rows as they lie: depth `t` at `t`.
#[derive(Clone, Copy)]
pub struct Run(*const f32);

impl Run {
    /// `A`'s panels from row `r0`, depth `k0`.
    fn at<'a>(a: &'a Lhs) -> impl Fn(usize, usize) -> Run + 'a {
        move |r0, k0| Run(a.data.as_ptr().wrapping_add(r0 * a.rs + k0))
    }
}

impl Panel for Run {
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        self.0.wrapping_add(t)
    }
}

/// `c[r * ldc + q] = start + sum_t A[r, t] * b.row(t)[q]` for the `rows` rows of an
/// `rows x NR` tile, `A[r, t]` being `a.row(t)[r * rs]`, `start` being `init[r]` (`init`
/// holds a value for each row) or (without `init`) what `c` holds.
type Kernel<A, B> = unsafe fn(usize, A, usize, B, *mut f32, usize, Option<&[f32]>, usize);

/// The fastest kernels this processor runs, one for each panel height.
struct Kernels<A, B> {
    by_rows: [Kernel<A, B>; MR],
}

impl<A: Panel, B: Panel> Kernels<A, B> {
    /// The fastest this processor runs.
    fn new() -> Self {
        Self::of(isas()[0])
    }

    /// The kernels for `isa` (which the processor must run).
    fn of(isa: Isa) -> Self {
        /// The kernels of module `$isa` for 1 to [`MR`] rows.
        macro_rules! by_rows {
            ($isa:ident) => {
                [
                    $isa::kernel::<A, B, 1> as Kernel<A, B>,
                    $isa::kernel::<A, B, 2>,
                    $isa::kernel::<A, B, 3>,
                    $isa::kernel::<A, B, 4>,
                    $isa::kernel::<A, B, 5>,
                    $isa::kernel::<A, B, 6>,
                ]
            };
        }
        let by_rows = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => by_rows!(avx512),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => by_rows!(avx2),
            _ => [portable::<A, B> as Kernel<A, B>; MR],
        };
        Kernels { by_rows }
    }

    /// The kernel for panels of `rows` rows (1 to [`MR`]).
    fn get(&self, rows: usize) -> Kernel<A, B> {
        self.by_rows[rows - 1]
    }
}

/// The kernel in plain Rust.
///
/// # Safety
/// `a.row(t).add(r * rs)` is valid for reads for `t < kb`, `r < rows`, `b.row(t)` for
/// [`NR`] floats; `c.add(r * ldc + q)` is valid for reads and writes for `r < rows`,
/// `q < NR`.
#[allow(clippy::too_many_arguments)]
unsafe fn portable<A: Panel, B: Panel>(
    kb: usize,
    a: A,
    rs: usize,
    b: B,
    c: *mut f32,
    ldc: usize,
    init: Option<&[f32]>,
    rows: usize,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(rows) {
        match init {
            Some(v) => row.fill(v[r]),
            // SAFETY: inside the tile the caller vouches for.
            None => row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(r * ldc), NR) }),
        }
    }
    for t in 0..kb {
        // SAFETY: t < kb.
        let (at, bt) = unsafe { (a.row(t), std::slice::from_raw_parts(b.row(t), NR)) };
        for (r, row) in acc.iter_mut().enumerate().take(rows) {
            // SAFETY: r < rows.
            let av = unsafe { *at.add(r * rs) };
            for (v, &bv) in row.iter_mut().zip(bt) {
                *v = av.mul_add(bv, *v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), NR) }.copy_from_slice(row);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR, Panel};
    use std::arch::x86_64::*;

    /// The kernel with AVX2 and FMA for `R` rows: `2 R` accumulators (each row two
    /// registers of 8 floats).
    ///
    /// # Safety
    /// As [`super::portable`]'s, `rows == R`, and the processor has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel<A: Panel, B: Panel, const R: usize>(
        kb: usize,
        a: A,
        rs: usize,
        b: B,
        c: *mut f32,
        ldc: usize,
        init: Option<&[f32]>,
        _rows: usize,
    ) {
        const { assert!(R <= MR && NR == 16) };
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        // SAFETY: `a`, `b` and the tile at `c` hold what the caller promised; each access
        // below is inside them.
        unsafe {
            for r in 0..R {
                match init {
                    Some(v) => {
                        lo[r] = _mm256_set1_ps(v[r]);
                        hi[r] = lo[r];
                    }
                    None => {
                        lo[r] = _mm256_loadu_ps(c.add(r * ldc));
                        hi[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
                    }
                }
            }
            for t in 0..kb {
                let (at, bt) = (a.row(t), b.row(t));
                let b0 = _mm256_loadu_ps(bt);
                let b1 = _mm256_loadu_ps(bt.add(8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*at.add(r * rs));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(c.add(r * ldc), lo[r]);
                _mm256_storeu_ps(c.add(r * ldc + 8), hi[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR, Panel};
    use std::arch::x86_64::*;

    /// The kernel with AVX-512 for `R` rows: `R` accumulators of 16 floats.
    ///
    /// # Safety
    /// As [`super::portable`]'s, `rows == R`, and the processor has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel<A: Panel, B: Panel, const R: usize>(
        kb: usize,
        a: A,
        rs: usize,
        b: B,
        c: *mut f32,
        ldc: usize,
        init: Option<&[f32]>,
        _rows: usize,
    ) {
        const { assert!(R <= MR && NR == 16) };
        let mut acc = [_mm512_setzero_ps(); R];
        // SAFETY: `a`, `b` and the tile at `c` hold what the caller promised; each access
        // below is inside them.
        unsafe {
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = match init {
                    Some(v) => _mm512_set1_ps(v[r]),
                    None => _mm512_loadu_ps(c.add(r * ldc)),
                };
            }
            for t in 0..kb {
                let (at, bt) = (a.row(t), _mm512_loadu_ps(b.row(t)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*at.add(r * rs)), bt, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc), *acc);
            }
        }
    }
}

/// Writes `vals` as columns `q..q + vals.len()` of row `t` of a packed `B` block `kb`
/// deep (panels `[kb][NR]`).
#[inline]
pub fn put(buf: &mut [f32], kb: usize, t: usize, mut q: usize, mut vals: &[f32]) {
    while !vals.is_empty() {
        let lane = q % NR;
        let len = (NR - lane).min(vals.len());
        let off = (q / NR) * kb * NR + t * NR + lane;
        if len == NR {
            let dst: &mut [f32; NR] = (&mut buf[off..off + NR]).try_into().unwrap();
            *dst = vals[..NR].try_into().unwrap();
        } else {
            buf[off..off + len].copy_from_slice(&vals[..len]);
        }
        q += len;
        vals = &vals[len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;

    /// `C = init + A B` by a sequential fused multiply-add per element: the order the
    /// kernels promise, so the comparison is exact.
    fn sequential(a: &[f32], b: &[f32], m: usize, k: usize, p: usize, c0: &[f32]) -> Vec<f32> {
        let mut c = c0.to_vec();
        for r in 0..m {
            for q in 0..p {
                for t in 0..k {
                    c[r * p + q] = a[r * k + t].mul_add(b[t * p + q], c[r * p + q]);
                }
            }
        }
        c
    }

    fn pack_rows(b: &[f32], p: usize) -> impl FnMut(usize, usize, &mut [f32]) + '_ {
        move |k0, kb, buf| {
            for t in 0..kb {
                put(buf, kb, t, 0, &b[(k0 + t) * p..][..p]);
            }
        }
    }

    /// [`multiply`] of `b` (`k x p`, row-major) into `out`, with fresh scratch space.
    ///
    /// # Safety
    /// As [`multiply`]'s, for `out`.
    unsafe fn product(a: &Lhs, b: &[f32], p: usize, out: Out, init: Init) {
        let mut buf = Vec::new();
        let pack = pack_rows(b, p);
        // SAFETY: the caller's promise.
        unsafe { multiply(a, 0..a.panels(), p, pack, out, init, &mut buf) };
    }

    fn same_bits(got: &[f32], want: &[f32]) -> bool {
        got.iter()
            .zip(want)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// `a` (`m x k`, row-major) stored with its columns reversed and rows `rs > k` apart:
    /// element `(r, t)` at `r * rs + cols[t]`.
    fn scattered(a: &[f32], m: usize, k: usize) -> (Vec<f32>, Vec<usize>, usize) {
        let rs = k + 3;
        let cols: Vec<usize> = (0..k).map(|t| k - 1 - t).collect();
        let mut data = vec![f32::NAN; m * rs];
        for r in 0..m {
            for t in 0..k {
                data[r * rs + cols[t]] = a[r * k + t];
            }
        }
        (data, cols, rs)
    }

    #[test]
    fn products_are_sequential_fused_sums_in_every_kernel_and_blocking() {
        // Edges in both dimensions, every panel height (m = 13: 6, 6, 1; 20: 6, 6, 4,
        // 4; 5; 3), several depth blocks (p = 300: blocks of 215; in place, 20 rows:
        // blocks of 2730), a depth of zero; A read as rows and gathered.
        for (m, k, p) in [
            (13, 700, 300),
            (6, 5, 16),
            (1, 1, 1),
            (7, 0, 20),
            (20, 3000, 33),
            (5, 40, 17),
            (3, 9, 50),
        ] {
            let a = values(m * k, 1);
            let b = values(k * p, 2);
            let bias = values(m, 3);
            let (sc, cols, rs) = scattered(&a, m, k);
            let start: Vec<f32> = (0..m * p).map(|i| bias[i / p]).collect();
            let want = sequential(&a, &b, m, k, p, &start);
            let twice = sequential(&a, &b, m, k, p, &want);
            for (how, lhs) in [
                ("rows", Lhs::rows(&a, m, k, k, depth_block(p))),
                ("gathered", Lhs::gathered(&sc, m, rs, &cols, depth_block(p))),
            ] {
                let mut c = vec![f32::NAN; m * p];
                let out = Out {
                    ptr: c.as_mut_ptr(),
                    ldc: p,
                    seg: p,
                    seg_stride: 0,
                };
                // SAFETY: `c` is m x p with rows p apart.
                unsafe { product(&lhs, &b, p, out, Init::Set(Some(&bias))) };
                assert!(same_bits(&c, &want), "{how} {m}x{k}x{p}");
                // Adding on: twice the products from the bias.
                // SAFETY: as above.
                unsafe { product(&lhs, &b, p, out, Init::Add) };
                assert!(same_bits(&c, &twice), "{how} add {m}x{k}x{p}");
            }

            // B read in place: tile j is columns 16 j.. of b's rows (b padded for the
            // last tile's full reads).
            let mut bp = b.clone();
            bp.resize(k * p + NR, 0.0);
            let offsets: Vec<usize> = (0..k).map(|t| t * p).collect();
            for (how, lhs) in [
                ("rows", Lhs::rows(&a, m, k, k, depth_block_in_place(m))),
                (
                    "gathered",
                    Lhs::gathered(&sc, m, rs, &cols, depth_block_in_place(m)),
                ),
            ] {
                let mut c = vec![f32::NAN; m * p];
                let (cp, bq) = (c.as_mut_ptr(), bp.as_ptr());
                let tile_at = |j: usize| {
                    (
                        bq.wrapping_add(j * NR),
                        cp.wrapping_add(j * NR),
                        NR.min(p - j * NR),
                    )
                };
                // SAFETY: reads below row k - 1's column p + 15 (the padding); `c` m x p.
                unsafe {
                    multiply_in_place(
                        &lhs,
                        0..lhs.panels(),
                        p.div_ceil(NR),
                        tile_at,
                        &offsets,
                        p,
                        Init::Set(Some(&bias)),
                    );
                }
                assert!(same_bits(&c, &want), "in place, {how} {m}x{k}x{p}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "overrun")]
    fn a_matrix_past_its_data_is_refused() {
        let a = values(20, 1);
        Lhs::rows(&a, 3, 8, 7, 64);
    }

    #[test]
    #[allow(clippy::print_stderr)] // which kernels this machine could check
    fn the_portable_kernel_gives_the_fast_kernels_bits() {
        let kb = 37;
        let (m, rs) = (MR, 41);
        let a = values(m * rs, 4);
        let b = values(kb * NR, 5);
        let init = [0.5, -1.0, 2.0, 0.0, 3.0, -0.25];
        eprintln!("kernels compared with the portable one: {:?}", isas());
        for &isa in isas() {
            let k = Kernels::<Run, Packed>::of(isa);
            let slow = Kernels::<Run, Packed>::of(Isa::Portable);
            let (a, b) = (Run(a.as_ptr()), Packed(b.as_ptr()));
            for rows in 1..=MR {
                let mut fast = vec![0.0; MR * NR];
                let mut slow_c = vec![0.0; MR * NR];
                // SAFETY: the tiles and panels have the promised sizes: rows of `a` are
                // rs apart, each kb deep.
                unsafe {
                    k.get(rows)(
                        kb,
                        a,
                        rs,
                        b,
                        fast.as_mut_ptr(),
                        NR,
                        Some(&init[..rows]),
                        rows,
                    );
                    slow.get(rows)(
                        kb,
                        a,
                        rs,
                        b,
                        slow_c.as_mut_ptr(),
                        NR,
                        Some(&init[..rows]),
                        rows,
                    );
                    k.get(rows)(kb, a, rs, b, fast.as_mut_ptr(), NR, None, rows);
                    slow.get(rows)(kb, a, rs, b, slow_c.as_mut_ptr(), NR, None, rows);
                }
                assert!(same_bits(&fast, &slow_c), "{isa:?}, {rows} rows");
            }
        }
    }

    #[test]
    fn columns_in_runs_land_in_their_runs() {
        // Three runs of 10 columns, 100 floats apart: tiles cross runs.
        let (m, k, p, seg, stride) = (8, 9, 30, 10, 100);
        let a = values(m * k, 6);
        let b = values(k * p, 7);
        let pa = Lhs::rows(&a, m, k, k, depth_block(p));
        let ldc = 12;
        let mut c = vec![-7.0f32; 3 * stride];
        let out = Out {
            ptr: c.as_mut_ptr(),
            ldc,
            seg,
            seg_stride: stride,
        };
        // SAFETY: the largest offset is 2 * 100 + 9 + 7 * 12 < 300, and runs do not overlap
        // (10 columns + 7 rows of 12 fit in 100).
        unsafe { product(&pa, &b, p, out, Init::Set(None)) };
        let want = sequential(&a, &b, m, k, p, &vec![0.0; m * p]);
        for r in 0..m {
            for q in 0..p {
                assert_eq!(c[(q / seg) * stride + q % seg + r * ldc], want[r * p + q]);
            }
        }
        // Untouched between rows: column 10 of row 0 is no column of C.
        assert_eq!(c[10], -7.0);
    }
}
