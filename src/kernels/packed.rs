//! The convolutions' GEMM: `C = A B` with `A` (the weights) packed once per call into
//! panels of [`MR`] rows, `B` (a work item's columns) packed by the caller straight from
//! the image into panels of [`NR`] columns (im2col and packing in one pass), and an
//! `MR x NR` microkernel: AVX-512 where the processor has it (one 16-float register per
//! row), else AVX2 with FMA (two 8-float registers per row), else the same arithmetic
//! in plain Rust.
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

/// `A` (`m x k`, element `(r, c)` being `at(r, c)`) cut into panels of at most [`MR`]
/// rows and depth blocks of `kc`, packed a block at a time by [`Weights::pack`] into the
/// caller's scratch space (it stays in the caches, and each work item packs only the
/// panels it multiplies): panel `i` of a block `kb` deep at `i * MR * kb`, element
/// `(starts[i] + r, k0 + t)` at `t * MR + r` in it (rows past the panel's height zero).
pub struct Weights<F> {
    /// First row of each panel, and `m` last.
    starts: Vec<usize>,
    k: usize,
    kc: usize,
    at: F,
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

impl<F: Fn(usize, usize) -> f32> Weights<F> {
    /// The `m x k` matrix `at`, in depth blocks of `kc` ([`depth_block`],
    /// [`depth_block_in_place`]).
    pub fn new(m: usize, k: usize, kc: usize, at: F) -> Self {
        let mut starts = vec![0];
        for h in heights(m) {
            starts.push(starts.last().unwrap() + h);
        }
        Weights {
            starts,
            k,
            kc: kc.max(1),
            at,
        }
    }

    pub fn rows(&self) -> usize {
        *self.starts.last().unwrap()
    }

    /// Panels (of at most [`MR`] rows).
    pub fn panels(&self) -> usize {
        self.starts.len() - 1
    }

    /// The depth blocks: `(k0, kb)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + use<F> {
        let (k, kc) = (self.k, self.kc);
        (0..k).step_by(kc).map(move |k0| (k0, kc.min(k - k0)))
    }

    /// Writes panel `i` of the depth block `(k0, kb)` into `out` (`MR * kb` floats).
    fn pack_panel(&self, (k0, kb): (usize, usize), i: usize, out: &mut [f32]) {
        let (r0, h) = (self.starts[i], self.starts[i + 1] - self.starts[i]);
        for (t, col) in out[..MR * kb].chunks_exact_mut(MR).enumerate() {
            if h == MR {
                for (r, v) in col.iter_mut().enumerate() {
                    *v = (self.at)(r0 + r, k0 + t);
                }
            } else {
                for (r, v) in col.iter_mut().enumerate() {
                    *v = if r < h {
                        (self.at)(r0 + r, k0 + t)
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    /// Every block, each with all its panels: block `k0` at `k0 * MR * panels`, panel
    /// `i` of it `i * MR * kb` further (element `(starts[i] + r, k0 + t)` at `t * MR + r`
    /// in the panel). On this thread: for work items (see [`Self::pack_all_parallel`]).
    pub fn pack_all(&self) -> Vec<f32> {
        let mut all = vec![0.0; self.panels() * MR * self.k];
        for (k0, kb) in self.blocks() {
            let block = &mut all[k0 * MR * self.panels()..][..self.panels() * MR * kb];
            for (i, panel) in block.chunks_exact_mut(MR * kb).enumerate() {
                self.pack_panel((k0, kb), i, panel);
            }
        }
        all
    }

    /// [`Self::pack_all`] with the panels packed on the pool, outside work items.
    pub fn pack_all_parallel(&self) -> Vec<f32>
    where
        F: Sync,
    {
        use rayon::prelude::*;
        let mut all = vec![0.0; self.panels() * MR * self.k];
        for (k0, kb) in self.blocks() {
            let block = &mut all[k0 * MR * self.panels()..][..self.panels() * MR * kb];
            block
                .par_chunks_mut(MR * kb)
                .enumerate()
                .for_each(|(i, panel)| self.pack_panel((k0, kb), i, panel));
        }
        all
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

/// `C[r, q] = init + sum_t A[r, t] B[t, q]` for the rows of panels `panels` of `a`
/// (`packed`: [`Weights::pack_all`] of it) and the `p` columns `pack` packs: called with
/// `(k0, kb, buf)` it writes `B`'s rows `k0..k0 + kb` into `buf` (`p` rounded up to
/// [`NR`], times `kb` floats) as panels `[kb][NR]`, one per [`NR`] columns (columns past
/// `p` are ignored). `bbuf` is the caller's scratch space.
///
/// # Safety
/// Every `out.at(r, q)`, `r` a row of the panels, `q < p`, must be valid for
/// reads and writes and touched by no other thread during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply<F: Fn(usize, usize) -> f32>(
    a: &Weights<F>,
    packed: &[f32],
    panels: Range<usize>,
    p: usize,
    mut pack: impl FnMut(usize, usize, &mut [f32]),
    out: Out,
    init: Init,
    bbuf: &mut Vec<f32>,
) {
    assert_eq!(
        packed.len(),
        a.panels() * MR * a.k,
        "not `a`'s packed blocks"
    );
    assert!(
        panels.end <= a.panels(),
        "panels {panels:?} of {}",
        a.panels()
    );
    if let Init::Set(Some(b)) = init {
        assert!(b.len() >= a.rows(), "bias shorter than the rows");
    }
    let np = p.div_ceil(NR) * NR;
    let kernels = Kernels::<Packed>::new();
    for (k0, kb) in a.blocks() {
        let b = super::scratch(bbuf, np * kb);
        pack(k0, kb, b);
        let block = &packed[k0 * MR * a.panels()..][..MR * a.panels() * kb];
        for i in panels.clone() {
            // One panel at a time: it stays in L1 while the block of B streams from L2.
            let panel = &block[i * MR * kb..][..MR * kb];
            let (r0, nrows) = a.panel_rows(i);
            let start = start_rows(init, k0, r0, nrows);
            for (j, bp) in b.chunks_exact(NR * kb).enumerate() {
                let q0 = j * NR;
                let ncols = NR.min(p - q0);
                let straight = ncols == NR && q0 % out.seg + NR <= out.seg;
                let at = |r, c| out.at(r0 + r, q0 + c);
                // SAFETY: the tile's elements are the caller's promise; the panels hold
                // MR * kb and NR * kb floats.
                unsafe {
                    tile(
                        kernels.get(nrows),
                        kb,
                        panel,
                        Packed(bp.as_ptr()),
                        start.as_ref(),
                        (nrows, ncols),
                        straight.then(|| (at(0, 0), out.ldc)),
                        at,
                    );
                };
            }
        }
    }
    if a.k == 0 {
        // No products: C is its initial value.
        for r in a.starts[panels.start]..a.starts[panels.end] {
            for q in 0..p {
                let v = match init {
                    Init::Set(bias) => bias.map_or(0.0, |b| b[r]),
                    Init::Add => continue,
                };
                // SAFETY: an element the caller vouches for.
                unsafe { *out.at(r, q) = v };
            }
        }
    }
}

/// `C[r, q] = init + sum_t A[r, t] B[t, q]` as [`multiply`] computes it, with `A` packed
/// whole ([`Weights::pack_all`]: each work item reuses it) and `B` read in place: column `c` of tile `j` (of `tiles`) at depth `t` is `base[offsets[t] + c]`,
/// where `tile(j)` gives `(base, C's column 0 of the tile, columns in the tile)`; a tile
/// of fewer than [`NR`] columns may still read all [`NR`] floats from each `base +
/// offsets[t]`. `C`'s rows are `ldc` apart.
///
/// # Safety
/// For every tile, `base + offsets[t] + c` is valid for reads for `t < a`'s depth,
/// `c < NR`; the tile's `C` elements (the rows of panels `panels`) valid for reads and
/// writes, touched by no other thread during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn multiply_in_place<F: Fn(usize, usize) -> f32>(
    a: &Weights<F>,
    packed: &[f32],
    panels: Range<usize>,
    tiles: usize,
    tile_at: impl Fn(usize) -> (*const f32, *mut f32, usize),
    offsets: &[usize],
    ldc: usize,
    init: Init,
) {
    assert_eq!(
        packed.len(),
        a.panels() * MR * a.k,
        "not `a`'s packed blocks"
    );
    assert!(
        panels.end <= a.panels(),
        "panels {panels:?} of {}",
        a.panels()
    );
    assert_eq!(offsets.len(), a.k, "one offset per depth");
    if let Init::Set(Some(b)) = init {
        assert!(b.len() >= a.rows(), "bias shorter than the rows");
    }
    let kernels = Kernels::<InPlace>::new();
    for (k0, kb) in a.blocks() {
        let offs = offsets[k0..k0 + kb].as_ptr();
        let block = &packed[k0 * MR * a.panels()..][..MR * a.panels() * kb];
        let ap = &block[panels.start * MR * kb..panels.end * MR * kb];
        for j in 0..tiles {
            let (base, c, ncols) = tile_at(j);
            let b = InPlace(base, offs);
            for (i, panel) in panels.clone().zip(ap.chunks_exact(MR * kb)) {
                let (r0, nrows) = a.panel_rows(i);
                let start = start_rows(init, k0, r0, nrows);
                let at = |r: usize, q: usize| c.wrapping_add((r0 + r) * ldc + q);
                // SAFETY: the caller's promise, for B and C.
                unsafe {
                    tile(
                        kernels.get(nrows),
                        kb,
                        panel,
                        b,
                        start.as_ref(),
                        (nrows, ncols),
                        (ncols == NR).then(|| (at(0, 0), ldc)),
                        at,
                    );
                };
            }
        }
    }
    if a.k == 0 {
        for j in 0..tiles {
            let (_, c, ncols) = tile_at(j);
            for r in a.starts[panels.start]..a.starts[panels.end] {
                for q in 0..ncols {
                    if let Init::Set(bias) = init {
                        // SAFETY: an element the caller vouches for.
                        unsafe { *c.wrapping_add(r * ldc + q) = bias.map_or(0.0, |b| b[r]) };
                    }
                }
            }
        }
    }
}

/// The values rows `r0..r0 + nrows` start from in depth block `k0`: the bias (or zeros)
/// in the first block of [`Init::Set`], else none (`C` goes on from what it holds).
fn start_rows(init: Init, k0: usize, r0: usize, nrows: usize) -> Option<[f32; MR]> {
    match init {
        Init::Set(bias) if k0 == 0 => {
            let mut start = [0.0f32; MR];
            if let Some(bias) = bias {
                start[..nrows].copy_from_slice(&bias[r0..r0 + nrows]);
            }
            Some(start)
        }
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
unsafe fn tile<B: Panel>(
    kernel: Kernel<B>,
    kb: usize,
    a: &[f32],
    b: B,
    start: Option<&[f32; MR]>,
    (nrows, ncols): (usize, usize),
    straight: Option<(*mut f32, usize)>,
    at: impl Fn(usize, usize) -> *mut f32,
) {
    if let Some((c, ldc)) = straight {
        // SAFETY: the caller's promise.
        unsafe { kernel(kb, a.as_ptr(), b, c, ldc, start, nrows) };
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
    unsafe { kernel(kb, a.as_ptr(), b, tile.as_mut_ptr(), NR, start, nrows) };
    for r in 0..nrows {
        for c in 0..ncols {
            // SAFETY: as above.
            unsafe { *at(r, c) = tile[r * NR + c] };
        }
    }
}

/// Where the kernel finds row `t` of a tile of `B` (its [`NR`] columns, contiguous).
pub trait Panel: Copy {
    /// # Safety
    /// `t` below the depth the panel was made for.
    unsafe fn row(self, t: usize) -> *const f32;
}

/// A packed panel: row `t` at `t * NR`.
#[derive(Clone, Copy)]
pub struct Packed(*const f32);

impl Panel for Packed {
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        self.0.wrapping_add(t * NR)
    }
}

/// `B` in place: row `t` at `base + offsets[t]`.
#[derive(Clone, Copy)]
pub struct InPlace(*const f32, *const usize);

impl Panel for InPlace {
    #[inline(always)]
    unsafe fn row(self, t: usize) -> *const f32 {
        // SAFETY: `t` is below the offsets' length (the caller's promise).
        self.0.wrapping_add(unsafe { *self.1.add(t) })
    }
}

/// `c[r * ldc + q] = start + sum_t a[t * MR + r] * b.row(t)[q]` for the first `rows` rows
/// of an `MR x NR` tile (`rows` at most the kernel's own), `start` being `init[r]` or
/// (without `init`) what `c` holds.
type Kernel<B> = unsafe fn(usize, *const f32, B, *mut f32, usize, Option<&[f32; MR]>, usize);

/// The fastest kernels this processor runs: for panels of up to 4 rows, and of [`MR`].
struct Kernels<B> {
    four: Kernel<B>,
    six: Kernel<B>,
}

impl<B: Panel> Kernels<B> {
    /// The fastest this processor runs.
    fn new() -> Self {
        Self::of(isas()[0])
    }

    /// The kernels for `isa` (which the processor must run).
    fn of(isa: Isa) -> Self {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Kernels {
                four: avx512::kernel::<B, 4>,
                six: avx512::kernel::<B, MR>,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernels {
                four: avx2::kernel::<B, 4>,
                six: avx2::kernel::<B, MR>,
            },
            _ => Kernels {
                four: portable::<B>,
                six: portable::<B>,
            },
        }
    }

    fn get(&self, rows: usize) -> Kernel<B> {
        if rows <= 4 { self.four } else { self.six }
    }
}

/// The kernel in plain Rust.
///
/// # Safety
/// `a` holds `kb * MR` floats, `b.row(t)` [`NR`] for `t < kb`; `c.add(r * ldc + q)` is
/// valid for reads and writes for `r < rows`, `q < NR`.
unsafe fn portable<B: Panel>(
    kb: usize,
    a: *const f32,
    b: B,
    c: *mut f32,
    ldc: usize,
    init: Option<&[f32; MR]>,
    rows: usize,
) {
    // SAFETY: the length is the caller's promise.
    let a = unsafe { std::slice::from_raw_parts(a, kb * MR) };
    let mut acc = [[0.0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate().take(rows) {
        match init {
            Some(v) => row.fill(v[r]),
            // SAFETY: inside the tile the caller vouches for.
            None => row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(r * ldc), NR) }),
        }
    }
    for (t, at) in a.chunks_exact(MR).enumerate() {
        // SAFETY: t < kb.
        let bt = unsafe { std::slice::from_raw_parts(b.row(t), NR) };
        for (row, &av) in acc.iter_mut().zip(at) {
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
    /// registers of 8 floats); `a` still has [`MR`] floats per depth.
    ///
    /// # Safety
    /// As [`super::portable`]'s, `rows <= R`, and the processor has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<B: Panel, const R: usize>(
        kb: usize,
        a: *const f32,
        b: B,
        c: *mut f32,
        ldc: usize,
        init: Option<&[f32; MR]>,
        rows: usize,
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
                    None if r < rows => {
                        lo[r] = _mm256_loadu_ps(c.add(r * ldc));
                        hi[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
                    }
                    None => {}
                }
            }
            let mut a = a;
            for t in 0..kb {
                let bt = b.row(t);
                let b0 = _mm256_loadu_ps(bt);
                let b1 = _mm256_loadu_ps(bt.add(8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(r));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
                a = a.add(MR);
            }
            for r in 0..rows.min(R) {
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

    /// The kernel with AVX-512 for `R` rows: `R` accumulators of 16 floats; `a` still
    /// has [`MR`] floats per depth.
    ///
    /// # Safety
    /// As [`super::portable`]'s, `rows <= R`, and the processor has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel<B: Panel, const R: usize>(
        kb: usize,
        a: *const f32,
        b: B,
        c: *mut f32,
        ldc: usize,
        init: Option<&[f32; MR]>,
        rows: usize,
    ) {
        const { assert!(R <= MR && NR == 16) };
        let mut acc = [_mm512_setzero_ps(); R];
        // SAFETY: `a`, `b` and the tile at `c` hold what the caller promised; each access
        // below is inside them.
        unsafe {
            for (r, acc) in acc.iter_mut().enumerate() {
                match init {
                    Some(v) => *acc = _mm512_set1_ps(v[r]),
                    None if r < rows => *acc = _mm512_loadu_ps(c.add(r * ldc)),
                    None => {}
                }
            }
            let mut a = a;
            for t in 0..kb {
                let bt = _mm512_loadu_ps(b.row(t));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r)), bt, *acc);
                }
                a = a.add(MR);
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
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

/// Fills columns `q..q + len` of row `t` of a packed `B` block with zeros.
#[inline]
pub fn put_zeros(buf: &mut [f32], kb: usize, t: usize, mut q: usize, mut len: usize) {
    while len > 0 {
        let lane = q % NR;
        let n = (NR - lane).min(len);
        let off = (q / NR) * kb * NR + t * NR + lane;
        buf[off..off + n].fill(0.0);
        q += n;
        len -= n;
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
    unsafe fn product<F: Fn(usize, usize) -> f32>(
        a: &Weights<F>,
        b: &[f32],
        p: usize,
        out: Out,
        init: Init,
    ) {
        let mut buf = Vec::new();
        let pack = pack_rows(b, p);
        let all = a.pack_all();
        // SAFETY: the caller's promise.
        unsafe { multiply(a, &all, 0..a.panels(), p, pack, out, init, &mut buf) };
    }

    fn same_bits(got: &[f32], want: &[f32]) -> bool {
        got.iter()
            .zip(want)
            .all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn products_are_sequential_fused_sums_in_every_kernel_and_blocking() {
        // Edges in both dimensions, several depth blocks (p = 300: blocks of 215; in
        // place, 20 rows: blocks of 2730), a depth of zero.
        for (m, k, p) in [
            (13, 700, 300),
            (6, 5, 16),
            (1, 1, 1),
            (7, 0, 20),
            (20, 3000, 33),
        ] {
            let a = values(m * k, 1);
            let b = values(k * p, 2);
            let bias = values(m, 3);
            let pa = Weights::new(m, k, depth_block(p), |r, c| a[r * k + c]);
            let mut c = vec![f32::NAN; m * p];
            let out = Out {
                ptr: c.as_mut_ptr(),
                ldc: p,
                seg: p,
                seg_stride: 0,
            };
            // SAFETY: `c` is m x p with rows p apart.
            unsafe { product(&pa, &b, p, out, Init::Set(Some(&bias))) };
            let start: Vec<f32> = (0..m * p).map(|i| bias[i / p]).collect();
            let want = sequential(&a, &b, m, k, p, &start);
            assert!(same_bits(&c, &want), "{m}x{k}x{p}");
            // Adding on: twice the products from the bias.
            // SAFETY: as above.
            unsafe { product(&pa, &b, p, out, Init::Add) };
            let twice = sequential(&a, &b, m, k, p, &want);
            assert!(same_bits(&c, &twice), "add {m}x{k}x{p}");

            // B read in place: tile j is columns 16 j.. of b's rows (b padded for the
            // last tile's full reads).
            let pa = Weights::new(m, k, depth_block_in_place(m), |r, c| a[r * k + c]);
            let mut bp = b.clone();
            bp.resize(k * p + NR, 0.0);
            let offsets: Vec<usize> = (0..k).map(|t| t * p).collect();
            let mut c = vec![f32::NAN; m * p];
            let (cp, bq) = (c.as_mut_ptr(), bp.as_ptr());
            let tile_at = |j: usize| {
                (
                    bq.wrapping_add(j * NR),
                    cp.wrapping_add(j * NR),
                    NR.min(p - j * NR),
                )
            };
            let all = pa.pack_all();
            // SAFETY: reads below row k - 1's column p + 15 (the padding); `c` m x p.
            unsafe {
                multiply_in_place(
                    &pa,
                    &all,
                    0..pa.panels(),
                    p.div_ceil(NR),
                    tile_at,
                    &offsets,
                    p,
                    Init::Set(Some(&bias)),
                );
            }
            assert!(same_bits(&c, &want), "in place {m}x{k}x{p}");
        }
    }

    #[test]
    #[allow(clippy::print_stderr)] // which kernels this machine could check
    fn the_portable_kernel_gives_the_fast_kernels_bits() {
        let kb = 37;
        let a = values(kb * MR, 4);
        let b = values(kb * NR, 5);
        let init = [0.5, -1.0, 2.0, 0.0, 3.0, -0.25];
        eprintln!("kernels compared with the portable one: {:?}", isas());
        for &isa in isas() {
            let k = Kernels::<Packed>::of(isa);
            let mut fast = vec![0.0; MR * NR];
            let mut slow = vec![0.0; MR * NR];
            // SAFETY: the tiles and panels have the promised sizes.
            unsafe {
                let b = Packed(b.as_ptr());
                for rows in [MR, 4, 3] {
                    k.get(rows)(kb, a.as_ptr(), b, fast.as_mut_ptr(), NR, Some(&init), rows);
                    portable(kb, a.as_ptr(), b, slow.as_mut_ptr(), NR, Some(&init), rows);
                    k.get(rows)(kb, a.as_ptr(), b, fast.as_mut_ptr(), NR, None, rows);
                    portable(kb, a.as_ptr(), b, slow.as_mut_ptr(), NR, None, rows);
                }
            }
            assert!(same_bits(&fast, &slow), "{isa:?}");
        }
    }

    #[test]
    fn columns_in_runs_land_in_their_runs() {
        // Three runs of 10 columns, 100 floats apart: tiles cross runs.
        let (m, k, p, seg, stride) = (8, 9, 30, 10, 100);
        let a = values(m * k, 6);
        let b = values(k * p, 7);
        let pa = Weights::new(m, k, depth_block(p), |r, c| a[r * k + c]);
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
