//! `kind = "evaluate"`: score a trained model on a split part.
//!
//! ```toml
//! [stages.evaluate]
//! kind = "evaluate"
//! model = "train.best"     # a train stage, or a sweep's selected arm
//! slices = "slice"
//! part = "split.eval"
//! batch-size = 8
//! examples = 6             # eval slices with the most foreground, kept for the report
//! backend = "cpu"
//! ```
//!
//! Reports the study's metric (per slice, IoU of the 3 classes averaged, absent classes
//! counting 1; then averaged over slices) with, beside it, the same over classes present
//! only, the same over slices whose truth shows kidney or tumor, per-class IoU and Dice
//! pooled over pixels, and per case, on the case's slices stacked into a volume, the
//! KiTS19 metrics: kidney+tumor Dice (label > 0), tumor Dice (label > 1; two empty masks
//! give NaN, skipped in the means), and their mean, the challenge score.
//! Output: `summary.json`, `per_case.csv`, `examples/` (image, truth and prediction).

use ndarray::{Array3, s};
use serde::{Deserialize, Serialize};

use super::train::ModelFile;
use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::backend::{self, BackendKind};
use crate::data::loader::{batch, slices_of};
use crate::data::slices::SliceStore;
use crate::metrics::{ScoreSummary, SliceScores};
use crate::train::{load_network, predict_labels};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Evaluate {
    pub model: StageRef,
    pub slices: StageRef,
    pub part: StageRef,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_examples")]
    pub examples: usize,
    #[serde(default)]
    pub backend: BackendKind,
    /// Cross-validation fold of a `folds = k` split (`split.test` is fold i).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
}

fn default_batch() -> usize {
    8
}
fn default_examples() -> usize {
    6
}

/// KiTS19 Dice of one case (NaN when both masks are empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseScore {
    pub case: String,
    pub slices: usize,
    pub kidney_tumor_dice: f64,
    pub tumor_dice: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KitsSummary {
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
}

/// Dice from intersection and the two sizes; NaN when both are empty.
pub fn dice(inter: u64, a: u64, b: u64) -> f64 {
    if a + b == 0 {
        f64::NAN
    } else {
        2.0 * inter as f64 / (a + b) as f64
    }
}

/// Mean over the finite values (NaN when there are none).
pub fn nan_mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v.into_iter().filter(|x| !x.is_nan()) {
        s += x;
        n += 1;
    }
    if n == 0 { f64::NAN } else { s / n as f64 }
}

impl Stage for Evaluate {
    const KIND: &'static str = "evaluate";
    const USES_DEVICE: bool = true;

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if self.part.port().is_none() {
            issues.push(ParamIssue::new(
                "part",
                format!("reference a split part, like `{}.eval`", self.part.stage()),
            ));
        }
        if self.batch_size == 0 {
            issues.push(ParamIssue::new("batch-size", "must be at least 1"));
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        vec![
            ("model".into(), &self.model),
            ("slices".into(), &self.slices),
            ("part".into(), &self.part),
        ]
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let store = SliceStore::open(ctx.input(&self.slices)?).map_err(StageError::other)?;
        let cases = super::split::SplitFile::read(ctx.input(&self.part)?)?
            .cases(&self.part, "eval", self.fold)?;
        let device = backend::device(self.backend, 0).map_err(StageError::Failed)?;
        let (net, file) =
            load_network(&ctx.input_dir(&self.model)?, &device).map_err(StageError::other)?;
        check_compatible(&file, &store)?;
        let plane = store.meta.size * store.meta.size;
        let mut scores = SliceScores::default();
        let mut per_case = Vec::new();
        let mut examples: Vec<Example> = Vec::new();
        for (ci, case) in cases.iter().enumerate() {
            ctx.report(ci as u64, cases.len() as u64, format!("evaluating {case}"));
            let ids = slices_of(&store, std::slice::from_ref(case)).map_err(StageError::Failed)?;
            let (mut kt, mut tu) = ([0u64; 3], [0u64; 3]);
            for chunk in ids.chunks(self.batch_size) {
                let data = batch(&store, chunk, None).map_err(StageError::other)?;
                let pred = predict_labels(net.forward(crate::train::images_tensor(
                    &store,
                    &data.images,
                    data.len,
                    &device,
                )))
                .map_err(StageError::other)?;
                for (k, (t, p)) in data
                    .labels
                    .chunks(plane)
                    .zip(pred.chunks(plane))
                    .enumerate()
                {
                    scores.add_slice(t, p);
                    for (&a, &b) in t.iter().zip(p) {
                        kt[0] += u64::from(a > 0 && b > 0);
                        kt[1] += u64::from(a > 0);
                        kt[2] += u64::from(b > 0);
                        tu[0] += u64::from(a > 1 && b > 1);
                        tu[1] += u64::from(a > 1);
                        tu[2] += u64::from(b > 1);
                    }
                    let fg = t.iter().filter(|&&l| l > 0).count();
                    if self.examples > 0 && fg > 0 {
                        let c = store.meta.channels;
                        let centre = data.images
                            [(k * c + c / 2) * plane..(k * c + c / 2 + 1) * plane]
                            .to_vec();
                        examples.push(Example {
                            foreground: fg,
                            case: case.clone(),
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
            per_case.push(CaseScore {
                case: case.clone(),
                slices: ids.len(),
                kidney_tumor_dice: dice(kt[0], kt[1], kt[2]),
                tumor_dice: dice(tu[0], tu[1], tu[2]),
            });
        }
        let kt = nan_mean(per_case.iter().map(|c| c.kidney_tumor_dice));
        let tu = nan_mean(per_case.iter().map(|c| c.tumor_dice));
        let summary = EvaluationSummary {
            part: self.part.0.clone(),
            slices: scores.summary(),
            kits: KitsSummary {
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
            study_iou = summary.slices.study_iou,
            fg_iou = summary.slices.fg_iou,
            kidney_dice = summary.slices.class_dice[1],
            kits_score = summary.kits.score,
            "evaluated"
        );
        Ok(())
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
