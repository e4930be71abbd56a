//! `kpipe score`: the official KiTS19 evaluation of two label volumes, or of every case of
//! a truth folder against a folder of predictions.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::args::ScoreArgs;
use super::util::{print_flat, print_json};
use super::{CliError, exit, usage};
use crate::metrics::kits::ScoreError;

/// Scores each pair; with several, their means and the KiTS19 score too.
pub(super) fn run(args: &ScoreArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let pairs: Vec<(String, PathBuf, PathBuf)> =
        match (&args.truth, &args.pred, &args.truth_dir, &args.pred_dir) {
            (Some(t), Some(p), _, _) => vec![(t.display().to_string(), t.clone(), p.clone())],
            (_, _, Some(td), Some(pd)) => score_pairs(td, pd)?,
            _ => {
                return Err(usage(
                    "give --truth and --pred, or --truth-dir and --pred-dir",
                ));
            }
        };
    let mut results = serde_json::Map::new();
    let (mut kt, mut tu) = (Vec::new(), Vec::new());
    for (name, t, p) in &pairs {
        let s =
            crate::metrics::kits::score_files(t, p, args.label_policy).map_err(|e| match e {
                ScoreError::Nifti(n) => CliError::Nifti(n),
                error => CliError::Score {
                    name: name.clone(),
                    error,
                },
            })?;
        kt.push(s.kidney_tumor_dice);
        tu.push(s.tumor_dice);
        results.insert(name.clone(), serde_json::to_value(&s).unwrap_or_default());
    }
    let mean = |v: &[f64]| crate::metrics::nan_mean(v.iter().copied());
    let scores = if pairs.len() == 1 {
        results
            .into_iter()
            .next()
            .map(|(_, v)| v)
            .unwrap_or_default()
    } else {
        serde_json::json!({"cases": results, "kidney_tumor_dice": mean(&kt), "tumor_dice": mean(&tu), "score": mean(&[mean(&kt), mean(&tu)])})
    };
    if args.json {
        print_json(out, &scores)?;
    } else {
        print_flat(out, "", &scores)?;
    }
    Ok(exit::OK)
}

/// (case, truth, prediction) of every case of a truth folder with a prediction.
fn score_pairs(
    truth_dir: &Path,
    pred_dir: &Path,
) -> Result<Vec<(String, PathBuf, PathBuf)>, CliError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(truth_dir)
        .map_err(|e| usage(format!("cannot read `{}`: {e}", truth_dir.display())))?;
    let mut cases: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("case_"))
        .collect();
    cases.sort();
    for case in cases {
        let truth = truth_dir.join(&case).join("segmentation.nii.gz");
        let pred = [
            pred_dir.join(format!("{}.nii.gz", case.replace("case_", "prediction_"))),
            pred_dir.join(format!("{case}.nii.gz")),
            pred_dir.join(&case).join("prediction.nii.gz"),
            pred_dir.join(&case).join("segmentation.nii.gz"),
        ]
        .into_iter()
        .find(|p| p.exists());
        match (truth.exists(), pred) {
            (true, Some(p)) => out.push((case, truth, p)),
            (true, None) => {
                return Err(usage(format!(
                    "no prediction for `{case}` in `{}`",
                    pred_dir.display()
                )));
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(usage(format!(
            "no cases with a segmentation in `{}`",
            truth_dir.display()
        )));
    }
    Ok(out)
}
