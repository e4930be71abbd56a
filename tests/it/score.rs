//! `kpipe score` against values computed independently (numpy) on the real KiTS19 sample
//! and a derived prediction in ../shared (skipped when absent), and its label policies.

use crate::common;

use kpipe::data::nifti::{Datatype, NewVolume, write_volume};

#[test]
fn score_matches_an_independent_computation_on_a_real_case() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kits19-sample");
    let (truth, pred) = (
        shared.join("case_00061_segmentation.nii.gz"),
        shared.join("derived/case_00061_pred_shifted.nii.gz"),
    );
    if !truth.exists() || !pred.exists() {
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let p = common::Project::new();
    let (code, out, err) = p.run(&[
        "score",
        "--truth",
        truth.to_str().unwrap(),
        "--pred",
        pred.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // numpy: 2|A∩B|/(|A|+|B|) on label > 0 and > 1; per-slice mean IoU over present classes
    let close = |key: &serde_json::Value, want: f64| (key.as_f64().unwrap() - want).abs() < 1e-12;
    assert!(close(&v["kidney_tumor_dice"], 0.8782910361952558), "{out}");
    assert!(close(&v["tumor_dice"], 0.47351585522504597), "{out}");
    assert!(
        close(&v["slice_mean_iou"]["all"], 0.597357648554519),
        "{out}"
    );
    assert!(
        close(&v["slice_mean_iou"]["nonempty"], 0.5829775645743231),
        "{out}"
    );
    assert!(
        close(&v["slice_mean_iou"]["truth_fg"], 0.5958143350538986),
        "{out}"
    );
}

fn write(path: &std::path::Path, shape: [usize; 3], datatype: Datatype, data: &[u8]) {
    let affine = kpipe::data::phantom::kits_affine([1.0, 1.0, 1.0]);
    write_volume(
        path,
        &NewVolume {
            shape,
            datatype,
            data,
            spacing: [1.0, 1.0, 1.0],
            affine,
            description: "",
        },
    )
    .unwrap();
}

#[test]
fn label_policies_float_rounding_and_shape_mismatches() {
    let p = common::Project::new();
    write(
        &p.path().join("t.nii"),
        [1, 2, 2],
        Datatype::U8,
        &[0, 1, 2, 2],
    );
    write(
        &p.path().join("three.nii"),
        [1, 2, 2],
        Datatype::U8,
        &[0, 1, 3, 3],
    );
    let floats: Vec<u8> = [0.4f32, 0.5, 1.5, 2.5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write(&p.path().join("f.nii"), [1, 2, 2], Datatype::F32, &floats);
    write(
        &p.path().join("small.nii"),
        [1, 2, 1],
        Datatype::U8,
        &[0, 1],
    );
    let score = |pred: &str, extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["score", "--truth", "t.nii", "--pred", pred, "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = p.run(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    // starter: 3 is tumor -> perfect; rules: 3 is background -> tumor missed
    assert_eq!(score("three.nii", &[])["tumor_dice"], 1.0);
    assert_eq!(
        score("three.nii", &["--label-policy", "rules"])["tumor_dice"],
        0.0
    );
    // 0.4 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even): kidney missed, tumor found
    let f = score("f.nii", &[]);
    assert_eq!(f["iou"][1], 0.0);
    assert_eq!(f["tumor_dice"], 1.0, "{f}");
    assert!(
        (f["kidney_tumor_dice"].as_f64().unwrap() - 0.8).abs() < 1e-12,
        "{f}"
    );
    let (code, _, err) = p.run(&["score", "--truth", "t.nii", "--pred", "small.nii"]);
    // volumes that do not fit each other: a failure while working, not a bad argument
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("shapes differ"), "{err}");
}
