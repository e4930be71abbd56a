//! NIfTI reading against files the tests write byte by byte (nibabel-style variants), the
//! real KiTS19 samples in ../shared (skipped when absent), and nibabel itself (where
//! Python has it).

use std::path::{Path, PathBuf};

use kpipe::data::nifti::{NiftiError, Volume};

/// A NIfTI-1 file, field by field.
#[derive(Clone)]
struct Nii {
    dims: Vec<u16>,
    datatype: i16,
    bitpix: i16,
    slope: f32,
    inter: f32,
    vox_offset: f32,
    big: bool,
    magic: [u8; 4],
    extension: Vec<u8>,
    data: Vec<u8>,
    pixdim: [f32; 8],
    sform: Option<[[f32; 4]; 3]>,
    /// (qform_code, sform_code) as written, instead of (0, 1 if `sform`).
    codes: Option<(i16, i16)>,
    sizeof_hdr: i32,
}

impl Nii {
    fn new(dims: &[u16], datatype: i16, bitpix: i16, data: Vec<u8>) -> Nii {
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

    fn header(&self) -> Vec<u8> {
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

    fn bytes(&self) -> Vec<u8> {
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

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.bytes()).unwrap();
        path.to_path_buf()
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn le<T: Copy>(values: &[T], to: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    values.iter().flat_map(|&v| to(v)).collect()
}

#[test]
fn scaled_int16_reads_as_nibabel_scales() {
    let dir = tempfile::tempdir().unwrap();
    let raw: Vec<i16> = vec![-1024, 0, 1, 300, i16::MAX, i16::MIN, 7, 8];
    let mut n = Nii::new(&[2, 2, 2], 4, 16, le(&raw, |v| v.to_le_bytes().to_vec()));
    n.slope = 0.5;
    n.inter = -1024.0;
    let v = Volume::read(&n.write(&dir.path().join("a.nii"))).unwrap();
    let got = v.to_f64().unwrap();
    let want: Vec<f64> = raw.iter().map(|&r| f64::from(r) * 0.5 + -1024.0).collect();
    assert_eq!(got, want);
}

#[test]
fn big_endian_float32_and_every_integer_type_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [1.5f32, -2.25, f32::NAN, 1e30, 0.0, -0.0, 3.0, 4.0];
    let mut n = Nii::new(&[2, 2, 2], 16, 32, le(&vals, |v| v.to_be_bytes().to_vec()));
    n.big = true;
    let v = Volume::read(&n.write(&dir.path().join("be.nii"))).unwrap();
    assert!(v.big_endian);
    let got = v.to_f64().unwrap();
    for (g, w) in got.iter().zip(vals) {
        assert_eq!(g.to_bits(), f64::from(w).to_bits());
    }
    macro_rules! case {
        ($t:ty, $code:expr, $vals:expr) => {{
            let vals: Vec<$t> = $vals;
            for big in [false, true] {
                let data = le(&vals, |v| {
                    if big {
                        v.to_be_bytes().to_vec()
                    } else {
                        v.to_le_bytes().to_vec()
                    }
                });
                let mut n = Nii::new(
                    &[vals.len() as u16, 1, 1],
                    $code,
                    (std::mem::size_of::<$t>() * 8) as i16,
                    data,
                );
                n.big = big;
                let v = Volume::read(&n.write(&dir.path().join(format!("t{}{big}.nii", $code))))
                    .unwrap();
                let want: Vec<f64> = vals.iter().map(|&x| x as f64).collect();
                assert_eq!(v.to_f64().unwrap(), want, "datatype {} big={big}", $code);
            }
        }};
    }
    case!(u8, 2, vec![0, 1, 255]);
    case!(i8, 256, vec![-128, 0, 127]);
    case!(u16, 512, vec![0, 2, 65535]);
    case!(i32, 8, vec![i32::MIN, 0, i32::MAX]);
    case!(u32, 768, vec![0, 5, u32::MAX]);
    case!(i64, 1024, vec![i64::MIN, -1, 1 << 60]);
    case!(u64, 1280, vec![0, u64::MAX, 12345]);
    case!(f64, 64, vec![-1.0e300, 0.1, 2.0]);
}

#[test]
fn zero_or_nan_slope_means_no_scaling() {
    let dir = tempfile::tempdir().unwrap();
    for (name, slope) in [("zero", 0.0f32), ("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let mut n = Nii::new(&[3, 1, 1], 2, 8, vec![1, 2, 3]);
        n.slope = slope;
        n.inter = 100.0;
        let v = Volume::read(&n.write(&dir.path().join(format!("{name}.nii")))).unwrap();
        assert_eq!(v.to_f64().unwrap(), vec![1.0, 2.0, 3.0], "{name}");
        let s = v.summary().unwrap();
        assert_eq!((s.scl_slope, s.scl_inter), (1.0, 0.0));
    }
}

#[test]
fn four_d_with_a_trailing_unit_axis_is_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let n = Nii::new(&[2, 3, 4, 1], 2, 8, (0..24).collect());
    let v = Volume::read(&n.write(&dir.path().join("4d.nii"))).unwrap();
    assert_eq!(v.shape, vec![2, 3, 4, 1]);
    assert_eq!(v.shape3().unwrap(), [2, 3, 4]);
    let n = Nii::new(&[2, 3, 2, 2], 2, 8, (0..24).collect());
    let v = Volume::read(&n.write(&dir.path().join("4dt.nii"))).unwrap();
    assert!(v.shape3().is_err());
}

#[test]
fn gzip_is_recognised_by_its_magic_bytes_and_multi_member_streams_read() {
    let dir = tempfile::tempdir().unwrap();
    let n = Nii::new(&[4, 4, 4], 2, 8, (0..64).collect());
    let bytes = n.bytes();
    // gzipped but named .nii
    std::fs::write(dir.path().join("gz.nii"), gzip(&bytes)).unwrap();
    // plain but named .nii.gz
    std::fs::write(dir.path().join("plain.nii.gz"), &bytes).unwrap();
    // two gzip members
    let mut two = gzip(&bytes[..200]);
    two.extend(gzip(&bytes[200..]));
    std::fs::write(dir.path().join("two.nii.gz"), two).unwrap();
    let want: Vec<f64> = (0..64).map(f64::from).collect();
    for name in ["gz.nii", "plain.nii.gz", "two.nii.gz"] {
        let v = Volume::read(&dir.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.to_f64().unwrap(), want, "{name}");
    }
}

#[test]
fn header_extensions_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Nii::new(&[2, 2, 1], 2, 8, vec![9, 8, 7, 6]);
    n.extension = [16i32.to_le_bytes(), 4i32.to_le_bytes(), *b"abcd", *b"efgh"].concat();
    n.vox_offset = 368.0;
    let v = Volume::read(&n.write(&dir.path().join("ext.nii"))).unwrap();
    assert_eq!(v.to_f64().unwrap(), vec![9.0, 8.0, 7.0, 6.0]);
}

#[test]
fn header_and_image_pairs_read_and_a_missing_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = Nii::new(&[2, 2, 1], 2, 8, vec![]);
    n.magic = *b"ni1\0";
    n.vox_offset = 0.0;
    n.write(&dir.path().join("pair.hdr"));
    let err = Volume::read(&dir.path().join("pair.hdr"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("pair.img") && err.contains("missing"), "{err}");
    std::fs::write(dir.path().join("pair.img"), [1u8, 2, 3, 4]).unwrap();
    let v = Volume::read(&dir.path().join("pair.hdr")).unwrap();
    assert_eq!(v.to_f64().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn broken_files_give_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = Nii::new(&[4, 4, 4], 2, 8, (0..64).collect());
    let full = n.bytes();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let check = |p: PathBuf, expect: &str, kind: fn(&NiftiError) -> bool| {
        let e = Volume::read(&p)
            .err()
            .unwrap_or_else(|| panic!("{} read", p.display()));
        let text = e.to_string();
        assert!(kind(&e), "{}: {text}", p.display());
        assert!(
            text.contains(p.file_name().unwrap().to_str().unwrap()),
            "names the file: {text}"
        );
        assert!(text.contains(expect), "{text}");
    };
    check(write("empty.nii", &[]), "empty", |e| {
        matches!(e, NiftiError::NotNifti { .. })
    });
    check(
        write("short.nii", &full[..100]),
        "shorter than a NIfTI-1 header",
        |e| matches!(e, NiftiError::Truncated { .. }),
    );
    check(
        write("cut.nii", &full[..full.len() - 10]),
        "needs 64",
        |e| matches!(e, NiftiError::Truncated { .. }),
    );
    let gz = gzip(&full);
    check(
        write("cut.nii.gz", &gz[..gz.len() / 2]),
        "ends early",
        |e| matches!(e, NiftiError::Truncated { .. }),
    );
    let mut magic = full.clone();
    magic[344..348].copy_from_slice(b"xyz\0");
    check(write("magic.nii", &magic), "not a NIfTI-1 file", |e| {
        matches!(e, NiftiError::NotNifti { .. })
    });
    let mut two = Nii::new(&[4, 4, 4], 2, 8, (0..64).collect());
    two.sizeof_hdr = 540;
    check(write("two.nii", &two.bytes()), "NIfTI-2", |e| {
        matches!(e, NiftiError::Nifti2 { .. })
    });
    let mut past = n.clone();
    past.vox_offset = 352.0;
    let mut bytes = past.header();
    let off = 108;
    bytes[off..off + 4].copy_from_slice(&9999f32.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    check(write("past.nii", &bytes), "past the end", |e| {
        matches!(e, NiftiError::Invalid { .. })
    });
    let mut complex = Nii::new(&[1, 1, 1], 32, 64, vec![0; 8]);
    complex.datatype = 32;
    check(
        write("complex.nii", &complex.bytes()),
        "unsupported NIfTI datatype 32",
        |e| matches!(e, NiftiError::Datatype { .. }),
    );
}

#[test]
fn written_volumes_read_back_with_their_affine_and_spacing() {
    use kpipe::data::nifti::{Datatype, NewVolume, write_volume};
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
    let affine = kpipe::data::phantom::kits_affine([2.5, 0.8, 0.7]);
    let p = dir.path().join("w.nii.gz");
    write_volume(
        &p,
        &NewVolume {
            shape: [2, 3, 4],
            datatype: Datatype::U8,
            data: &data,
            spacing: [2.5, 0.8, 0.7],
            affine,
            description: "t",
        },
    )
    .unwrap();
    let v = Volume::read(&p).unwrap();
    assert_eq!(v.shape, vec![2, 3, 4]);
    assert_eq!(v.spacing(), [2.5, f64::from(0.8f32), f64::from(0.7f32)]);
    assert_eq!(v.affine()[2][0], -2.5);
    assert_eq!(v.affine()[0][2], f64::from(-0.7f32));
    assert_eq!(*v.to_labels().unwrap().0, data);
}

fn shared_sample(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/kits19-sample")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

#[test]
fn real_kits19_segmentations_read_with_the_right_shapes_and_labels() {
    for (name, dtype, rows_cols) in [
        ("case_00061_segmentation.nii.gz", "uint8", [512, 512]),
        ("case_00015_segmentation.nii.gz", "uint16", [512, 512]),
        ("case_00160_segmentation.nii.gz", "uint8", [512, 796]),
    ] {
        let Some(p) = shared_sample(name) else { return };
        let v = Volume::read(&p).unwrap();
        assert_eq!(v.datatype.name(), dtype, "{name}");
        let [_, r, c] = v.shape3().unwrap();
        assert_eq!([r, c], rows_cols, "{name}");
        let (labels, bad) = v.to_labels().unwrap();
        assert!(bad.is_empty(), "{name}");
        assert!(labels.iter().all(|&l| l <= 2));
        assert!(
            labels.contains(&1) && labels.contains(&2),
            "{name}: kidney and tumor present"
        );
        // KiTS19 affine: slice axis to -z
        let a = v.affine();
        assert!((a[2][0] + v.spacing()[0]).abs() < 1e-5, "{name}: {a:?}");
        assert!((a[1][1] + v.spacing()[1]).abs() < 1e-5, "{name}: {a:?}");
    }
    if let Some(p) = shared_sample("case_00160_segmentation.nii.gz") {
        assert_eq!(Volume::read(&p).unwrap().shape3().unwrap(), [252, 512, 796]);
    }
}

/// nibabel's `get_fdata()` of each file, compared bit for bit, where Python has nibabel.
#[test]
fn values_equal_nibabel_get_fdata_bit_for_bit() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import nibabel, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("skipped: python3 with nibabel is not available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let raw: Vec<i16> = (0..60).map(|i| (i * 997 % 4000 - 2000) as i16).collect();
    let mut a = Nii::new(&[3, 4, 5], 4, 16, le(&raw, |v| v.to_le_bytes().to_vec()));
    a.slope = 0.1;
    a.inter = -3.3;
    files.push(a.write(&dir.path().join("scaled.nii")));
    let mut b = a.clone();
    b.big = true;
    b.data = le(&raw, |v| v.to_be_bytes().to_vec());
    files.push(b.write(&dir.path().join("scaled_be.nii")));
    let f: Vec<f32> = (0..60).map(|i| (i as f32).sin() * 1e3).collect();
    let mut c = Nii::new(&[3, 4, 5, 1], 16, 32, le(&f, |v| v.to_le_bytes().to_vec()));
    c.slope = f32::NAN;
    files.push(c.write(&dir.path().join("nan_slope_4d.nii")));
    let mut d = Nii::new(
        &[60, 1, 1],
        768,
        32,
        le(
            &(0..60u32).map(|i| i * 70_000_000).collect::<Vec<_>>(),
            |v| v.to_le_bytes().to_vec(),
        ),
    );
    d.slope = 3.7;
    d.inter = 1.1;
    files.push(d.write(&dir.path().join("u32_scaled.nii")));
    // geometry: neither qform nor sform (the base affine), with the fixes nibabel's
    // header checks make on load (0 and negative pixdim, a bad qfac, unknown codes)
    let geometry = |dims: &[u16], pixdim: [f32; 8], codes: (i16, i16), name: &str| {
        let n: usize = dims.iter().map(|&d| usize::from(d)).product();
        let mut v = Nii::new(dims, 2, 8, (0..n).map(|i| i as u8).collect());
        v.pixdim = pixdim;
        v.codes = Some(codes);
        v.sform = Some([
            [0.5, 0.1, 0.0, -20.0],
            [0.0, 0.7, 0.2, 30.5],
            [0.3, 0.0, 2.5, 7.25],
        ]);
        v.write(&dir.path().join(name))
    };
    files.push(geometry(
        &[3, 5, 7],
        [1.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        (0, 0),
        "base.nii",
    ));
    files.push(geometry(
        &[6, 4, 5],
        [0.0, -2.5, 0.0, 0.7, 1.0, 0.0, 0.0, 0.0],
        (0, 0),
        "base_fixed.nii",
    ));
    files.push(geometry(
        &[6, 4],
        [1.0, 0.9, 1.1, 0.0, 0.0, 0.0, 0.0, 0.0],
        (0, 0),
        "base_2d.nii",
    ));
    files.push(geometry(
        &[6, 4, 5],
        [-1.0, 0.8, 0.9, 2.5, 0.0, 0.0, 0.0, 0.0],
        (1, 0),
        "qform.nii",
    ));
    files.push(geometry(
        &[6, 4, 5],
        [0.5, 0.8, 0.9, 2.5, 0.0, 0.0, 0.0, 0.0],
        (1, 7),
        "qform_bad_codes.nii",
    ));
    files.push(geometry(
        &[6, 4, 5],
        [1.0, 0.8, 0.9, 2.5, 0.0, 0.0, 0.0, 0.0],
        (-1, 2),
        "sform.nii",
    ));
    for name in [
        "case_00015_segmentation.nii.gz",
        "case_00061_segmentation.nii.gz",
        "case_00160_segmentation.nii.gz",
    ] {
        if let Some(p) = shared_sample(name) {
            files.push(p);
        }
    }
    for file in files {
        let out = dir.path().join("nib.npy");
        let geometry_out = dir.path().join("nib_affine.npy");
        let script = format!(
            "import nibabel as nib, numpy as np; i = nib.load(r'{}'); d = i.get_fdata(); np.save(r'{}', np.asfortranarray(d).ravel(order='F')); np.save(r'{}', np.concatenate([i.affine.ravel(), np.asarray(i.header.get_zooms()[:3], dtype=np.float64)]))",
            file.display(),
            out.display(),
            geometry_out.display()
        );
        let st = std::process::Command::new("python3")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(st.success());
        let want: ndarray::Array1<f64> = ndarray_npy::read_npy(&out).unwrap();
        let got = Volume::read(&file).unwrap().to_f64().unwrap();
        assert_eq!(got.len(), want.len());
        let diff = got
            .iter()
            .zip(want.iter())
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        assert_eq!(
            diff,
            0,
            "{}: {diff} values differ from nibabel",
            file.display()
        );
        // the affine (img.affine) and spacing (get_zooms) nibabel gives
        let geometry: ndarray::Array1<f64> = ndarray_npy::read_npy(&geometry_out).unwrap();
        let v = Volume::read(&file).unwrap();
        let ours: Vec<f64> = v.affine().iter().flatten().copied().collect();
        let zooms = v.spacing();
        let n = (v.shape.len()).min(3);
        let want = geometry.to_vec();
        assert_eq!(&want[16..], &zooms[..n], "{}: spacing", file.display());
        for (i, (o, w)) in ours.iter().zip(&want[..16]).enumerate() {
            // the qform's rotation is float64 here, long double in nibabel: an ulp or two
            let tol = 4.0 * f64::EPSILON * w.abs().max(1.0);
            assert!(
                (o - w).abs() <= tol,
                "{}: affine[{}][{}] is {o}, nibabel's {w}\nours {ours:?}\nnibabel {:?}",
                file.display(),
                i / 4,
                i % 4,
                &want[..16]
            );
        }
    }
}

/// A reader given the digest a file had (the slice stage, from `cases.json`) refuses a
/// file that has changed since, naming it.
#[test]
fn a_file_read_against_its_recorded_digest_must_still_have_it() {
    use kpipe::data::nifti::ReadBuffers;
    let dir = tempfile::tempdir().unwrap();
    let v = Nii::new(&[3, 4, 5], 2, 8, vec![7; 60]);
    let path = v.write(&dir.path().join("v.nii"));
    let digest = kpipe::cache::file_digest(&path).unwrap();
    let mut bufs = ReadBuffers::default();
    let read = Volume::read_checked(&path, &mut bufs, Some(&digest)).unwrap();
    assert_eq!(read.shape, vec![3, 4, 5]);
    let mut changed = v.clone();
    changed.data[59] = 8;
    changed.write(&path);
    match Volume::read_checked(&path, &mut bufs, Some(&digest)) {
        Err(e @ NiftiError::Changed { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("v.nii` has changed since it was loaded"),
                "{msg}"
            );
            assert!(msg.contains(&digest[..12]), "{msg}");
        }
        other => panic!(
            "expected a changed-file error, got {:?}",
            other.map(|v| v.shape)
        ),
    }
}

/// nibabel's `shape_zoom_affine` docstring example: a header with neither qform nor
/// sform, shape (3, 5, 7), pixdim (3, 2, 1).
#[test]
fn without_qform_or_sform_the_affine_is_nibabels_base_affine() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Nii::new(&[3, 5, 7], 2, 8, vec![0; 105]);
    v.pixdim = [1.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    let v = Volume::read(&v.write(&dir.path().join("base.nii"))).unwrap();
    assert_eq!(
        v.affine(),
        [
            [-3.0, 0.0, 0.0, 3.0],
            [0.0, 2.0, 0.0, -4.0],
            [0.0, 0.0, 1.0, -3.0],
            [0.0, 0.0, 0.0, 1.0]
        ]
    );
}

/// A file written with another's geometry reads back with exactly its header fields:
/// what `predict` does with its input's header (qform only, sform only, neither).
#[test]
fn geometry_copied_from_a_header_is_written_unchanged() {
    use kpipe::data::nifti::{Datatype, Geometry, NewVolume, write_volume_with};
    let dir = tempfile::tempdir().unwrap();
    let mut sources = Vec::new();
    let mut none = Nii::new(&[3, 5, 7], 2, 8, vec![0; 105]);
    none.pixdim = [0.0, -3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    sources.push(none.write(&dir.path().join("none.nii")));
    for name in [
        "case_00015_segmentation.nii.gz",
        "case_00061_segmentation.nii.gz",
    ] {
        if let Some(p) = shared_sample(name) {
            sources.push(p);
        }
    }
    for src in sources {
        let v = Volume::read(&src).unwrap();
        let shape = v.shape3().unwrap();
        let data = vec![1u8; shape.iter().product()];
        let out = dir.path().join("out.nii.gz");
        write_volume_with(
            &out,
            &NewVolume {
                shape,
                datatype: Datatype::U8,
                data: &data,
                spacing: [9.0; 3],
                affine: [[9.0; 4]; 3],
                description: "copy",
            },
            &Geometry::of(&v.header),
        )
        .unwrap();
        let w = Volume::read(&out).unwrap();
        assert_eq!(
            Geometry::of(&w.header),
            Geometry::of(&v.header),
            "{}",
            src.display()
        );
        assert_eq!(w.affine(), v.affine(), "{}", src.display());
        assert_eq!(w.spacing(), v.spacing(), "{}", src.display());
    }
}
