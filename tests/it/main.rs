//! The integration tests, as one test binary (one link of kpipe and burn instead of one
//! per file). Each module is a former `tests/<name>.rs`; run one with
//! `cargo test --test it <name>::`, e.g. `cargo test --test it study::`.

// Tests print what they skip (no nibabel, no samples), visibly.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

mod config_errors;
mod data_stages;
mod fetch;
#[cfg(feature = "gpu")]
mod gpu;
mod models;
mod nifti;
mod nifti_real;
mod nii;
mod portable_lock;
mod predict;
mod run;
mod score;
mod shared_cache;
mod slurm;
mod study;
mod train;
