//! The slice store: what the slice stage writes and the training loader reads.
//!
//! ```text
//! slices.json                 SliceMeta: size, channels, window, normalisation, cases
//! index.csv                   case,row,slice,has_kidney,has_tumor (one line per slice)
//! cases/<id>/image.npy        float32 (or float16) [n, channels, size, size]
//! cases/<id>/labels.npy       uint8   [n, size, size]
//! ```
//!
//! Both arrays are plain `.npy` (numpy reads them with `np.load(..., mmap_mode="r")`);
//! [`SliceStore`] memory-maps them, so the loader touches only the slices it batches.

use std::path::{Path, PathBuf};

use ndarray::{ArrayView3, ArrayView4};
use ndarray_npy::ViewNpyExt;
use serde::{Deserialize, Serialize};

/// How images are stored: float32, or float16 (half the disk and page cache; values in
/// [0, 1] keep 11 significant bits, a relative error under 0.05%).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StorageType {
    #[default]
    Float32,
    Float16,
}

impl StorageType {
    pub fn is_default(&self) -> bool {
        *self == StorageType::Float32
    }
}

/// A float16 `.npy` element (`<f2`), for ndarray-npy's writer and memory-mapped views.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct F16(pub half::f16);

const F16_DESCR: &str = "<f2";

impl ndarray_npy::WritableElement for F16 {
    fn type_descriptor() -> py_literal::Value {
        py_literal::Value::String(F16_DESCR.into())
    }

    fn write<W: std::io::Write>(&self, mut w: W) -> Result<(), ndarray_npy::WriteDataError> {
        w.write_all(&self.0.to_le_bytes()).map_err(Into::into)
    }

    fn write_slice<W: std::io::Write>(
        slice: &[Self],
        mut w: W,
    ) -> Result<(), ndarray_npy::WriteDataError> {
        let bytes: Vec<u8> = slice.iter().flat_map(|v| v.0.to_le_bytes()).collect();
        w.write_all(&bytes).map_err(Into::into)
    }
}

impl ndarray_npy::ViewElement for F16 {
    fn bytes_as_slice<'a>(
        bytes: &'a [u8],
        type_desc: &py_literal::Value,
        len: usize,
    ) -> Result<&'a [Self], ndarray_npy::ViewDataError> {
        use ndarray_npy::ViewDataError as E;
        match type_desc {
            py_literal::Value::String(s) if s == F16_DESCR && cfg!(target_endian = "little") => {}
            py_literal::Value::String(s) if s == ">f2" => return Err(E::NonNativeEndian),
            other => return Err(E::WrongDescriptor(other.clone())),
        }
        let need = len * 2;
        if bytes.len() < need {
            return Err(E::MissingBytes(need - bytes.len()));
        }
        if bytes.len() > need {
            return Err(E::ExtraBytes(bytes.len() - need));
        }
        if bytes.as_ptr().align_offset(align_of::<F16>()) != 0 {
            return Err(E::Misaligned);
        }
        // SAFETY: F16 is a transparent u16 (any bit pattern is valid); length and
        // alignment were checked above.
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), len) })
    }
}

/// Images of one case, as stored.
pub enum Images<'a> {
    F32(ArrayView4<'a, f32>),
    F16(ArrayView4<'a, F16>),
}

impl Images<'_> {
    /// `[rows, channels, size, size]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            Images::F32(a) => a.shape(),
            Images::F16(a) => a.shape(),
        }
    }

    /// All rows as f32.
    pub fn to_f32(&self) -> ndarray::Array4<f32> {
        match self {
            Images::F32(a) => a.to_owned(),
            Images::F16(a) => a.mapv(|v| v.0.to_f32()),
        }
    }

    /// Row `r` (all channels) as f32.
    pub fn row(&self, r: usize) -> Vec<f32> {
        let s = ndarray::s![r, .., .., ..];
        match self {
            Images::F32(a) => a.slice(s).iter().copied().collect(),
            Images::F16(a) => a.slice(s).iter().map(|v| v.0.to_f32()).collect(),
        }
    }
}

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
    /// The normalisation as one f32 function, `clamp(v, lo, hi) * scale + offset`:
    /// cheap enough for the hot loop of the slice stage (min/max, no branch: it
    /// vectorises; a NaN voxel maps to the window's low end).
    pub fn function(&self) -> impl Fn(f32) -> f32 + Copy {
        let (lo, hi, centre, scale) = match *self {
            Normalization::Unit { lo, hi } => (lo, hi, lo, 1.0 / (hi - lo)),
            Normalization::ZScore { lo, hi, mean, std } => (lo, hi, mean, 1.0 / std),
        };
        // the exact image of the window, so rounding never leaves it ([0, 1] for unit)
        let (out_lo, out_hi) = (
            ((lo - centre) * scale) as f32,
            ((hi - centre) * scale) as f32,
        );
        let (lo, hi, centre, scale) = (lo as f32, hi as f32, centre as f32, scale as f32);
        // `a > b ? a : b` is one maxps (and sends NaN to the bound), where f32::max
        // needs three more instructions to order NaN
        let clamp = move |v: f32, lo: f32, hi: f32| {
            let v = if v > lo { v } else { lo };
            if v < hi { v } else { hi }
        };
        move |v: f32| clamp((clamp(v, lo, hi) - centre) * scale, out_lo, out_hi)
    }

    pub fn apply(&self, v: f32) -> f32 {
        self.function()(v)
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
    #[serde(default, skip_serializing_if = "StorageType::is_default")]
    pub storage: StorageType,
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
    pub fn images(&self, i: usize) -> Result<Images<'_>, StoreError> {
        let bytes = &self.maps[i].0;
        match self.meta.storage {
            StorageType::Float32 => ArrayView4::view_npy(bytes).map(Images::F32),
            StorageType::Float16 => ArrayView4::view_npy(bytes).map(Images::F16),
        }
        .map_err(|e| StoreError::Invalid {
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

/// A case cut into slices at the output size, all of them, before `keep-empty` and
/// context are applied.
pub struct PreparedCase {
    pub depth: usize,
    pub size: usize,
    /// `[depth][size][size]`, normalised.
    pub images: Vec<f32>,
    /// `[depth][size][size]`, labels above 2 as background.
    pub labels: Vec<u8>,
    /// Whether each source slice shows kidney / tumor (at full resolution).
    pub kidney: Vec<bool>,
    pub tumor: Vec<bool>,
}

/// The slice stage's work on one case: window and normalise, make slices square by the
/// stated policy, resize images (`filter`) and labels (nearest). A square slice that
/// shrinks by an integer factor with the area filter takes a fused one-pass path (block
/// means straight from the voxel bytes), equal to the general path up to float rounding.
pub fn prepare_case(
    img: &super::nifti::Volume,
    seg: Option<&super::nifti::Volume>,
    norm: Normalization,
    size: usize,
    filter: super::resample::Filter,
    non_square: NonSquare,
) -> Result<PreparedCase, super::nifti::NiftiError> {
    use super::resample::{Filter, pad_square, resize, resize_nearest};
    use super::slicing::transpose_fortran_to_c;
    let shape = img.shape3()?;
    let [d, h, w] = shape;
    let labels = match seg {
        Some(seg) if seg.shape3()? != shape => {
            return Err(super::nifti::NiftiError::Invalid {
                path: seg.path.clone(),
                why: format!("shape {:?} differs from the imaging's {shape:?}", seg.shape),
            });
        }
        Some(seg) => seg.to_labels()?.0,
        // no segmentation (prediction): all background
        None => vec![0u8; d * h * w].into(),
    };
    // bit 0: kidney, bit 1: tumor, per slice (a vectorisable pass over the labels)
    let mut present = vec![0u8; d];
    for column in labels.chunks_exact(d) {
        for (p, &l) in present.iter_mut().zip(column) {
            *p |= u8::from(l == 1) | (u8::from(l == 2) << 1);
        }
    }
    let kidney: Vec<bool> = present.iter().map(|p| p & 1 != 0).collect();
    let tumor: Vec<bool> = present.iter().map(|p| p & 2 != 0).collect();
    let f = norm.function();
    let clean = |l: u8| if l <= 2 { l } else { 0 };
    if h == w && h % size == 0 && filter == Filter::Area {
        let factor = h / size;
        let images = img.pooled_slices_f32(f, factor)?;
        // nearest-exact at an integer factor picks row/column factor * o + factor / 2
        let pick = |o: usize| factor * o + factor / 2;
        let out = super::slicing::gather_columns([d, size, size], |r, c, column: &mut [u8]| {
            let src = d * pick(r) + d * h * pick(c);
            for (o, &l) in column.iter_mut().zip(&labels[src..src + d]) {
                *o = clean(l);
            }
        });
        return Ok(PreparedCase {
            depth: d,
            size,
            images,
            labels: out,
            kidney,
            tumor,
        });
    }
    let image = img.to_slices_f32(f)?;
    let labels = transpose_fortran_to_c(&labels, shape, clean);
    let fill = f(norm_low(norm) as f32);
    let plane = h * w;
    let mut images = Vec::with_capacity(d * size * size);
    let mut out = Vec::with_capacity(d * size * size);
    for k in 0..d {
        let (im, lab) = (
            &image[k * plane..(k + 1) * plane],
            &labels[k * plane..(k + 1) * plane],
        );
        if h == w || non_square == NonSquare::Stretch {
            images.extend(resize(im, (h, w), (size, size), filter));
            out.extend(resize_nearest(lab, (h, w), (size, size)));
        } else {
            let (pi, n, _) = pad_square(im, (h, w), fill);
            let (pl, _, _) = pad_square(lab, (h, w), 0u8);
            images.extend(resize(&pi, (n, n), (size, size), filter));
            out.extend(resize_nearest(&pl, (n, n), (size, size)));
        }
    }
    Ok(PreparedCase {
        depth: d,
        size,
        images,
        labels: out,
        kidney,
        tumor,
    })
}

fn norm_low(n: Normalization) -> f64 {
    match n {
        Normalization::Unit { lo, .. } | Normalization::ZScore { lo, .. } => lo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_clamps_to_the_window_and_sends_nan_to_its_low_end() {
        let unit = Normalization::Unit {
            lo: -79.0,
            hi: 304.0,
        };
        assert_eq!(unit.apply(-1000.0), 0.0);
        assert_eq!(unit.apply(3000.0), 1.0);
        assert_eq!(unit.apply(f32::NAN), 0.0);
        assert!((unit.apply(112.5) - 0.5).abs() < 1e-6);
        let z = Normalization::ZScore {
            lo: -79.0,
            hi: 304.0,
            mean: 100.0,
            std: 50.0,
        };
        assert_eq!(z.apply(f32::NAN), (-79.0 - 100.0) / 50.0);
        assert_eq!(z.apply(1e9), (304.0 - 100.0) / 50.0);
    }
}
