//! The study's machinery end to end on a tiny synthetic set: a learning-rate sweep, its
//! comparison, evaluation, the report, `metrics`, `report` and `verify`.

mod common;

use common::{Project, ran};

fn sweep_pipeline() -> String {
    common::data_pipeline(
        "mini-study",
        7,
        5,
        [16, 32, 32],
        32,
        "keep-empty = 0.3\n",
        "ratios = [0.6, 0.2, 0.2]\n",
    ) + r#"
[stages.train]
kind = "train"
slices = "slice"
train = "split.train"
validate = "split.test"
base = 4
epochs = 2
batch-size = 4
batch-norm = true

[stages.train.sweep]
learning-rate = [1e-2, 1e-5]
select = { metric = "val-loss", mode = "min" }

[stages.evaluate]
kind = "evaluate"
model = "train.best"
slices = "slice"
part = "split.eval"

[stages.report]
kind = "report"
inputs = ["train", "evaluate"]
title = "mini study"
"#
}

#[test]
fn a_sweep_trains_each_arm_once_ranks_them_and_reports() {
    let p = Project::new();
    p.write("p.toml", &sweep_pipeline());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ran(&err),
        [
            "evaluate",
            "load",
            "report",
            "slice",
            "split",
            "train",
            "train[learning-rate=1e-2]",
            "train[learning-rate=1e-5]"
        ]
    );
    let sweep = kpipe::stages::sweep::SweepFile::read(&p.output_with("sweep.json")).unwrap();
    assert_eq!(sweep.arms.len(), 2);
    assert!(sweep.arms[0].selected && !sweep.arms[1].selected);
    assert!(
        sweep.arms[0].best <= sweep.arms[1].best,
        "ranked by min val-loss: {:?}",
        sweep.arms.iter().map(|a| a.best).collect::<Vec<_>>()
    );
    let dir = p.output_with("comparison.md");
    let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
    let rows: Vec<&str> = md.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{md}");
    assert!(
        rows[0].starts_with(&format!("| 1 | {} |", sweep.arms[0].id))
            && rows[0].contains("**selected**")
            && !rows[1].contains("**selected**"),
        "{md}"
    );
    let csv = std::fs::read_to_string(dir.join("comparison.csv")).unwrap();
    assert!(
        csv.starts_with("rank,arm,learning_rate,best_val_loss,best_epoch,"),
        "{csv}"
    );
    assert!(
        !csv.contains("wall"),
        "a clock stays out of the digest: {csv}"
    );
    // the wall-time copy, outside the digest, has one time per arm
    let timed = std::fs::read_to_string(dir.join("volatile/comparison.csv")).unwrap();
    let header: Vec<&str> = timed.lines().next().unwrap().split(',').collect();
    assert_eq!(header.last(), Some(&"wall_time_s"), "{timed}");
    for row in timed.lines().skip(1) {
        let secs: f64 = row.rsplit(',').next().unwrap().parse().unwrap();
        assert!(secs > 0.0, "{timed}");
    }
    // the selected arm's artifact is `train.best`
    assert!(
        p.output_with("sweep.json")
            .join("best/model.safetensors")
            .exists()
    );

    // a third arm trains only that arm; the rest is cached or cut off by equal outputs
    p.write(
        "p.toml",
        &sweep_pipeline().replace(
            "learning-rate = [1e-2, 1e-5]",
            "learning-rate = [1e-2, 1e-5, 3e-3]",
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let trained: Vec<String> = ran(&err)
        .into_iter()
        .filter(|id| id.starts_with("train["))
        .collect();
    assert_eq!(trained, ["train[learning-rate=3e-3]"]);
    assert!(
        ran(&err).contains(&"train".to_string()),
        "the comparison is redone"
    );
    // removing an arm retrains nothing
    p.write(
        "p.toml",
        &sweep_pipeline().replace("learning-rate = [1e-2, 1e-5]", "learning-rate = [1e-2]"),
    );
    let (_, _, err) = p.run(&["run", "p.toml"]);
    assert!(
        ran(&err).iter().all(|id| !id.starts_with("train[")),
        "{err}"
    );
}

#[test]
fn evaluation_report_metrics_and_verify() {
    let p = Project::new();
    p.write("p.toml", &sweep_pipeline());
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    let eval = p.output_with("summary.json");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json")).unwrap()).unwrap();
    for key in [
        "study_iou",
        "study_iou_present",
        "fg_iou",
        "class_iou",
        "class_dice",
        "kits",
    ] {
        assert!(summary.get(key).is_some(), "{key}: {summary}");
    }
    let iou = summary["study_iou"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&iou));
    let per_case = std::fs::read_to_string(eval.join("per_case.csv")).unwrap();
    assert_eq!(per_case.lines().count(), 2, "one eval case: {per_case}");

    let report = p.output_with("report.html");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    for needle in [
        "Validation IoU per epoch",
        "data:image/png;base64,",
        "class=\"sel\"",
        "KiTS19 kidney+tumor Dice",
        "Provenance",
        "train[learning-rate=1e-2]",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    for png in ["val_iou.png", "loss.png", "examples.png"] {
        let bytes = std::fs::read(report.join("figures").join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }

    let (code, out, _) = p.run(&["report", "p.toml"]);
    assert_eq!(code, 0);
    assert!(out.contains("report.html"), "{out}");
    let (code, out, _) = p.run(&["metrics", "p.toml", "--json"]);
    assert_eq!(code, 0);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(m["evaluate"]["study_iou"].is_number(), "{out}");
    let arms = m["train"]["arms"].as_object().unwrap();
    assert_eq!(arms.len(), 2);
    assert!(
        arms.values()
            .all(|a| a["wall_time_s"].as_f64().is_some_and(|s| s > 0.0)),
        "{out}"
    );

    let (code, out, err) = p.run(&["verify", "p.toml"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("8 nodes: 8 match, 0 mismatch"), "{out}");
    // a lock file that disagrees is a mismatch: exit 3
    let lock_path = p.path().join("p.lock");
    let mut lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lock_path).unwrap()).unwrap();
    lock["nodes"]["split"]["output"] = serde_json::json!("0".repeat(64));
    std::fs::write(&lock_path, serde_json::to_string(&lock).unwrap()).unwrap();
    let (code, out, _) = p.run(&["verify", "p.toml"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("MISMATCH"), "{out}");
    let (code, out, _) = p.run(&["verify", "--cache"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 corrupt"), "{out}");
}
