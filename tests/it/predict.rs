//! `kpipe predict`: a trained model segments NIfTI volumes, writing labels with the input's
//! shape and header geometry (affine, spacing, codes), that score well above an empty
//! prediction.

use crate::common;

use kpipe::data::nifti::Volume;

fn pipe() -> String {
    common::data_pipeline(
        "predict",
        4,
        7,
        [24, 64, 64],
        64,
        "keep-empty = 0.2\n",
        "ratios = [0.6, 0.2, 0.2]\n",
    ) + &common::train_stage(
        "train",
        8,
        "epochs = 10\nbatch-size = 4\nlearning-rate = 2e-3\nbatch-norm = true\n",
    )
}

#[test]
fn predictions_keep_the_geometry_and_find_the_kidneys() {
    let p = common::Project::new();
    p.write("p.toml", &pipe());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let entries: Vec<_> = p.entries().into_iter().map(|e| e.join("out")).collect();
    let model = entries
        .iter()
        .find(|o| o.join("model.safetensors").exists())
        .unwrap();
    let data = entries
        .iter()
        .find(|o| o.join("data").exists())
        .unwrap()
        .join("data");
    // the model named as a node of the pipeline's latest run
    let (code, out, err) = p.run(&[
        "predict",
        "--model",
        "p.toml:train",
        data.to_str().unwrap(),
        "-o",
        "pred",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 7, "{out}");
    // ... is the same model as the artifact directory
    let one = data.join("case_00005/imaging.nii.gz");
    let (code, _, err) = p.run(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        one.to_str().unwrap(),
        "-o",
        "one.nii.gz",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(p.path().join("one.nii.gz")).unwrap(),
        std::fs::read(p.path().join("pred/prediction_00005.nii.gz")).unwrap()
    );
    // a node that is not there is a usage error listing the models
    let (code, _, err) = p.run(&["predict", "--model", "p.toml:trian", "x.nii.gz", "-o", "y"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no node `trian`") && err.contains("\nhint: models there: train"),
        "{err}"
    );
    // exit codes: a volume that is not there is a bad argument (2); one that is not NIfTI,
    // or a model whose weights are broken, is a failure while working (1)
    let model_dir = model.to_str().unwrap();
    let (code, _, err) = p.run(&["predict", "--model", model_dir, "absent.nii.gz", "-o", "z"]);
    assert_eq!(code, 2, "{err}");
    p.write(
        "junk.nii.gz",
        "not a volume at all, but long enough to hold a header",
    );
    let (code, _, err) = p.run(&["predict", "--model", model_dir, "junk.nii.gz", "-o", "z"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("junk.nii.gz"), "{err}");
    let broken = p.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(model.join("model.json"), broken.join("model.json")).unwrap();
    std::fs::write(
        broken.join("model.safetensors"),
        b"\x08\0\0\0\0\0\0\0{}garbage",
    )
    .unwrap();
    let one_path = one.to_str().unwrap();
    let (code, _, err) = p.run(&["predict", "--model", "broken", one_path, "-o", "z.nii.gz"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    let input = Volume::read(&data.join("case_00005/imaging.nii.gz")).unwrap();
    let pred = Volume::read(&p.path().join("pred/prediction_00005.nii.gz")).unwrap();
    assert_eq!(pred.shape, input.shape);
    assert_eq!(pred.affine(), input.affine());
    // the input header's geometry fields, unchanged (qform, sform, codes, pixdim)
    assert_eq!(
        kpipe::data::nifti::Geometry::of(&pred.header),
        kpipe::data::nifti::Geometry::of(&input.header)
    );
    assert_eq!(pred.spacing(), input.spacing());
    assert_eq!(pred.datatype.name(), "uint8");
    // score the folder: better than an empty prediction (kidney+tumor Dice 0)
    let (code, out, err) = p.run(&[
        "score",
        "--truth-dir",
        data.to_str().unwrap(),
        "--pred-dir",
        "pred",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dice = v["kidney_tumor_dice"].as_f64().unwrap();
    assert!(dice > 0.3, "kidney+tumor Dice {dice}: {out}");
}
