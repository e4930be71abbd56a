//! NIfTI reading on the real KiTS19 samples in ../shared (skipped when absent), against
//! nibabel itself (where Python has it), digests and geometry.

use std::path::{Path, PathBuf};

use kpipe::data::nifti::{NiftiError, Volume};

use crate::nii::{Nii, le};

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
