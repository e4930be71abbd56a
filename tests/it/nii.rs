//! NIfTI-1 files written field by field, for the NIfTI tests.

use std::path::{Path, PathBuf};

/// A NIfTI-1 file, field by field.
#[derive(Clone)]
pub(crate) struct Nii {
    pub(crate) dims: Vec<u16>,
    pub(crate) datatype: i16,
    pub(crate) bitpix: i16,
    pub(crate) slope: f32,
    pub(crate) inter: f32,
    pub(crate) vox_offset: f32,
    pub(crate) big: bool,
    pub(crate) magic: [u8; 4],
    pub(crate) extension: Vec<u8>,
    pub(crate) data: Vec<u8>,
    pub(crate) pixdim: [f32; 8],
    pub(crate) sform: Option<[[f32; 4]; 3]>,
    /// (qform_code, sform_code) as written, instead of (0, 1 if `sform`).
    pub(crate) codes: Option<(i16, i16)>,
    pub(crate) sizeof_hdr: i32,
}

impl Nii {
    pub(crate) fn new(dims: &[u16], datatype: i16, bitpix: i16, data: Vec<u8>) -> Nii {
        Nii {
            dims: dims.to_vec(),
            datatype,
            bitpix,
            slope: 1.0,
            inter: 0.0,
            vox_offset: 352.0,
            big: false,
            magic: *b"n+1\0",
            extension: vec![],
            data,
            pixdim: [1.0, 2.5, 0.8, 0.8, 1.0, 0.0, 0.0, 0.0],
            sform: None,
            codes: None,
            sizeof_hdr: 348,
        }
    }

    pub(crate) fn header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        let big = self.big;
        let i32b = |h: &mut Vec<u8>, v: i32| {
            h.extend_from_slice(&if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        };
        let i16b = |h: &mut Vec<u8>, v: i16| {
            h.extend_from_slice(&if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        };
        let f32b = |h: &mut Vec<u8>, v: f32| {
            h.extend_from_slice(&if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        };
        i32b(&mut h, self.sizeof_hdr);
        h.extend_from_slice(&[0; 28]);
        i32b(&mut h, 0);
        i16b(&mut h, 0);
        h.extend_from_slice(&[b'r', 0]);
        let mut dim = [1i16; 8];
        dim[0] = self.dims.len() as i16;
        for (i, d) in self.dims.iter().enumerate() {
            dim[i + 1] = *d as i16;
        }
        for d in dim {
            i16b(&mut h, d);
        }
        for _ in 0..3 {
            f32b(&mut h, 0.0);
        }
        i16b(&mut h, 0);
        i16b(&mut h, self.datatype);
        i16b(&mut h, self.bitpix);
        i16b(&mut h, 0);
        for p in self.pixdim {
            f32b(&mut h, p);
        }
        f32b(&mut h, self.vox_offset);
        f32b(&mut h, self.slope);
        f32b(&mut h, self.inter);
        i16b(&mut h, 0);
        h.extend_from_slice(&[0, 2]);
        for _ in 0..4 {
            f32b(&mut h, 0.0);
        }
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&[0; 80 + 24]);
        let (qform_code, sform_code) = self.codes.unwrap_or((0, i16::from(self.sform.is_some())));
        i16b(&mut h, qform_code);
        i16b(&mut h, sform_code);
        for _ in 0..6 {
            f32b(&mut h, 0.0);
        }
        let rows = self.sform.unwrap_or([
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ]);
        for r in rows {
            for v in r {
                f32b(&mut h, v);
            }
        }
        h.extend_from_slice(&[0; 16]);
        h.extend_from_slice(&self.magic);
        assert_eq!(h.len(), 348);
        h
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
        let mut b = self.header();
        if self.magic == *b"n+1\0" {
            if self.extension.is_empty() {
                b.extend_from_slice(&[0; 4]);
            } else {
                b.extend_from_slice(&[1, 0, 0, 0]);
                b.extend_from_slice(&self.extension);
            }
            b.resize(self.vox_offset as usize, 0);
            b.extend_from_slice(&self.data);
        }
        b
    }

    pub(crate) fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.bytes()).unwrap();
        path.to_path_buf()
    }
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub(crate) fn le<T: Copy>(values: &[T], to: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}
