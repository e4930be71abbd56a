//! `kind = "evaluate"`: score a trained model on a split part.
//!
//! ```toml
//! [stages.evaluate]
//! kind = "evaluate"
//! model = "train.best"     # a train stage, or a sweep's selected arm
//! cases = "load"           # the case table: the whole volumes to segment and score
//! slices = "slice"
//! part = "split.eval"
//! batch-size = 8
//! examples = 6             # eval slices with the most foreground, kept for the report
//! write-predictions = false  # true: `predictions/prediction_XXXXX.nii.gz` per case
//! backend = "cpu"          # or "gpu"
//! precision = "f32"        # GPU only: or "flex32", "f16"
//! ```
//!
//! Two evaluations, each saying what it is:
//! - **The official KiTS19 evaluation, per case, on whole volumes** (`kits` in
//!   `summary.json`, `per_case.csv`): every axial slice of each case of the part (all of
//!   them, whatever the slice stage kept) is segmented as `kpipe predict` does, brought
//!   back to the case's original size and geometry, and scored with the code of
//!   `kpipe score`: kidney+tumor Dice (label > 0), tumor Dice (label > 1; NaN when both
//!   masks are empty, skipped in the means), their per-case means, and the challenge
//!   score (the mean of the two means).
//! - **The study's slice metrics** (the top-level fields of `summary.json`): on the slice
//!   store's slices of the part (the slices the slice stage kept, at its size), as
//!   training validates: per slice, IoU of the 3 classes averaged, absent classes
//!   counting 1, then averaged over slices; beside it the same over classes present
//!   only, over slices whose truth shows kidney or tumor, and per-class IoU and Dice
//!   pooled over pixels. Run on a train stage's validation part, these equal the epoch's
//!   row of its `metrics.csv`.
//!
//! Output: `summary.json`, `per_case.csv`, `examples/` (image, truth and prediction), and
//! with `write-predictions`, `predictions/` (uint8 label NIfTI with each case's geometry).

use ndarray::{Array3, s};
use serde::{Deserialize, Serialize};

use super::{CheckContext, Inputs, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::backend::{self, BackendKind, Precision};
use crate::data::kits::{self, CaseTable};
use crate::data::loader::{batch, slices_of};
use crate::data::nifti::{ReadBuffers, Volume};
use crate::data::slices::SliceStore;
use crate::metrics::kits::{LabelPolicy, labels_of, score};
use crate::metrics::{ScoreSummary, SliceScores, nan_mean};
use crate::models::ModelFile;
use crate::predict::{segment, write_labels};
use crate::train::{load_network, predict_labels};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Evaluate {
    pub model: StageRef,
    /// The load stage whose volumes are scored whole.
    pub cases: StageRef,
    pub slices: StageRef,
    pub part: StageRef,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_examples")]
    pub examples: usize,
    #[serde(default)]
    pub write_predictions: bool,
    #[serde(default)]
    pub backend: BackendKind,
    /// The GPU backend's float precision ("f32", "flex32", "f16"); the CPU computes in f32.
    #[serde(default)]
    pub precision: Precision,
    /// Cross-validation fold of a `folds = k` split (`split.test` is fold i).
    #[serde(default)]
    pub fold: Option<usize>,
}

fn default_batch() -> usize {
    8
}
fn default_examples() -> usize {
    6
}

/// The official KiTS19 scores of one case (Dice NaN when both masks are empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseScore {
    pub case: String,
    /// Axial slices of the whole volume, all scored.
    pub slices: usize,
    pub kidney_tumor_dice: f64,
    pub tumor_dice: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KitsSummary {
    /// What these numbers are.
    pub evaluation: String,
    pub cases: usize,
    pub kidney_tumor_dice: f64,
    pub tumor_dice: f64,
    /// Mean of the two: the KiTS19 challenge score.
    pub score: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluationSummary {
    pub part: String,
    #[serde(flatten)]
    pub slices: ScoreSummary,
    pub kits: KitsSummary,
}

/// An evaluation slice kept for the report.
pub struct Example {
    foreground: usize,
    case: String,
    row: usize,
    image: Vec<f32>,
    truth: Vec<u8>,
    pred: Vec<u8>,
}

impl Evaluate {
    pub const SUMMARY: &'static str = "summary.json";
    /// What the `kits` numbers are, as `summary.json` says.
    pub const OFFICIAL: &'static str = "official KiTS19 evaluation: per case, every axial slice of the whole volume at its original size, kidney+tumor Dice (label > 0) and tumor Dice (label > 1), averaged over cases";
}

impl Stage for Evaluate {
    const KIND: &'static str = "evaluate";

    fn backend(&self) -> Option<BackendKind> {
        Some(self.backend)
    }

    fn key_params(&self) -> serde_json::Value {
        super::omit_unset(
            serde_json::to_value(self).unwrap_or_default(),
            &[
                ("fold", serde_json::Value::Null),
                ("precision", serde_json::json!("f32")),
            ],
        )
    }

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if self.part.port().is_none() {
            issues.push(ParamIssue::new(
                "part",
                format!("reference a split part, like `{}.eval`", self.part.stage()),
            ));
        }
        if self.cases.port().is_some() {
            issues.push(ParamIssue::new(
                "cases",
                format!(
                    "reference the load stage itself, like `{}`",
                    self.cases.stage()
                ),
            ));
        }
        if self.batch_size == 0 {
            issues.push(ParamIssue::new("batch-size", "must be at least 1"));
        }
        if let Some(why) = self.precision.unsupported_on(self.backend) {
            issues.push(ParamIssue::new("precision", why));
        }
        issues
    }

    fn check_inputs(&self, input: &Inputs<'_>) -> Vec<ParamIssue> {
        super::split::check_fold(self.fold, &self.part, input)
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        vec![
            ("model".into(), &self.model),
            ("cases".into(), &self.cases),
            ("slices".into(), &self.slices),
            ("part".into(), &self.part),
        ]
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let store = SliceStore::open(ctx.input(&self.slices)?).map_err(StageError::other)?;
        let cases_dir = ctx.input(&self.cases)?;
        let table = CaseTable::read(cases_dir).map_err(StageError::other)?;
        let data = table
            .data_dir(cases_dir, ctx.data_root(&self.cases))
            .map_err(StageError::other)?;
        let cases = super::split::SplitFile::read(ctx.input(&self.part)?)?
            .cases(&self.part, "eval", self.fold)?;
        if cases.is_empty() {
            return Err(StageError::Failed(format!("`{}` has no cases", self.part)));
        }
        let device = backend::device(self.backend, ctx.device, self.precision)
            .map_err(StageError::Advised)?;
        let (net, file) =
            load_network(&ctx.input_dir(&self.model)?, &device).map_err(StageError::other)?;
        check_compatible(&file, &store)?;
        let policy = match table.label_policy {
            kits::LabelPolicy::Error => LabelPolicy::Starter,
            kits::LabelPolicy::Background => LabelPolicy::Rules,
        };
        let preds = ctx.out.join("predictions");
        if self.write_predictions {
            std::fs::create_dir_all(&preds).map_err(StageError::io("create", &preds))?;
        }
        let mut per_case = Vec::new();
        for (ci, case) in cases.iter().enumerate() {
            ctx.report(ci as u64, cases.len() as u64, format!("evaluating {case}"));
            let record = table.cases.iter().find(|c| &c.id == case).ok_or_else(|| {
                StageError::Failed(format!(
                    "case `{case}` of `{}` is not in `{}`'s case table",
                    self.part, self.cases
                ))
            })?;
            let (img_path, seg_path) =
                (data.join(&record.imaging), data.join(&record.segmentation));
            // the bytes the load stage recorded, or an error naming the changed file
            let read = |p: &std::path::Path, digest: &str| {
                Volume::read_checked(p, &mut ReadBuffers::default(), Some(digest))
                    .map_err(StageError::other)
            };
            let img = read(&img_path, &record.imaging_digest)?;
            let pred =
                segment(&net, &file, &device, &img, self.batch_size).map_err(StageError::other)?;
            let (truth, shape) =
                labels_of(&Volume::read(&seg_path).map_err(StageError::other)?, policy)
                    .map_err(StageError::other)?;
            if shape[..] != img.shape3().map_err(StageError::other)?[..] {
                return Err(StageError::Failed(format!(
                    "`{}` has shape {shape:?}, but its imaging `{}` has {:?}",
                    seg_path.display(),
                    img_path.display(),
                    img.shape3().unwrap_or_default()
                )));
            }
            let s = score(&truth, &pred, &shape);
            if self.write_predictions {
                let name = format!("{}.nii.gz", case.replace("case_", "prediction_"));
                write_labels(&img, &pred, &preds.join(name)).map_err(StageError::other)?;
            }
            per_case.push(CaseScore {
                case: case.clone(),
                slices: shape[0],
                kidney_tumor_dice: s.kidney_tumor_dice,
                tumor_dice: s.tumor_dice,
            });
        }
        let (scores, examples) = self.slice_scores(&store, &cases, &net, &device)?;
        let kt = nan_mean(per_case.iter().map(|c| c.kidney_tumor_dice));
        let tu = nan_mean(per_case.iter().map(|c| c.tumor_dice));
        let summary = EvaluationSummary {
            part: self.part.0.clone(),
            slices: scores.summary(),
            kits: KitsSummary {
                evaluation: Self::OFFICIAL.into(),
                cases: per_case.len(),
                kidney_tumor_dice: kt,
                tumor_dice: tu,
                score: nan_mean([kt, tu]),
            },
        };
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        write(&ctx.out.join(Self::SUMMARY), text.as_bytes())?;
        let mut csv = String::from("case,slices,kidney_tumor_dice,tumor_dice\n");
        for c in &per_case {
            let f = |v: f64| {
                if v.is_nan() {
                    String::new()
                } else {
                    format!("{v}")
                }
            };
            csv += &format!(
                "{},{},{},{}\n",
                c.case,
                c.slices,
                f(c.kidney_tumor_dice),
                f(c.tumor_dice)
            );
        }
        write(&ctx.out.join("per_case.csv"), csv.as_bytes())?;
        write_examples(&ctx.out.join("examples"), store.meta.size, &examples)?;
        tracing::info!(
            kidney_tumor_dice = kt,
            tumor_dice = tu,
            kits_score = summary.kits.score,
            study_iou = summary.slices.study_iou,
            "evaluated"
        );
        Ok(())
    }
}

impl Evaluate {
    /// The study's slice metrics over the slice store's slices of `cases`, and the
    /// slices with the most foreground for the report.
    fn slice_scores(
        &self,
        store: &SliceStore,
        cases: &[String],
        net: &crate::models::Network,
        device: &burn::tensor::Device,
    ) -> Result<(SliceScores, Vec<Example>), StageError> {
        let plane = store.meta.size * store.meta.size;
        let mut scores = SliceScores::default();
        let mut examples: Vec<Example> = Vec::new();
        let ids = slices_of(store, cases).map_err(StageError::Failed)?;
        for chunk in ids.chunks(self.batch_size) {
            let data = batch(store, chunk, None).map_err(StageError::other)?;
            let pred = predict_labels(net.forward(crate::train::images_tensor(
                store,
                &data.images,
                data.len,
                device,
            )))
            .map_err(StageError::other)?;
            for (k, (t, p)) in data
                .labels
                .chunks(plane)
                .zip(pred.chunks(plane))
                .enumerate()
            {
                scores.add_slice(t, p);
                let fg = t.iter().filter(|&&l| l > 0).count();
                if self.examples > 0 && fg > 0 {
                    let c = store.meta.channels;
                    let centre =
                        data.images[(k * c + c / 2) * plane..(k * c + c / 2 + 1) * plane].to_vec();
                    examples.push(Example {
                        foreground: fg,
                        case: store.meta.cases[chunk[k].0].id.clone(),
                        row: chunk[k].1,
                        image: centre,
                        truth: t.to_vec(),
                        pred: p.to_vec(),
                    });
                    examples.sort_by(|a, b| {
                        b.foreground
                            .cmp(&a.foreground)
                            .then(a.case.cmp(&b.case))
                            .then(a.row.cmp(&b.row))
                    });
                    examples.truncate(self.examples);
                }
            }
        }
        Ok((scores, examples))
    }
}

fn check_compatible(file: &ModelFile, store: &SliceStore) -> Result<(), StageError> {
    let (m, s) = (&file.slices, &store.meta);
    if m.size != s.size || m.channels != s.channels || m.normalization != s.normalization {
        return Err(StageError::Failed(format!(
            "the model was trained on {}x{} slices with {} channel(s) and {:?}, but these slices are {}x{} with {} and {:?}",
            m.size,
            m.size,
            m.channels,
            m.normalization,
            s.size,
            s.size,
            s.channels,
            s.normalization
        )));
    }
    Ok(())
}

/// The report's example slices: image (centre channel), truth and prediction.
fn write_examples(dir: &std::path::Path, size: usize, ex: &[Example]) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(StageError::io("create", dir))?;
    let n = ex.len();
    let mut img = Array3::<f32>::zeros((n, size, size));
    let mut truth = Array3::<u8>::zeros((n, size, size));
    let mut pred = Array3::<u8>::zeros((n, size, size));
    for (i, e) in ex.iter().enumerate() {
        img.slice_mut(s![i, .., ..])
            .iter_mut()
            .zip(&e.image)
            .for_each(|(d, v)| *d = *v);
        truth
            .slice_mut(s![i, .., ..])
            .iter_mut()
            .zip(&e.truth)
            .for_each(|(d, v)| *d = *v);
        pred.slice_mut(s![i, .., ..])
            .iter_mut()
            .zip(&e.pred)
            .for_each(|(d, v)| *d = *v);
    }
    ndarray_npy::write_npy(dir.join("image.npy"), &img).map_err(StageError::other)?;
    ndarray_npy::write_npy(dir.join("truth.npy"), &truth).map_err(StageError::other)?;
    ndarray_npy::write_npy(dir.join("pred.npy"), &pred).map_err(StageError::other)?;
    let index: Vec<serde_json::Value> = ex
        .iter()
        .map(|e| serde_json::json!({"case": e.case, "row": e.row, "foreground": e.foreground}))
        .collect();
    write(
        &dir.join("examples.json"),
        serde_json::to_string_pretty(&index)
            .unwrap_or_default()
            .as_bytes(),
    )
}

fn write(path: &std::path::Path, bytes: &[u8]) -> Result<(), StageError> {
    std::fs::write(path, bytes).map_err(StageError::io("write", path))
}
