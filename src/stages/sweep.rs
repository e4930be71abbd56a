//! `kind = "sweep"`: compares the arms of a sweep (written by the `sweep` table of a
//! train stage, see [`crate::config`]) and selects the best.
//!
//! Each arm is ranked by the selection metric of the weights it hands on (its kept
//! epoch, `model.json`), so the table's number is the number of the weights `best/` holds.
//! With replicates (`seed = [1, 2, 3]` in the sweep table), arms that differ only in
//! `seed` form a setting; settings are ranked by their mean, and the selected setting's
//! best replicate is handed on.
//!
//! Output: `comparison.csv` and `comparison.md` (one row per arm: its parameters, the
//! selection metric at the kept epoch and that epoch, its validation metrics, the final
//! epoch's IoU; with replicates, one row per setting with mean ± sd and n, and the
//! per-arm table in `arms.{csv,md}`), ranked by the selection rule; `sweep.json`; `best/`, a copy of the selected arm's
//! artifact, which downstream stages reference as `<id>.best`; and in `volatile/` (outside
//! the digest: no rerun reproduces a clock) `wall_time.json`, each arm's training time,
//! and the same two tables with a wall-time column.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::models::ModelFile;
use crate::train::EpochRow;
pub use crate::train::select::{METRICS, Mode, Select};

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
    /// The selection metric at the kept epoch (the weights the arm hands on).
    pub best: f64,
    /// The kept epoch (1-based): the best by the rule, or the last with `keep = "last"`.
    pub best_epoch: usize,
    pub last: EpochSummary,
    pub kept: EpochSummary,
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

impl EpochSummary {
    fn of(r: &EpochRow) -> EpochSummary {
        EpochSummary {
            val_iou: r.val_iou,
            val_fg_iou: r.val_fg_iou,
            dice_kidney: r.dice[1],
            dice_tumor: r.dice[2],
        }
    }
}

/// `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepFile {
    pub select: Select,
    /// Ranked by the selection rule, best first.
    pub arms: Vec<ArmResult>,
    /// With replicates (`seed` swept): each setting's mean ± sd, best mean first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<SettingResult>,
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
        let select = &self.select;
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
            // rank by the weights the arm hands on: its kept epoch
            let kept = kept_epoch(dir, rows.len())?;
            if let Some(d) = entry_duration(dir) {
                wall.insert(arm.stage.0.clone(), d);
            }
            results.push(ArmResult {
                id: arm.stage.0.clone(),
                params: arm.params.clone(),
                best: select.value(&rows[kept - 1]),
                best_epoch: kept,
                last: EpochSummary::of(last),
                kept: EpochSummary::of(&rows[kept - 1]),
                epochs: rows.len(),
                selected: false,
                val_iou: rows.iter().map(|r| r.val_iou).collect(),
                train_loss: rows.iter().map(|r| r.train_loss).collect(),
                val_loss: rows.iter().map(|r| r.val_loss).collect(),
            });
        }
        let by = |a: f64, b: f64| {
            if select.better(a, b) {
                std::cmp::Ordering::Less
            } else if select.better(b, a) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        };
        // rank: better first; ties keep the declared arm order
        results.sort_by(|a, b| by(a.best, b.best));
        let mut settings = settings_of(&results);
        // with replicates, the setting with the best mean wins and hands on its best
        // replicate; without, each setting is one arm
        settings.sort_by(|a, b| by(a.best.mean, b.best.mean));
        if let Some(first) = settings.first_mut() {
            first.selected = true;
        }
        let chosen = settings
            .first()
            .and_then(|s| s.arms.first())
            .cloned()
            .ok_or_else(|| StageError::Failed("the sweep has no arms".into()))?;
        for r in &mut results {
            r.selected = r.id == chosen;
        }
        copy_dir(ctx.input(&StageRef(chosen))?, &ctx.out.join("best"))?;
        let replicated = settings.iter().any(|s| s.n > 1);
        let volatile = ctx.out.join(crate::cache::digest::VOLATILE);
        std::fs::create_dir_all(&volatile).map_err(StageError::io("create", ctx.out))?;
        for (dir, wall) in [(ctx.out, None), (volatile.as_path(), Some(&wall))] {
            let arms = arm_table(select, &results, wall);
            if replicated {
                let t = setting_table(select, &settings);
                write(&dir.join("comparison.csv"), &t.csv())?;
                write(&dir.join("comparison.md"), &t.markdown())?;
                write(&dir.join("arms.csv"), &arms.csv())?;
                write(&dir.join("arms.md"), &arms.markdown())?;
            } else {
                write(&dir.join("comparison.csv"), &arms.csv())?;
                write(&dir.join("comparison.md"), &arms.markdown())?;
            }
        }
        let file = SweepFile {
            select: select.clone(),
            arms: results,
            settings: if replicated { settings } else { vec![] },
        };
        write(&ctx.out.join(SweepFile::FILE), &json(&file)?)?;
        write(&volatile.join("wall_time.json"), &json(&wall)?)?;
        Ok(())
    }
}

/// The epoch an arm kept (`model.json`), or its last for artifacts that do not say.
fn kept_epoch(dir: &Path, epochs: usize) -> Result<usize, StageError> {
    let path = dir.join(ModelFile::FILE);
    let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
    let file: ModelFile = serde_json::from_str(&text)
        .map_err(|e| StageError::Failed(format!("`{}`: {e}", path.display())))?;
    match file.kept.map(|k| k.epoch) {
        None => Ok(epochs),
        Some(e) if (1..=epochs).contains(&e) => Ok(e),
        Some(e) => Err(StageError::Failed(format!(
            "`{}` keeps epoch {e}, but `metrics.csv` has {epochs}",
            path.display()
        ))),
    }
}

/// Mean and sample standard deviation (NaN values skipped; sd NaN for fewer than two).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl MeanSd {
    pub fn of(values: impl IntoIterator<Item = f64>) -> MeanSd {
        let v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        let n = v.len();
        if n == 0 {
            return MeanSd {
                mean: f64::NAN,
                sd: f64::NAN,
                n,
            };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n < 2 {
            f64::NAN
        } else {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        MeanSd { mean, sd, n }
    }

    fn cell(&self) -> String {
        if self.sd.is_nan() {
            fmt(self.mean)
        } else {
            format!("{} ± {}", fmt(self.mean), fmt(self.sd))
        }
    }
}

/// One setting of a sweep with replicates: the arms that differ only in `seed`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettingResult {
    /// The swept parameters other than `seed`.
    pub params: BTreeMap<String, String>,
    /// Its arms, best first.
    pub arms: Vec<String>,
    pub n: usize,
    /// The selection metric at each arm's kept epoch.
    pub best: MeanSd,
    pub kept_val_iou: MeanSd,
    pub kept_val_fg_iou: MeanSd,
    pub kept_dice_kidney: MeanSd,
    pub kept_dice_tumor: MeanSd,
    pub selected: bool,
}

/// Groups ranked arms by their parameters other than `seed`, in first-seen order.
fn settings_of(arms: &[ArmResult]) -> Vec<SettingResult> {
    let mut groups: Vec<(BTreeMap<String, String>, Vec<&ArmResult>)> = Vec::new();
    for a in arms {
        let mut p = a.params.clone();
        p.remove("seed");
        match groups.iter_mut().find(|(q, _)| *q == p) {
            Some((_, v)) => v.push(a),
            None => groups.push((p, vec![a])),
        }
    }
    groups
        .into_iter()
        .map(|(params, v)| {
            let m = |f: &dyn Fn(&ArmResult) -> f64| MeanSd::of(v.iter().map(|a| f(a)));
            SettingResult {
                params,
                arms: v.iter().map(|a| a.id.clone()).collect(),
                n: v.len(),
                best: m(&|a| a.best),
                kept_val_iou: m(&|a| a.kept.val_iou),
                kept_val_fg_iou: m(&|a| a.kept.val_fg_iou),
                kept_dice_kidney: m(&|a| a.kept.dice_kidney),
                kept_dice_tumor: m(&|a| a.kept.dice_tumor),
                selected: false,
            }
        })
        .collect()
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

/// The per-arm table, in rank order; with `wall`, a column of each arm's training time.
fn arm_table(select: &Select, arms: &[ArmResult], wall: Option<&BTreeMap<String, f64>>) -> Table {
    let keys: Vec<&String> = arms
        .first()
        .map(|a| a.params.keys().collect())
        .unwrap_or_default();
    let mut header = vec!["rank".to_string(), "arm".into()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend(
        [
            &format!("{} (kept epoch)", select.metric),
            "kept epoch",
            "kept val IoU",
            "kept fg IoU",
            "kidney Dice",
            "tumor Dice",
            "final val IoU",
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
                fmt(a.kept.val_iou),
                fmt(a.kept.val_fg_iou),
                fmt(a.kept.dice_kidney),
                fmt(a.kept.dice_tumor),
                fmt(a.last.val_iou),
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

/// The per-setting table of a sweep with replicates: mean ± sd over its seeds.
fn setting_table(select: &Select, settings: &[SettingResult]) -> Table {
    let keys: Vec<&String> = settings
        .first()
        .map(|s| s.params.keys().collect())
        .unwrap_or_default();
    let mut header = vec!["rank".to_string()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend(
        [
            "n",
            &format!("{} (kept epoch)", select.metric),
            "kept val IoU",
            "kept fg IoU",
            "kidney Dice",
            "tumor Dice",
            "selected",
        ]
        .map(String::from),
    );
    let rows = settings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut row = vec![(i + 1).to_string()];
            row.extend(
                keys.iter()
                    .map(|k| s.params.get(*k).cloned().unwrap_or_default()),
            );
            row.extend([
                s.n.to_string(),
                s.best.cell(),
                s.kept_val_iou.cell(),
                s.kept_val_fg_iou.cell(),
                s.kept_dice_kidney.cell(),
                s.kept_dice_tumor.cell(),
                if s.selected {
                    format!("**selected** ({})", s.arms[0])
                } else {
                    String::new()
                },
            ]);
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
