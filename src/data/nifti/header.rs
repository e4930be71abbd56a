//! The NIfTI-1 header: parsing it (with the checks that name what is wrong), and the
//! shape, spacing and affine nibabel derives from it.

use std::path::Path;

use nifti::NiftiHeader;

use super::{Datatype, NiftiError};

/// A parsed header: enough to know a volume's shape and type without its data.
pub struct Header {
    pub header: NiftiHeader,
    pub datatype: Datatype,
    /// nibabel's shape: `dim[1..=dim[0]]`.
    pub shape: Vec<usize>,
}

/// The header of a file from its first bytes (348 at least), or the error that says
/// why they are not a NIfTI-1 header kpipe reads.
pub(super) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, NiftiError> {
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
