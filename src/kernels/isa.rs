//! The processor's vector instruction sets, detected once, and [`wide`], which compiles
//! a kernel's element loops for the widest of them.

/// The instruction sets a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The instruction sets this processor runs, fastest first (detected once). AVX-512
/// even where it runs on 256-bit units (AMD Zen 4): half the instructions per product,
/// measured 110 against 90 GFLOP/s on one Zen 4 core.
pub(super) fn isas() -> &'static [Isa] {
    static ISAS: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
    ISAS.get_or_init(|| {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // The features `wide` compiles for, not only the GEMM kernel's AVX-512F.
            if has!("avx512f") && has!("avx512vl") {
                all.push(Isa::Avx512);
            }
            if has!("avx2") && has!("fma") {
                all.push(Isa::Avx2);
            }
        }
        all.push(Isa::Portable);
        all
    })
}

/// Runs `f` compiled for the widest vector instructions the processor has: `f` (and
/// what it calls `#[inline(always)]`) is inlined into a function with those target
/// features, so its element loops vectorise 16 or 8 floats wide instead of the
/// baseline's 4. The results are the same bits at any width: the loops do the same IEEE
/// operations in the same order (Rust neither reassociates nor contracts to FMA).
#[inline(always)]
pub(super) fn wide<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the first of `isas` is one the processor runs.
    unsafe { compiled_for(isas()[0], f) }
}

/// Runs `f` compiled for `isa`, which the processor must run ([`isas`]): the tests
/// compare each width's bits.
#[cfg(test)]
pub(super) fn on<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    assert!(isas().contains(&isa), "this processor does not run {isa:?}");
    // SAFETY: checked above.
    unsafe { compiled_for(isa, f) }
}

/// # Safety
/// The processor runs `isa`.
#[inline(always)]
unsafe fn compiled_for<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the processor has AVX-512F and VL (the caller's promise).
        Isa::Avx512 => unsafe { avx512(f) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the processor has AVX2 and FMA (the caller's promise).
        Isa::Avx2 => unsafe { avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
