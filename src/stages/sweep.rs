//! `kind = "sweep"`: compares the arms of a sweep (written by the `sweep` table of a
//! train stage, see [`crate::config`]) and selects the best.
//!
//! Output: `comparison.csv` and `comparison.md` (one row per arm: its parameters, the
//! best value of the selection metric and its epoch, final validation metrics, epochs),
//! ranked by the selection rule; `sweep.json`; `best/`, a copy of the selected arm's
//! artifact, which downstream stages reference as `<id>.best`; and in `volatile/` (outside
//! the digest: no rerun reproduces a clock) `wall_time.json`, each arm's training time,
//! and the same two tables with a wall-time column.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::train::EpochRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Max,
    Min,
}

/// The selection rule: `{ metric = "val-iou", mode = "max" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Select {
    #[serde(default = "default_metric")]
    pub metric: String,
    #[serde(default)]
    pub mode: Mode,
}

fn default_metric() -> String {
    "val-iou".into()
}

impl Default for Select {
    fn default() -> Self {
        Select {
            metric: default_metric(),
            mode: Mode::Max,
        }
    }
}

/// Metrics a sweep can select on: the columns of `metrics.csv`, kebab-case.
pub const METRICS: [&str; 11] = [
    "train-loss",
    "val-loss",
    "val-iou",
    "val-iou-present",
    "val-fg-iou",
    "iou-background",
    "iou-kidney",
    "iou-tumor",
    "dice-background",
    "dice-kidney",
    "dice-tumor",
];

impl Select {
    pub fn check(&self) -> Result<(), String> {
        if METRICS.contains(&self.metric.as_str()) {
            Ok(())
        } else {
            Err(format!(
                "unknown metric `{}`; metrics are {}",
                self.metric,
                METRICS.map(|m| format!("`{m}`")).join(", ")
            ))
        }
    }

    fn value(&self, r: &EpochRow) -> f64 {
        match self.metric.as_str() {
            "train-loss" => r.train_loss,
            "val-loss" => r.val_loss,
            "val-iou" => r.val_iou,
            "val-iou-present" => r.val_iou_present,
            "val-fg-iou" => r.val_fg_iou,
            "iou-background" => r.iou[0],
            "iou-kidney" => r.iou[1],
            "iou-tumor" => r.iou[2],
            "dice-background" => r.dice[0],
            "dice-kidney" => r.dice[1],
            _ => r.dice[2],
        }
    }

    /// Whether `a` is better than `b` (NaN is never better).
    fn better(&self, a: f64, b: f64) -> bool {
        !a.is_nan() && (b.is_nan() || if self.mode == Mode::Max { a > b } else { a < b })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepArm {
    pub stage: StageRef,
    /// The swept parameters of this arm, as labels.
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sweep {
    pub arms: Vec<SweepArm>,
    #[serde(default)]
    pub select: Select,
}

/// One arm's line of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmResult {
    pub id: String,
    pub params: BTreeMap<String, String>,
    pub best: f64,
    pub best_epoch: usize,
    pub last: EpochSummary,
    pub epochs: usize,
    pub selected: bool,
    /// Per-epoch validation IoU (the study's metric) and losses, for the report's plots.
    pub val_iou: Vec<f64>,
    pub train_loss: Vec<f64>,
    pub val_loss: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochSummary {
    pub val_iou: f64,
    pub val_fg_iou: f64,
    pub dice_kidney: f64,
    pub dice_tumor: f64,
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepFile {
    pub select: Select,
    /// Ranked by the selection rule, best first.
    pub arms: Vec<ArmResult>,
}

impl SweepFile {
    pub const FILE: &'static str = "sweep.json";

    pub fn read(dir: &Path) -> Result<SweepFile, StageError> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
        serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("`{}`: {e}", path.display())))
    }
}

/// The rows of a train artifact's `metrics.csv`.
pub fn read_metrics(dir: &Path) -> Result<Vec<EpochRow>, StageError> {
    let path = dir.join("metrics.csv");
    let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
    text.lines()
        .skip(1)
        .map(|l| {
            EpochRow::from_csv(l)
                .ok_or_else(|| StageError::Failed(format!("`{}`: bad row `{l}`", path.display())))
        })
        .collect()
}

impl Stage for Sweep {
    const KIND: &'static str = "sweep";
    const OUTPUTS: &'static [&'static str] = &["best"];

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if self.arms.is_empty() {
            issues.push(ParamIssue::new("arms", "a sweep needs at least one arm"));
        }
        if let Err(why) = self.select.check() {
            issues.push(ParamIssue::new("select.metric", why));
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        self.arms
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("arms.{i}.stage"), &a.stage))
            .collect()
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let mut results = Vec::new();
        let mut wall = BTreeMap::new();
        for arm in &self.arms {
            let dir = ctx.input(&arm.stage)?;
            let rows = read_metrics(dir)?;
            let Some(last) = rows.last() else {
                return Err(StageError::Failed(format!(
                    "arm `{}` has no epochs",
                    arm.stage
                )));
            };
            let (mut best, mut best_epoch) = (f64::NAN, 0);
            for r in &rows {
                let v = self.select.value(r);
                if self.select.better(v, best) {
                    (best, best_epoch) = (v, r.epoch);
                }
            }
            if let Some(d) = entry_duration(dir) {
                wall.insert(arm.stage.0.clone(), d);
            }
            results.push(ArmResult {
                id: arm.stage.0.clone(),
                params: arm.params.clone(),
                best,
                best_epoch,
                last: EpochSummary {
                    val_iou: last.val_iou,
                    val_fg_iou: last.val_fg_iou,
                    dice_kidney: last.dice[1],
                    dice_tumor: last.dice[2],
                },
                epochs: rows.len(),
                selected: false,
                val_iou: rows.iter().map(|r| r.val_iou).collect(),
                train_loss: rows.iter().map(|r| r.train_loss).collect(),
                val_loss: rows.iter().map(|r| r.val_loss).collect(),
            });
        }
        // rank: better first; ties keep the declared arm order
        let select = &self.select;
        results.sort_by(|a, b| {
            if select.better(a.best, b.best) {
                std::cmp::Ordering::Less
            } else if select.better(b.best, a.best) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        results[0].selected = true;
        let best_dir = ctx.input(&StageRef(results[0].id.clone()))?;
        copy_dir(best_dir, &ctx.out.join("best"))?;
        let volatile = ctx.out.join(crate::cache::digest::VOLATILE);
        std::fs::create_dir_all(&volatile).map_err(StageError::io("create", ctx.out))?;
        for (dir, wall) in [(ctx.out, None), (volatile.as_path(), Some(&wall))] {
            let t = table(select, &results, wall);
            write(&dir.join("comparison.csv"), &t.csv())?;
            write(&dir.join("comparison.md"), &t.markdown())?;
        }
        let file = SweepFile {
            select: select.clone(),
            arms: results,
        };
        write(&ctx.out.join(SweepFile::FILE), &json(&file)?)?;
        write(&volatile.join("wall_time.json"), &json(&wall)?)?;
        Ok(())
    }
}

fn json(v: &impl Serialize) -> Result<String, StageError> {
    serde_json::to_string_pretty(v).map_err(|e| StageError::Failed(e.to_string()))
}

/// Training time of the entry holding artifact `dir`, from its manifest.
pub fn entry_duration(dir: &Path) -> Option<f64> {
    let manifest = dir.parent()?.join("manifest.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).ok()?).ok()?;
    v["duration_s"].as_f64()
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.4}")
    }
}

/// The comparison table: one row per arm, in rank order; with `wall`, a column of each
/// arm's training time.
fn table(select: &Select, arms: &[ArmResult], wall: Option<&BTreeMap<String, f64>>) -> Table {
    let keys: Vec<&String> = arms
        .first()
        .map(|a| a.params.keys().collect())
        .unwrap_or_default();
    let mut header = vec!["rank".to_string(), "arm".into()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend(
        [
            &format!("best {}", select.metric),
            "best epoch",
            "final val IoU",
            "final fg IoU",
            "kidney Dice",
            "tumor Dice",
            "epochs",
            "selected",
        ]
        .map(String::from),
    );
    if wall.is_some() {
        header.push("wall time (s)".into());
    }
    let rows = arms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut row = vec![(i + 1).to_string(), a.id.clone()];
            row.extend(
                keys.iter()
                    .map(|k| a.params.get(*k).cloned().unwrap_or_default()),
            );
            row.extend([
                fmt(a.best),
                a.best_epoch.to_string(),
                fmt(a.last.val_iou),
                fmt(a.last.val_fg_iou),
                fmt(a.last.dice_kidney),
                fmt(a.last.dice_tumor),
                a.epochs.to_string(),
                if a.selected { "**selected**" } else { "" }.into(),
            ]);
            if let Some(w) = wall {
                row.push(w.get(&a.id).map_or("-".into(), |s| format!("{s:.1}")));
            }
            row
        })
        .collect();
    Table { header, rows }
}

struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn csv(&self) -> String {
        let line = |cells: &[String]| {
            let quoted: Vec<String> = cells
                .iter()
                .map(|c| {
                    let c = c.replace("**selected**", "true");
                    if c.contains([',', '"', ' ', '=']) {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c
                    }
                })
                .collect();
            quoted.join(",") + "\n"
        };
        // snake_case column names: `final val IoU` -> `final_val_iou`
        let header: Vec<String> = self
            .header
            .iter()
            .map(|h| {
                let h = h
                    .to_lowercase()
                    .replace(|c: char| !c.is_alphanumeric(), " ");
                h.split_whitespace().collect::<Vec<_>>().join("_")
            })
            .collect();
        self.rows.iter().fold(line(&header), |s, r| s + &line(r))
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let rule = format!("|{}\n", "---|".repeat(self.header.len()));
        self.rows
            .iter()
            .fold(line(&self.header) + &rule, |s, r| s + &line(r))
    }
}

fn write(path: &Path, text: &str) -> Result<(), StageError> {
    std::fs::write(path, text).map_err(StageError::io("write", path))
}

/// Copies a directory tree (an input artifact into this one).
pub fn copy_dir(from: &Path, to: &Path) -> Result<(), StageError> {
    for e in walkdir::WalkDir::new(from) {
        let e = e.map_err(|e| StageError::Failed(e.to_string()))?;
        let rel = e
            .path()
            .strip_prefix(from)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        let dest = to.join(rel);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).map_err(StageError::io("create", &dest))?;
        } else {
            std::fs::copy(e.path(), &dest).map_err(StageError::io("copy", e.path()))?;
            let mut perm = std::fs::metadata(&dest)
                .map_err(StageError::io("stat", &dest))?
                .permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&dest, perm).map_err(StageError::io("chmod", &dest))?;
        }
    }
    Ok(())
}
