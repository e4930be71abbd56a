//! The study's machinery end to end on a tiny synthetic set: a learning-rate sweep, its
//! comparison, evaluation, the report, `metrics`, `report` and `verify`.

use crate::common::{self, Project, ran};
use kpipe::data::nifti::Volume;

fn sweep_pipeline() -> String {
    common::small_data_pipeline("mini-study", 7)
        + &common::train_stage(
            "train",
            4,
            "epochs = 2\nbatch-size = 4\nbatch-norm = true\n",
        )
        + r#"
[stages.train.sweep]
learning-rate = [1e-2, 1e-5]
select = { metric = "val-loss", mode = "min" }

[stages.evaluate]
kind = "evaluate"
model = "train.best"
cases = "load"
slices = "slice"
part = "split.eval"
write-predictions = true

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
        csv.starts_with("rank,arm,learning_rate,val_loss_kept_epoch,kept_epoch,"),
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

/// A sweep of a small train stage: `sweep` holds the axes (and `select`), `extra` more
/// train keys, `after` more stages.
fn arms_pipeline(extra: &str, sweep: &str, after: &str) -> String {
    common::small_data_pipeline("arms", 11)
        + &common::train_stage(
            "train",
            4,
            "batch-size = 4\nbatch-norm = true\nlearning-rate = 1e-2\n",
        )
        + &format!(
            r#"{extra}
[stages.train.sweep]
{sweep}
{after}"#
        )
}

/// The metrics rows (without the header) of every train artifact, by arm id.
fn arm_rows(p: &Project) -> std::collections::BTreeMap<String, Vec<String>> {
    let sweep = kpipe::stages::sweep::SweepFile::read(&p.output_with("sweep.json")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for e in p.entries() {
        let m = e.join("out/metrics.csv");
        if !m.exists() {
            continue;
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.join("manifest.json")).unwrap())
                .unwrap();
        let id = manifest["stage"].as_str().unwrap_or_default().to_string();
        assert!(sweep.arms.iter().any(|a| a.id == id), "{id}: {manifest}");
        let text = std::fs::read_to_string(m).unwrap();
        out.insert(id, text.lines().skip(1).map(str::to_string).collect());
    }
    out
}

#[test]
fn paired_arms_start_alike_and_see_the_same_batches() {
    // arms that differ only in `epochs` at a constant rate, with augmentation: same seed,
    // so the same initial weights, data order and draws, and so the same first epoch
    let p = Project::new();
    p.write(
        "p.toml",
        &arms_pipeline(
            "augment = { flip-horizontal = 0.5, flip-vertical = 0.5, brightness = 0.1 }\n",
            "epochs = [1, 2]\n",
            "",
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let rows = arm_rows(&p);
    let one = &rows["train[epochs=1]"];
    let two = &rows["train[epochs=2]"];
    assert_eq!((one.len(), two.len()), (1, 2));
    assert_eq!(one[0], two[0], "epoch 1 of both arms");
}

#[test]
fn replicates_give_mean_and_sd_per_setting_and_select_by_the_mean() {
    let p = Project::new();
    p.write(
        "p.toml",
        &arms_pipeline(
            "epochs = 1\n",
            "learning-rate = [1e-2, 1e-5]\nseed = [1, 2]\n",
            "",
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let sweep = kpipe::stages::sweep::SweepFile::read(&p.output_with("sweep.json")).unwrap();
    assert_eq!(sweep.arms.len(), 4);
    assert_eq!(sweep.settings.len(), 2, "two learning rates");
    for s in &sweep.settings {
        assert_eq!(s.n, 2);
        let values: Vec<f64> = s
            .arms
            .iter()
            .map(|id| sweep.arms.iter().find(|a| &a.id == id).unwrap().best)
            .collect();
        assert_ne!(values[0], values[1], "seeds 1 and 2 differ: {values:?}");
        assert!((s.best.mean - (values[0] + values[1]) / 2.0).abs() < 1e-12);
        let sd = (values[0] - values[1]).abs() / 2f64.sqrt();
        assert!((s.best.sd - sd).abs() < 1e-12, "{} vs {sd}", s.best.sd);
    }
    // max val-iou: the better mean is ranked and selected first
    assert!(sweep.settings[0].best.mean >= sweep.settings[1].best.mean);
    assert!(sweep.settings[0].selected && !sweep.settings[1].selected);
    let chosen = sweep.arms.iter().find(|a| a.selected).unwrap();
    assert_eq!(chosen.id, sweep.settings[0].arms[0]);
    let dir = p.output_with("arms.md");
    let md = std::fs::read_to_string(dir.join("comparison.md")).unwrap();
    assert_eq!(md.lines().count(), 4, "a row per setting: {md}");
    assert!(md.contains(" ± ") && md.contains("| 2 |"), "{md}");
    let arms = std::fs::read_to_string(dir.join("arms.md")).unwrap();
    assert_eq!(arms.lines().count(), 6, "a row per arm: {arms}");
}

#[test]
fn the_handed_on_weights_are_the_ones_the_table_ranks() {
    // a rule that favours an early epoch (lowest validation IoU), so the kept epoch is
    // not the last; an evaluate stage on the validation part recomputes the number
    let p = Project::new();
    p.write(
        "p.toml",
        &arms_pipeline(
            "epochs = 3\n",
            "learning-rate = [1e-2, 3e-3]\nselect = { metric = \"val-iou\", mode = \"min\" }\n",
            r#"
[stages.check]
kind = "evaluate"
model = "train.best"
cases = "load"
slices = "slice"
part = "split.test"
batch-size = 4
"#,
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let sweep_dir = p.output_with("sweep.json");
    let sweep = kpipe::stages::sweep::SweepFile::read(&sweep_dir).unwrap();
    let chosen = sweep.arms.iter().find(|a| a.selected).unwrap();
    assert!(
        chosen.best_epoch < chosen.epochs,
        "the setup must keep an earlier epoch: {chosen:?}"
    );
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sweep_dir.join("best/model.json")).unwrap())
            .unwrap();
    assert_eq!(model["kept"]["epoch"], chosen.best_epoch);
    assert_eq!(model["kept"]["keep"], "best");
    let best = sweep_dir.join("best");
    assert_ne!(
        std::fs::read(best.join("model.safetensors")).unwrap(),
        std::fs::read(best.join("last.safetensors")).unwrap(),
        "the kept and the last weights differ"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output_with("summary.json").join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["part"], "split.test");
    let recomputed = summary["study_iou"].as_f64().unwrap();
    assert!(
        (recomputed - chosen.best).abs() < 1e-12,
        "evaluate {recomputed} vs table {}",
        chosen.best
    );
}

#[test]
fn evaluate_scores_whole_volumes_as_predict_and_score_do() {
    let p = Project::new();
    p.write("p.toml", &sweep_pipeline());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let eval = p.output_with("per_case.csv");
    let data = p.output_with("cases.json").join("data");
    let csv = std::fs::read_to_string(eval.join("per_case.csv")).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("summary.json")).unwrap()).unwrap();
    assert!(
        summary["kits"]["evaluation"]
            .as_str()
            .unwrap()
            .starts_with("official KiTS19"),
        "{summary}"
    );
    let mut n = 0;
    for line in csv.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let case = cols[0];
        let volume = Volume::read(&data.join(case).join("imaging.nii.gz")).unwrap();
        assert_eq!(
            cols[1].parse::<usize>().unwrap(),
            volume.shape3().unwrap()[0],
            "every slice of the volume is scored"
        );
        let pred = format!("pred/{}.nii.gz", case.replace("case_", "prediction_"));
        let (code, _, err) = p.run(&[
            "predict",
            "--model",
            "p.toml:train.best",
            data.join(case).join("imaging.nii.gz").to_str().unwrap(),
            "-o",
            &pred,
            "--batch-size",
            "8",
        ]);
        assert_eq!(code, 0, "{err}");
        // the evaluate stage's written prediction is the same volume, byte for byte
        let written = eval
            .join("predictions")
            .join(pred.trim_start_matches("pred/"));
        assert_eq!(
            Volume::read(&written).unwrap().to_f64().unwrap(),
            Volume::read(&p.path().join(&pred))
                .unwrap()
                .to_f64()
                .unwrap()
        );
        let (code, out, err) = p.run(&[
            "score",
            "--truth",
            data.join(case)
                .join("segmentation.nii.gz")
                .to_str()
                .unwrap(),
            "--pred",
            &pred,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        for (col, key) in [(2, "kidney_tumor_dice"), (3, "tumor_dice")] {
            match s[key].as_f64() {
                Some(v) => assert!(
                    (cols[col].parse::<f64>().unwrap() - v).abs() < 1e-9,
                    "{case} {key}: evaluate {} vs score {v}",
                    cols[col]
                ),
                None => assert_eq!(cols[col], "", "{case} {key}"),
            }
        }
        n += 1;
    }
    assert!(n > 0, "{csv}");
}

#[test]
fn the_arms_of_a_sweep_run_at_once_one_per_device_with_the_same_results() {
    // four arms on four devices (the CPU backend: the device indices are fake, the cores
    // shared), against one device: the same lock file, bit for bit
    let pipeline = common::small_data_pipeline("devices", 3)
        + &common::train_stage("train", 4, "epochs = 1\nbatch-size = 4\n")
        + "\n[stages.train.sweep]\nlearning-rate = [1e-2, 1e-3, 1e-4, 1e-5]\n";
    let (one, four) = (Project::new(), Project::new());
    one.write("d.toml", &pipeline);
    four.write("d.toml", &pipeline);
    let (code, _, err) = one.run(&["--no-progress", "run", "d.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains(": device "),
        "one device: no placement lines: {err}"
    );
    let (code, _, err) = four.run(&["--no-progress", "run", "d.toml", "--devices", "4"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let first_done = lines
        .iter()
        .position(|l| l.trim_start().starts_with("ran  train["))
        .unwrap();
    let mut placed: Vec<&str> = lines[..first_done]
        .iter()
        .filter_map(|l| l.split(": device ").nth(1))
        .collect();
    placed.sort_unstable();
    assert_eq!(
        placed,
        ["0", "1", "2", "3"],
        "all four started before one ended: {err}"
    );
    let lock = |p: &Project| std::fs::read_to_string(p.path().join("d.lock")).unwrap();
    assert_eq!(lock(&one), lock(&four));
}
