//! Writing little-endian single-file NIfTI-1 volumes, with their own geometry or
//! another header's.

use std::path::Path;

use nifti::NiftiHeader;

use super::{Datatype, NiftiError};

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
