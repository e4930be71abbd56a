//! NIfTI reading against files the tests write byte by byte (nibabel-style variants), the
//! real KiTS19 samples in ../shared (skipped when absent), and nibabel itself (where
//! Python has it).

use std::path::PathBuf;

use kpipe::data::nifti::{NiftiError, Volume};

use crate::nii::{Nii, gzip, le};

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
