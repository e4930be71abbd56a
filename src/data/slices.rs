//! The slice store: what the slice stage writes and the training loader reads.
//!
//! ```text
//! slices.json                 SliceMeta: size, channels, window, normalisation, cases
//! index.csv                   case,row,slice,has_kidney,has_tumor (one line per slice)
//! cases/<id>/image.npy        float32 [n, channels, size, size]
//! cases/<id>/labels.npy       uint8   [n, size, size]
//! ```
//!
//! Both arrays are plain `.npy` (numpy reads them with `np.load(..., mmap_mode="r")`);
//! [`SliceStore`] memory-maps them, so the loader touches only the slices it batches.

use std::path::{Path, PathBuf};

use ndarray::{ArrayView3, ArrayView4};
use ndarray_npy::ViewNpyExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Normalization {
    /// `(clip(v) - lo) / (hi - lo)`: [0, 1].
    Unit { lo: f64, hi: f64 },
    /// `(clip(v) - mean) / std`.
    ZScore {
        lo: f64,
        hi: f64,
        mean: f64,
        std: f64,
    },
}

impl Normalization {
    pub fn apply(&self, v: f32) -> f32 {
        match *self {
            Normalization::Unit { lo, hi } => {
                ((f64::from(v).clamp(lo, hi) - lo) / (hi - lo)) as f32
            }
            Normalization::ZScore { lo, hi, mean, std } => {
                ((f64::from(v).clamp(lo, hi) - mean) / std) as f32
            }
        }
    }
}

/// How a non-square slice became square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NonSquare {
    /// Pad the short side (centred) with the window's low end, then resize.
    #[default]
    Pad,
    /// Resize each side on its own (distorts the aspect ratio).
    Stretch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlicedCase {
    pub id: String,
    /// Slices kept.
    pub rows: usize,
    /// (slices, rows, columns) of the source volume.
    pub source_shape: [usize; 3],
    pub spacing: [f64; 3],
    pub has_tumor: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SliceMeta {
    pub size: usize,
    pub channels: usize,
    pub context: usize,
    pub normalization: Normalization,
    pub filter: super::resample::Filter,
    pub non_square: NonSquare,
    pub cases: Vec<SlicedCase>,
}

impl SliceMeta {
    pub const FILE: &'static str = "slices.json";
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// A read-only, memory-mapped view of a slice artifact.
pub struct SliceStore {
    pub meta: SliceMeta,
    maps: Vec<(memmap2::Mmap, memmap2::Mmap)>,
}

impl SliceStore {
    pub fn open(dir: &Path) -> Result<SliceStore, StoreError> {
        let path = dir.join(SliceMeta::FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let meta: SliceMeta = serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
            path,
            why: e.to_string(),
        })?;
        let map = |p: PathBuf| -> Result<memmap2::Mmap, StoreError> {
            let f = std::fs::File::open(&p).map_err(|source| StoreError::Io {
                path: p.clone(),
                source,
            })?;
            // SAFETY: cache entries are read-only and never edited in place.
            unsafe { memmap2::Mmap::map(&f) }.map_err(|source| StoreError::Io { path: p, source })
        };
        let mut maps = Vec::new();
        for c in &meta.cases {
            let d = dir.join("cases").join(&c.id);
            maps.push((map(d.join("image.npy"))?, map(d.join("labels.npy"))?));
        }
        let store = SliceStore { meta, maps };
        for i in 0..store.maps.len() {
            let (img, lab) = (store.images(i)?, store.labels(i)?);
            let (s, c) = (store.meta.size, store.meta.channels);
            if img.shape() != [store.meta.cases[i].rows, c, s, s]
                || lab.shape() != [store.meta.cases[i].rows, s, s]
            {
                return Err(StoreError::Invalid {
                    path: dir.join("cases").join(&store.meta.cases[i].id),
                    why: "array shapes disagree with slices.json".into(),
                });
            }
        }
        Ok(store)
    }

    /// Images of case `i`: `[rows, channels, size, size]`.
    pub fn images(&self, i: usize) -> Result<ArrayView4<'_, f32>, StoreError> {
        ArrayView4::view_npy(&self.maps[i].0).map_err(|e| StoreError::Invalid {
            path: PathBuf::from(&self.meta.cases[i].id),
            why: format!("image.npy: {e}"),
        })
    }

    /// Labels of case `i`: `[rows, size, size]`.
    pub fn labels(&self, i: usize) -> Result<ArrayView3<'_, u8>, StoreError> {
        ArrayView3::view_npy(&self.maps[i].1).map_err(|e| StoreError::Invalid {
            path: PathBuf::from(&self.meta.cases[i].id),
            why: format!("labels.npy: {e}"),
        })
    }

    pub fn case_index(&self, id: &str) -> Option<usize> {
        self.meta.cases.iter().position(|c| c.id == id)
    }
}
