//! Imaging data: NIfTI volumes, the KiTS19 layout, synthetic phantoms, and the slice
//! store the training loader reads.

pub mod augment;
pub mod kits;
pub mod loader;
pub mod nifti;
pub mod phantom;
pub mod resample;
pub mod slices;
pub mod slicing;
