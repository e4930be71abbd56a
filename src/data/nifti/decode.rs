//! The voxel values of a read volume, as nibabel's `get_fdata()` gives them (scaling
//! included), as labels, and summarised for `kpipe inspect`.

use super::{Datatype, NiftiError, Volume, by_datatype, nibabel_affine, nibabel_pixdim, squeeze3};

/// Label values outside 0..=255 (or not integers) and how many voxels hold each.
pub type OutsideLabels = Vec<(f64, u64)>;

impl Volume {
    /// The voxel bytes, in file order and byte order.
    pub(crate) fn voxels(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len() * self.datatype.size()]
    }

    /// nibabel's effective (slope, intercept), `None` when no scaling applies.
    pub fn scaling(&self) -> Result<Option<(f64, f64)>, NiftiError> {
        let (slope, inter) = (self.header.scl_slope, self.header.scl_inter);
        if slope == 0.0 || !slope.is_finite() {
            return Ok(None);
        }
        if !inter.is_finite() {
            return Err(NiftiError::Invalid {
                path: self.path.clone(),
                why: format!("valid scl_slope {slope} but invalid scl_inter {inter}"),
            });
        }
        if slope == 1.0 && inter == 0.0 {
            return Ok(None);
        }
        Ok(Some((f64::from(slope), f64::from(inter))))
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape with trailing size-1 axes beyond the third dropped; an error unless 3-D.
    pub fn shape3(&self) -> Result<[usize; 3], NiftiError> {
        squeeze3(&self.shape).ok_or_else(|| NiftiError::Invalid {
            path: self.path.clone(),
            why: format!("expected a 3-D volume, found shape {:?}", self.shape),
        })
    }

    /// Calls `f(i, raw value as f64)` for every voxel in file order.
    fn for_each_raw(&self, mut f: impl FnMut(usize, f64)) {
        macro_rules! each {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                for (i, c) in self.voxels().chunks_exact(N).enumerate() {
                    let b: [u8; N] = c.try_into().expect("chunk size");
                    let v = if self.big_endian {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    };
                    f(i, v as f64);
                }
            }};
        }
        by_datatype!(self.datatype, each);
    }

    /// The values nibabel's `get_fdata()` returns, in file (Fortran) order.
    pub fn to_f64(&self) -> Result<Vec<f64>, NiftiError> {
        let scaling = self.scaling()?;
        let mut out = vec![0.0f64; self.len()];
        match scaling {
            None => self.for_each_raw(|i, v| out[i] = v),
            Some((s, b)) => self.for_each_raw(|i, v| out[i] = v * s + b),
        }
        Ok(out)
    }

    /// The values as f32 (computed in f64, then rounded), in file order.
    pub fn to_f32(&self) -> Result<Vec<f32>, NiftiError> {
        let scaling = self.scaling()?;
        let mut out = vec![0.0f32; self.len()];
        match scaling {
            None => self.for_each_raw(|i, v| out[i] = v as f32),
            Some((s, b)) => self.for_each_raw(|i, v| out[i] = (v * s + b) as f32),
        }
        Ok(out)
    }

    /// The voxels as label values 0..=255 in file order, for integer volumes (or float
    /// volumes holding integers). Values outside go to `bad` (value, count).
    pub fn to_labels(&self) -> Result<(std::borrow::Cow<'_, [u8]>, OutsideLabels), NiftiError> {
        let scaling = self.scaling()?;
        if self.datatype == Datatype::U8 && scaling.is_none() {
            // every byte is a label already
            return Ok((std::borrow::Cow::Borrowed(self.voxels()), vec![]));
        }
        let mut out = vec![0u8; self.len()];
        let mut bad: std::collections::BTreeMap<u64, u64> = Default::default();
        self.for_each_raw(|i, v| {
            let v = scaling.map_or(v, |(s, b)| v * s + b);
            if (0.0..=255.0).contains(&v) && v.fract() == 0.0 {
                out[i] = v as u8;
            } else {
                *bad.entry(v.to_bits()).or_default() += 1;
            }
        });
        Ok((
            out.into(),
            bad.into_iter()
                .map(|(b, n)| (f64::from_bits(b), n))
                .collect(),
        ))
    }

    /// The affine nibabel gives (`img.affine`): see [`nibabel_affine`].
    pub fn affine(&self) -> [[f64; 4]; 4] {
        nibabel_affine(&self.header, &self.shape)
    }

    /// Voxel spacing, `pixdim[1..=3]` as nibabel reads it ([`nibabel_pixdim`]).
    pub fn spacing(&self) -> [f64; 3] {
        let p = nibabel_pixdim(&self.header);
        [1, 2, 3].map(|i| f64::from(p[i]))
    }
}

/// What `kpipe inspect` reports about a volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub shape: Vec<usize>,
    pub datatype: &'static str,
    pub endianness: &'static str,
    /// `pixdim[1..=ndim]`, as nibabel's `get_zooms()`.
    pub spacing: Vec<f64>,
    pub affine: [[f64; 4]; 4],
    /// The slope and intercept applied (1 and 0 when none applies).
    pub scl_slope: f64,
    pub scl_inter: f64,
    /// Over the scaled data; NaN is skipped (null when every value is NaN).
    pub min: f64,
    pub max: f64,
    /// Compensated (Neumaier) sum in float64.
    pub sum: f64,
    pub nan_count: u64,
}

impl Volume {
    pub fn summary(&self) -> Result<Summary, NiftiError> {
        let (slope, inter) = self.scaling()?.unwrap_or((1.0, 0.0));
        let values = self.to_f64()?;
        let (mut min, mut max, mut nan) = (f64::NAN, f64::NAN, 0u64);
        let (mut sum, mut comp) = (0.0f64, 0.0f64);
        for &v in &values {
            if v.is_nan() {
                nan += 1;
                continue;
            }
            min = if min.is_nan() { v } else { min.min(v) };
            max = if max.is_nan() { v } else { max.max(v) };
            let t = sum + v;
            comp += if sum.abs() >= v.abs() {
                (sum - t) + v
            } else {
                (v - t) + sum
            };
            sum = t;
        }
        let ndim = self.shape.len();
        Ok(Summary {
            shape: self.shape.clone(),
            datatype: self.datatype.name(),
            endianness: if self.big_endian { "big" } else { "little" },
            spacing: {
                let p = nibabel_pixdim(&self.header);
                (1..=ndim).map(|i| f64::from(p[i])).collect()
            },
            affine: self.affine(),
            scl_slope: slope,
            scl_inter: inter,
            min,
            max,
            sum: sum + comp,
            nan_count: nan,
        })
    }
}
