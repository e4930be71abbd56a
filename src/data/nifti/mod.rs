//! NIfTI-1 volumes: reading exactly as nibabel does, and writing.
//!
//! The `nifti` crate parses the header (both byte orders); the voxel data is read here,
//! whole-buffer: gzip is recognised by its magic bytes, not the file name, and inflated
//! with libdeflate into a buffer sized from the header (multi-member gzip falls back to
//! a streaming decoder). Values follow nibabel's `get_fdata()`: `raw * scl_slope +
//! scl_inter` in float64, and no scaling when the slope is 0 or not finite.
//!
//! Arrays keep NIfTI's order: the first axis varies fastest (Fortran order). In KiTS19
//! that axis is the slice, so [`Volume::to_slices_f32`] transposes in cache-sized blocks.
//!
//! The parts: [`Datatype`] (`datatype`), the header and the affine nibabel derives from
//! it (`header`), reading files with their gzip handling (`read`), the voxel values of a
//! read volume (`decode`), and writing (`write`). Cutting slices out of a volume is the
//! slicing code's ([`crate::data::slicing`]).

use std::path::PathBuf;

use nifti::NiftiHeader;

mod datatype;
mod decode;
mod header;
mod read;
mod write;

pub use datatype::Datatype;
pub(crate) use datatype::by_datatype;
pub use decode::{OutsideLabels, Summary};
pub use header::{Header, nibabel_affine, nibabel_pixdim, squeeze3};
pub use read::{ReadBuffers, read_header};
pub use write::{Geometry, NewVolume, write_volume, write_volume_with};

#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a NIfTI-1 file: {why}")]
    NotNifti { path: PathBuf, why: String },
    #[error("`{path}` is a NIfTI-2 file, which kpipe does not read")]
    Nifti2 { path: PathBuf },
    #[error("`{path}` is truncated: {why}")]
    Truncated { path: PathBuf, why: String },
    #[error("`{path}`: unsupported NIfTI datatype {code}")]
    Datatype { path: PathBuf, code: i16 },
    #[error("`{path}`: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "`{path}` has changed since it was loaded: its content digest is {actual}, but {recorded} was recorded"
    )]
    Changed {
        path: PathBuf,
        actual: String,
        recorded: String,
    },
}

impl crate::hint::Hint for NiftiError {
    fn hint(&self) -> Option<String> {
        match self {
            NiftiError::Nifti2 { .. } => Some(
                "convert it to NIfTI-1, e.g. with nibabel: \
                 `nib.Nifti1Image(img.dataobj, img.affine).to_filename(...)`"
                    .into(),
            ),
            NiftiError::Changed { .. } => Some(
                "run the pipeline again: the load stage sees the change and what depends on \
                 it runs again"
                    .into(),
            ),
            _ => None,
        }
    }
}

impl NiftiError {
    /// A file that is not there (an argument's fault), rather than one that is unreadable.
    pub fn is_not_found(&self) -> bool {
        matches!(self, NiftiError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A NIfTI-1 volume in memory: its header and its raw voxel bytes (file byte order).
pub struct Volume {
    pub path: PathBuf,
    pub header: NiftiHeader,
    pub datatype: Datatype,
    /// nibabel's shape: `dim[1..=dim[0]]`.
    pub shape: Vec<usize>,
    pub big_endian: bool,
    /// The file's bytes; voxels start at `start` (no copy to drop the header).
    raw: Vec<u8>,
    start: usize,
}
