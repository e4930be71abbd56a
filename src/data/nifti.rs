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

use std::io::Read;
use std::path::{Path, PathBuf};

use nifti::NiftiHeader;

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
            NiftiError::Nifti2 { .. } => Some("convert it to NIfTI-1, e.g. with nibabel: `nib.Nifti1Image(img.dataobj, img.affine).to_filename(...)`".into()),
            NiftiError::Changed { .. } => Some("run the pipeline again: the load stage sees the change and what depends on it runs again".into()),
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

/// Runs the macro `$go` with the Rust type of a [`Datatype`].
macro_rules! by_datatype {
    ($dt:expr, $go:ident) => {
        match $dt {
            Datatype::U8 => $go!(u8),
            Datatype::I8 => $go!(i8),
            Datatype::I16 => $go!(i16),
            Datatype::U16 => $go!(u16),
            Datatype::I32 => $go!(i32),
            Datatype::U32 => $go!(u32),
            Datatype::I64 => $go!(i64),
            Datatype::U64 => $go!(u64),
            Datatype::F32 => $go!(f32),
            Datatype::F64 => $go!(f64),
        }
    };
}

/// Voxel types of NIfTI-1 that kpipe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Datatype {
    pub fn from_code(code: i16) -> Option<Datatype> {
        Some(match code {
            2 => Datatype::U8,
            4 => Datatype::I16,
            8 => Datatype::I32,
            16 => Datatype::F32,
            64 => Datatype::F64,
            256 => Datatype::I8,
            512 => Datatype::U16,
            768 => Datatype::U32,
            1024 => Datatype::I64,
            1280 => Datatype::U64,
            _ => return None,
        })
    }

    pub fn code(self) -> i16 {
        match self {
            Datatype::U8 => 2,
            Datatype::I16 => 4,
            Datatype::I32 => 8,
            Datatype::F32 => 16,
            Datatype::F64 => 64,
            Datatype::I8 => 256,
            Datatype::U16 => 512,
            Datatype::U32 => 768,
            Datatype::I64 => 1024,
            Datatype::U64 => 1280,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Datatype::U8 | Datatype::I8 => 1,
            Datatype::I16 | Datatype::U16 => 2,
            Datatype::I32 | Datatype::U32 | Datatype::F32 => 4,
            Datatype::I64 | Datatype::U64 | Datatype::F64 => 8,
        }
    }

    /// numpy's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::U8 => "uint8",
            Datatype::I8 => "int8",
            Datatype::I16 => "int16",
            Datatype::U16 => "uint16",
            Datatype::I32 => "int32",
            Datatype::U32 => "uint32",
            Datatype::I64 => "int64",
            Datatype::U64 => "uint64",
            Datatype::F32 => "float32",
            Datatype::F64 => "float64",
        }
    }

    pub fn is_integer(self) -> bool {
        !matches!(self, Datatype::F32 | Datatype::F64)
    }
}

/// Label values outside 0..=255 (or not integers) and how many voxels hold each.
pub type OutsideLabels = Vec<(f64, u64)>;

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

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Memory for reading volumes one after another (a worker's cases): warm buffers skip
/// the page faults and zeroing of fresh allocations, a tenth of the time of reading a
/// KiTS-sized case. Give a volume back with [`Volume::recycle`].
#[derive(Default)]
pub struct ReadBuffers {
    file: Vec<u8>,
    spare: Vec<Vec<u8>>,
}

impl ReadBuffers {
    /// A buffer of `len` bytes holding whatever it held before (the caller overwrites
    /// them all): a reused buffer is neither cleared nor zeroed.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = (0..self.spare.len()).max_by_key(|&i| self.spare[i].capacity());
        let mut v = best.map(|i| self.spare.swap_remove(i)).unwrap_or_default();
        v.resize(len, 0);
        v
    }
}

impl Volume {
    /// Reads a `.nii`, `.nii.gz` or `.hdr`/`.img` pair (either possibly gzipped).
    pub fn read(path: &Path) -> Result<Volume, NiftiError> {
        Volume::read_with(path, &mut ReadBuffers::default())
    }

    /// [`Volume::read`] into reused memory.
    pub fn read_with(path: &Path, bufs: &mut ReadBuffers) -> Result<Volume, NiftiError> {
        Volume::read_checked(path, bufs, None)
    }

    /// [`Volume::read_with`], and the file's bytes as read must have the BLAKE3 digest
    /// `blake3` (hex), when given: a file changed since it was recorded is an error.
    pub fn read_checked(
        path: &Path,
        bufs: &mut ReadBuffers,
        blake3: Option<&str>,
    ) -> Result<Volume, NiftiError> {
        let bytes = read_maybe_gz(path, None, blake3, bufs)?;
        let Header {
            header,
            datatype,
            shape,
        } = parse_header(path, &bytes)?;
        let nbytes = shape.iter().product::<usize>() * datatype.size();
        let big_endian = header.endianness == nifti::Endianness::Big;
        let (data, offset, data_path) = match &header.magic {
            b"n+1\0" => {
                let offset = header.vox_offset.max(0.0) as usize;
                if offset > bytes.len() {
                    return Err(NiftiError::Invalid {
                        path: path.into(),
                        why: format!(
                            "vox_offset {} is past the end of the data ({} bytes)",
                            header.vox_offset,
                            bytes.len()
                        ),
                    });
                }
                (bytes, offset, path.to_path_buf())
            }
            _ => {
                let img = pair_image(path).ok_or_else(|| NiftiError::Invalid {
                    path: path.into(),
                    why: "a header-only (`ni1`) file whose name does not end in `.hdr`".into(),
                })?;
                if !img.exists() {
                    return Err(NiftiError::Invalid {
                        path: path.into(),
                        why: format!(
                            "the image file `{}` of this header is missing",
                            img.display()
                        ),
                    });
                }
                let offset = header.vox_offset.max(0.0) as usize;
                let data = read_maybe_gz(&img, Some(offset + nbytes), None, bufs)?;
                bufs.spare.push(bytes); // the header file's
                (data, offset, img)
            }
        };
        if data.len() < offset + nbytes {
            return Err(NiftiError::Truncated {
                path: data_path,
                why: format!(
                    "{} bytes of voxel data after offset {offset}, the header's shape {shape:?} of {} needs {nbytes}",
                    data.len().saturating_sub(offset),
                    datatype.name()
                ),
            });
        }
        let raw = data;
        Ok(Volume {
            start: offset,
            path: path.into(),
            header,
            datatype,
            shape,
            big_endian,
            raw,
        })
    }

    /// Hands the volume's memory back for the next read.
    pub fn recycle(self, bufs: &mut ReadBuffers) {
        bufs.spare.push(self.raw);
    }

    /// The voxel bytes, in file order and byte order.
    fn voxels(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len() * self.datatype.size()]
    }

    /// The 3-D volume as C-order slices shrunk by an integer `factor` in rows and columns
    /// by block means (what an area filter does at integer factors), `map` applied to
    /// every value first. One pass over the voxels, no full-size intermediate.
    pub fn pooled_slices_f32(
        &self,
        map: impl Fn(f32) -> f32 + Copy,
        factor: usize,
    ) -> Result<Vec<f32>, NiftiError> {
        let [n1, n2, n3] = self.shape3()?;
        if factor == 0 || n2 % factor != 0 || n3 % factor != 0 {
            return Err(NiftiError::Invalid {
                path: self.path.clone(),
                why: format!("{n2}x{n3} slices do not shrink by {factor}"),
            });
        }
        let (m2, m3) = (n2 / factor, n3 / factor);
        let scaling = self.scaling()?;
        let (raw, be) = (self.voxels(), self.big_endian);
        let weight = 1.0 / (factor * factor) as f32;
        // each output column (all slices at one pixel) sums factor^2 input columns, each
        // decoded by a typed, vectorisable loop; the order of the sum is row-major
        let mut column = vec![0.0f32; n1];
        macro_rules! go {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                gather_columns([n1, m2, m3], |r, c, sum: &mut [f32]| {
                    let map = map; // a local copy: its constants stay in registers
                    sum.fill(0.0);
                    for j in factor * r..factor * (r + 1) {
                        for l in factor * c..factor * (c + 1) {
                            let src = (n1 * j + n1 * n2 * l) * N;
                            let bytes = raw[src..src + n1 * N].chunks_exact(N);
                            let decode = |b: &[u8]| {
                                let b: [u8; N] = b.try_into().expect("chunk size");
                                if be {
                                    <$t>::from_be_bytes(b)
                                } else {
                                    <$t>::from_le_bytes(b)
                                }
                            };
                            match scaling {
                                None => column
                                    .iter_mut()
                                    .zip(bytes)
                                    .for_each(|(c, b)| *c = decode(b) as f32),
                                Some((s, o)) => column
                                    .iter_mut()
                                    .zip(bytes)
                                    .for_each(|(c, b)| *c = (decode(b) as f64 * s + o) as f32),
                            }
                            for (s, &v) in sum.iter_mut().zip(&column) {
                                *s += map(v) * weight;
                            }
                        }
                    }
                })
            }};
        }
        Ok(by_datatype!(self.datatype, go))
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

    /// The 3-D volume as C-order slices along its first axis (the KiTS19 slice axis):
    /// `out[k][j][l] = v[k, j, l]`, with `map` applied to every value.
    /// Decoding, scaling and `map` happen inside the blocked transpose: one pass, no
    /// intermediate volume.
    pub fn to_slices_f32(&self, map: impl Fn(f32) -> f32) -> Result<Vec<f32>, NiftiError> {
        let dims = self.shape3()?;
        let scaling = self.scaling()?;
        let (raw, be) = (self.voxels(), self.big_endian);
        macro_rules! go {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                let value = |i: usize| -> f64 {
                    let b: [u8; N] = raw[i * N..i * N + N].try_into().expect("chunk size");
                    (if be {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    }) as f64
                };
                match scaling {
                    None => transpose_indexed(dims, |i| map(value(i) as f32)),
                    Some((s, b)) => transpose_indexed(dims, |i| map((value(i) * s + b) as f32)),
                }
            }};
        }
        Ok(by_datatype!(self.datatype, go))
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

/// The affine nibabel picks (`Nifti1Header.get_best_affine`): the sform if sform_code is
/// set, else the qform if qform_code is, else its base affine (`get_base_affine`: x
/// flipped, the origin at the volume's centre), all after nibabel's header fixes
/// ([`nibabel_pixdim`]; codes outside 0..=5 count as 0). `shape` is `dim[1..=dim[0]]`.
pub fn nibabel_affine(h: &NiftiHeader, shape: &[usize]) -> [[f64; 4]; 4] {
    let code = |c: i16| if (0..=5).contains(&c) { c } else { 0 };
    if code(h.sform_code) != 0 {
        let r = |row: [f32; 4]| row.map(f64::from);
        return [r(h.srow_x), r(h.srow_y), r(h.srow_z), [0.0, 0.0, 0.0, 1.0]];
    }
    let pixdim = nibabel_pixdim(h);
    if code(h.qform_code) != 0 {
        return qform_affine(h, &pixdim);
    }
    base_affine(shape, &pixdim)
}

/// `pixdim` as nibabel holds it after loading: its header checks set a qfac
/// (`pixdim[0]`) other than 1 or -1 to 1, and `pixdim[1..=3]` that are 0 to 1 and
/// negative ones to their absolute value.
pub fn nibabel_pixdim(h: &NiftiHeader) -> [f32; 8] {
    let mut p = h.pixdim;
    if p[0] != 1.0 && p[0] != -1.0 {
        p[0] = 1.0;
    }
    for v in &mut p[1..4] {
        if *v == 0.0 {
            *v = 1.0;
        } else if *v < 0.0 {
            *v = -*v;
        }
    }
    p
}

/// nibabel's `shape_zoom_affine(shape, zooms, x_flip=True)`: zooms on the diagonal, the
/// first negated, and the translation that puts the volume's centre at the origin;
/// shapes of fewer than 3 axes are padded with 1s (spacing 1).
fn base_affine(shape: &[usize], pixdim: &[f32; 8]) -> [[f64; 4]; 4] {
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        let (n, zoom) = match shape.get(i) {
            Some(&n) => (n as f64, f64::from(pixdim[i + 1])),
            None => (1.0, 1.0),
        };
        let zoom = if i == 0 { -zoom } else { zoom };
        let origin = (n - 1.0) / 2.0;
        m[i][i] = zoom;
        m[i][3] = -origin * zoom;
    }
    m[3][3] = 1.0;
    m
}

/// nibabel's `get_qform()`: `fillpositive` (|w²| under 3 float32 epsilons counts as 0)
/// and `quat2mat`, in float64 where nibabel uses long double, then pixdim and qfac (as
/// nibabel's header checks left them).
fn qform_affine(h: &NiftiHeader, pixdim: &[f32; 8]) -> [[f64; 4]; 4] {
    let (x, y, z) = (
        f64::from(h.quatern_b),
        f64::from(h.quatern_c),
        f64::from(h.quatern_d),
    );
    let w2 = 1.0 - (x * x + y * y + z * z);
    let w = if w2.abs() < 3.0 * f64::from(f32::EPSILON) || w2 < 0.0 {
        0.0
    } else {
        w2.sqrt()
    };
    let nq = w * w + x * x + y * y + z * z;
    let r: [[f64; 3]; 3] = if nq < f64::EPSILON {
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    } else {
        let s = 2.0 / nq;
        let (xs, ys, zs) = (x * s, y * s, z * s);
        let (wx, wy, wz) = (w * xs, w * ys, w * zs);
        let (xx, xy, xz) = (x * xs, x * ys, x * zs);
        let (yy, yz, zz) = (y * ys, y * zs, z * zs);
        [
            [1.0 - (yy + zz), xy - wz, xz + wy],
            [xy + wz, 1.0 - (xx + zz), yz - wx],
            [xz - wy, yz + wx, 1.0 - (xx + yy)],
        ]
    };
    let qfac = f64::from(pixdim[0]);
    let zooms = [
        f64::from(pixdim[1]),
        f64::from(pixdim[2]),
        f64::from(pixdim[3]) * qfac,
    ];
    let t = [
        f64::from(h.quatern_x),
        f64::from(h.quatern_y),
        f64::from(h.quatern_z),
    ];
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = r[i][j] * zooms[j];
        }
        m[i][3] = t[i];
    }
    m[3][3] = 1.0;
    m
}

/// A shape with trailing size-1 axes beyond the third dropped, if that leaves 3 axes.
pub fn squeeze3(shape: &[usize]) -> Option<[usize; 3]> {
    let mut s = shape;
    while s.len() > 3 && s.last() == Some(&1) {
        s = &s[..s.len() - 1];
    }
    s.try_into().ok()
}

/// A parsed header: enough to know a volume's shape and type without its data.
pub struct Header {
    pub header: NiftiHeader,
    pub datatype: Datatype,
    /// nibabel's shape: `dim[1..=dim[0]]`.
    pub shape: Vec<usize>,
}

/// Reads only the header of a volume (inflating just its first bytes).
pub fn read_header(path: &Path) -> Result<Header, NiftiError> {
    let file = std::fs::File::open(path).map_err(|source| NiftiError::Io {
        path: path.into(),
        source,
    })?;
    let mut magic = [0u8; 2];
    let mut prefix = Vec::with_capacity(348);
    let mut reader = std::io::BufReader::new(file);
    let io = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let n = (&mut reader).take(2).read(&mut magic).map_err(io)?;
    let chained = std::io::Cursor::new(magic[..n].to_vec()).chain(reader);
    if magic == GZIP_MAGIC {
        flate2::read::MultiGzDecoder::new(chained)
            .take(348)
            .read_to_end(&mut prefix)
    } else {
        chained.take(348).read_to_end(&mut prefix)
    }
    .map_err(|e| NiftiError::NotNifti {
        path: path.into(),
        why: format!("unreadable data: {e}"),
    })?;
    parse_header(path, &prefix)
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, NiftiError> {
    if bytes.is_empty() {
        return Err(NiftiError::NotNifti {
            path: path.into(),
            why: "the file is empty".into(),
        });
    }
    if bytes.len() < 348 {
        let size = i32::from_le_bytes(
            bytes
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]),
        );
        if size == 348 || size.swap_bytes() == 348 {
            return Err(NiftiError::Truncated {
                path: path.into(),
                why: format!("{} bytes, shorter than a NIfTI-1 header (348)", bytes.len()),
            });
        }
        return Err(NiftiError::NotNifti {
            path: path.into(),
            why: format!("only {} bytes", bytes.len()),
        });
    }
    let size = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if size == 540 || size.swap_bytes() == 540 {
        return Err(NiftiError::Nifti2 { path: path.into() });
    }
    if size != 348 && size.swap_bytes() != 348 {
        return Err(NiftiError::NotNifti {
            path: path.into(),
            why: format!("header size field is {size}, not 348"),
        });
    }
    let header = NiftiHeader::from_reader(&bytes[..348]).map_err(|e| NiftiError::NotNifti {
        path: path.into(),
        why: e.to_string(),
    })?;
    let datatype = Datatype::from_code(header.datatype).ok_or(NiftiError::Datatype {
        path: path.into(),
        code: header.datatype,
    })?;
    let ndim = usize::from(header.dim[0]);
    if !(1..=7).contains(&ndim) {
        return Err(NiftiError::Invalid {
            path: path.into(),
            why: format!("dim[0] = {ndim} is outside 1..=7"),
        });
    }
    let shape: Vec<usize> = header.dim[1..=ndim]
        .iter()
        .map(|&d| usize::from(d))
        .collect();
    if shape.contains(&0) {
        return Err(NiftiError::Invalid {
            path: path.into(),
            why: format!("a dimension is 0 in {shape:?}"),
        });
    }
    Ok(Header {
        header,
        datatype,
        shape,
    })
}

/// `x.hdr` -> `x.img`, `x.hdr.gz` -> `x.img.gz`.
fn pair_image(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let img = if let Some(stem) = name.strip_suffix(".hdr") {
        format!("{stem}.img")
    } else {
        format!("{}.img.gz", name.strip_suffix(".hdr.gz")?)
    };
    Some(path.with_file_name(img))
}

/// Reads a file, inflating it if it starts with the gzip magic bytes. `size` is how many
/// bytes are needed, when known; otherwise the NIfTI header at the start tells. With
/// `blake3`, the bytes read must have that digest.
fn read_maybe_gz(
    path: &Path,
    size: Option<usize>,
    blake3: Option<&str>,
    bufs: &mut ReadBuffers,
) -> Result<Vec<u8>, NiftiError> {
    let io = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut compressed = std::mem::take(&mut bufs.file);
    compressed.clear();
    file.read_to_end(&mut compressed).map_err(io)?;
    if let Some(recorded) = blake3 {
        let actual = blake3::Hasher::new()
            .update_rayon(&compressed)
            .finalize()
            .to_hex()
            .to_string();
        if actual != recorded {
            bufs.file = compressed;
            return Err(NiftiError::Changed {
                path: path.into(),
                actual: actual[..12].into(),
                recorded: recorded[..recorded.len().min(12)].into(),
            });
        }
    }
    if !compressed.starts_with(&GZIP_MAGIC) {
        return Ok(compressed);
    }
    let out = inflate(path, size, &compressed, bufs);
    bufs.file = compressed;
    out
}

/// Inflates gzip `bytes` (one member or several) of the file at `path`.
fn inflate(
    path: &Path,
    size: Option<usize>,
    bytes: &[u8],
    bufs: &mut ReadBuffers,
) -> Result<Vec<u8>, NiftiError> {
    let needed = size.or_else(|| {
        let mut prefix = Vec::with_capacity(348);
        flate2::read::GzDecoder::new(bytes)
            .take(348)
            .read_to_end(&mut prefix)
            .ok()?;
        needed_bytes(&prefix)
    });
    // Fast path: one whole-buffer inflate into exactly the bytes needed. libdeflate
    // inflates the first gzip member only; a short result (more members, or damage) or
    // a first member larger than needed takes the streaming path.
    if let Some(needed) = needed {
        let mut out = bufs.take(needed);
        if let Ok(n) = libdeflater::Decompressor::new().gzip_decompress(bytes, &mut out)
            && n == needed
        {
            return Ok(out);
        }
        bufs.spare.push(out);
    }
    let mut out = Vec::with_capacity(needed.unwrap_or(bytes.len() * 4));
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                NiftiError::Truncated {
                    path: path.into(),
                    why: format!("the gzip stream ends early ({} bytes inflated)", out.len()),
                }
            } else {
                NiftiError::NotNifti {
                    path: path.into(),
                    why: format!("corrupt gzip data: {e}"),
                }
            }
        })?;
    Ok(out)
}

/// Header plus voxel bytes of a single-file NIfTI-1, from its first 348 bytes.
fn needed_bytes(prefix: &[u8]) -> Option<usize> {
    let h = NiftiHeader::from_reader(prefix).ok()?;
    if &h.magic != b"n+1\0" {
        return None;
    }
    let ndim = usize::from(h.dim[0]).clamp(1, 7);
    let voxels: usize = h.dim[1..=ndim].iter().map(|&d| usize::from(d)).product();
    Some(h.vox_offset.max(0.0) as usize + voxels * Datatype::from_code(h.datatype)?.size())
}

/// Blocked transpose of a Fortran-order (n1, n2, n3) array into C order, mapping values:
/// `out[(k * n2 + j) * n3 + l] = map(values[k + n1 * (j + n2 * l)])`.
pub fn transpose_fortran_to_c<T: Copy, U: Copy + Default>(
    values: &[T],
    dims: [usize; 3],
    map: impl Fn(T) -> U,
) -> Vec<U> {
    transpose_indexed(dims, |i| map(values[i]))
}

/// The transpose behind [`transpose_fortran_to_c`]: `value(i)` gives the element at
/// Fortran-order index `i`.
#[inline]
pub fn transpose_indexed<U: Copy + Default>(
    [n1, n2, n3]: [usize; 3],
    value: impl Fn(usize) -> U,
) -> Vec<U> {
    gather_columns([n1, n2, n3], |j, l, column: &mut [U]| {
        let src = n1 * j + n1 * n2 * l;
        for (k, c) in column.iter_mut().enumerate() {
            *c = value(src + k);
        }
    })
}

/// Builds C-order slices `out[k][r][c]` (`depth` slices of `rows` x `cols`) a column at a
/// time: `column(r, c, buf)` fills `buf` with the `depth` values along the slice axis at
/// pixel (r, c), which a volume in NIfTI order (slice axis fastest, as KiTS19's) holds
/// contiguously. The slice axis is the fastest in the file and the slowest in the
/// output, so the work goes in blocks of `ROWS` x `COLS` columns (an L2-sized tile):
/// within a block, consecutive calls read consecutive rows of one column of the file
/// (a sequential stream), and the block leaves as runs of `COLS` values per slice row.
pub fn gather_columns<U: Copy + Default>(
    [depth, rows, cols]: [usize; 3],
    mut column: impl FnMut(usize, usize, &mut [U]),
) -> Vec<U> {
    const COLS: usize = 32;
    const ROWS: usize = 8;
    let mut out = vec![U::default(); depth * rows * cols];
    if out.is_empty() {
        return out;
    }
    let mut tile = vec![U::default(); COLS * ROWS * depth];
    for c0 in (0..cols).step_by(COLS) {
        let width = COLS.min(cols - c0);
        for r0 in (0..rows).step_by(ROWS) {
            let height = ROWS.min(rows - r0);
            for c in 0..width {
                for r in 0..height {
                    column(r0 + r, c0 + c, &mut tile[(c * ROWS + r) * depth..][..depth]);
                }
            }
            for k in 0..depth {
                for r in 0..height {
                    let run = &mut out[(k * rows + r0 + r) * cols + c0..][..width];
                    for (c, o) in run.iter_mut().enumerate() {
                        *o = tile[(c * ROWS + r) * depth + k];
                    }
                }
            }
        }
    }
    out
}

/// A volume to write.
pub struct NewVolume<'a> {
    /// NIfTI dims, first fastest.
    pub shape: [usize; 3],
    pub datatype: Datatype,
    /// Voxel bytes in file (Fortran) order, little-endian.
    pub data: &'a [u8],
    pub spacing: [f32; 3],
    pub affine: [[f32; 4]; 3],
    pub description: &'a str,
}

/// The fields of a header that place a volume in space, written as they are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// `pixdim[0]` is qfac.
    pub pixdim: [f32; 8],
    pub qform_code: i16,
    pub sform_code: i16,
    /// `quatern_b`, `quatern_c`, `quatern_d`, `qoffset_x`, `qoffset_y`, `qoffset_z`.
    pub quatern: [f32; 6],
    pub srow: [[f32; 4]; 3],
    pub xyzt_units: u8,
    pub dim_info: u8,
}

impl Geometry {
    /// A header's geometry as stored (nibabel's load-time fixes are a reader's business:
    /// a file written with it reads back with the same affine).
    pub fn of(h: &NiftiHeader) -> Geometry {
        Geometry {
            pixdim: h.pixdim,
            qform_code: h.qform_code,
            sform_code: h.sform_code,
            quatern: [
                h.quatern_b,
                h.quatern_c,
                h.quatern_d,
                h.quatern_x,
                h.quatern_y,
                h.quatern_z,
            ],
            srow: [h.srow_x, h.srow_y, h.srow_z],
            xyzt_units: h.xyzt_units,
            dim_info: h.dim_info,
        }
    }

    /// What [`write_volume`] writes: the affine as an aligned sform (code 2), no qform,
    /// the spacing in pixdim, millimetres.
    fn of_new(v: &NewVolume) -> Geometry {
        let [a, b, c] = v.spacing;
        Geometry {
            pixdim: [1.0, a, b, c, 0.0, 0.0, 0.0, 0.0],
            qform_code: 0,
            sform_code: 2,
            quatern: [0.0; 6],
            srow: v.affine,
            xyzt_units: 2,
            dim_info: 0,
        }
    }
}

/// Writes a little-endian single-file NIfTI-1 (`n+1`), gzipped if the name ends in `.gz`.
/// Written to a temporary sibling and renamed, so a reader never sees half a file.
pub fn write_volume(path: &Path, v: &NewVolume) -> Result<(), NiftiError> {
    write_volume_with(path, v, &Geometry::of_new(v))
}

/// [`write_volume`] with another header's geometry (qform, sform, their codes, pixdim,
/// units) instead of `v.spacing` and `v.affine`: a prediction keeps its input's.
pub fn write_volume_with(
    path: &Path,
    v: &NewVolume,
    geometry: &Geometry,
) -> Result<(), NiftiError> {
    let io = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let expected = v.shape.iter().product::<usize>() * v.datatype.size();
    if v.data.len() != expected {
        return Err(NiftiError::Invalid {
            path: path.into(),
            why: format!(
                "{} data bytes for shape {:?}, expected {expected}",
                v.data.len(),
                v.shape
            ),
        });
    }
    let mut bytes = header_bytes(v, geometry);
    bytes.extend_from_slice(v.data);
    let gz = path.extension().is_some_and(|e| e == "gz");
    let payload = if gz {
        let mut c =
            libdeflater::Compressor::new(libdeflater::CompressionLvl::new(4).expect("valid level"));
        let mut out = vec![0u8; c.gzip_compress_bound(bytes.len())];
        let n = c
            .gzip_compress(&bytes, &mut out)
            .map_err(|e| NiftiError::Invalid {
                path: path.into(),
                why: format!("gzip failed: {e:?}"),
            })?;
        out.truncate(n);
        out
    } else {
        bytes
    };
    crate::files::write_atomic(path, &payload).map_err(io)
}

fn header_bytes(v: &NewVolume, g: &Geometry) -> Vec<u8> {
    let mut h = Vec::with_capacity(352 + v.data.len());
    let i16s = |h: &mut Vec<u8>, x: i16| h.extend_from_slice(&x.to_le_bytes());
    let f32s = |h: &mut Vec<u8>, x: f32| h.extend_from_slice(&x.to_le_bytes());
    h.extend_from_slice(&348i32.to_le_bytes());
    h.extend_from_slice(&[0u8; 10 + 18]); // data_type, db_name
    h.extend_from_slice(&0i32.to_le_bytes()); // extents
    i16s(&mut h, 0); // session_error
    h.push(b'r'); // regular
    h.push(g.dim_info);
    let dims = [
        3,
        v.shape[0] as i16,
        v.shape[1] as i16,
        v.shape[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for d in dims {
        i16s(&mut h, d);
    }
    for _ in 0..3 {
        f32s(&mut h, 0.0); // intent_p1..3
    }
    i16s(&mut h, 0); // intent_code
    i16s(&mut h, v.datatype.code());
    i16s(&mut h, (v.datatype.size() * 8) as i16);
    i16s(&mut h, 0); // slice_start
    for p in g.pixdim {
        f32s(&mut h, p);
    }
    f32s(&mut h, 352.0); // vox_offset
    f32s(&mut h, 1.0); // scl_slope
    f32s(&mut h, 0.0); // scl_inter
    i16s(&mut h, 0); // slice_end
    h.push(0); // slice_code
    h.push(g.xyzt_units);
    for _ in 0..4 {
        f32s(&mut h, 0.0); // cal_max, cal_min, slice_duration, toffset
    }
    h.extend_from_slice(&[0u8; 8]); // glmax, glmin
    let mut descrip = [0u8; 80];
    let d = v.description.as_bytes();
    descrip[..d.len().min(79)].copy_from_slice(&d[..d.len().min(79)]);
    h.extend_from_slice(&descrip);
    h.extend_from_slice(&[0u8; 24]); // aux_file
    i16s(&mut h, g.qform_code);
    i16s(&mut h, g.sform_code);
    for q in g.quatern {
        f32s(&mut h, q);
    }
    for row in g.srow {
        for x in row {
            f32s(&mut h, x);
        }
    }
    h.extend_from_slice(&[0u8; 16]); // intent_name
    h.extend_from_slice(b"n+1\0");
    h.extend_from_slice(&[0u8; 4]); // extension flag: none
    debug_assert_eq!(h.len(), 352);
    h
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
