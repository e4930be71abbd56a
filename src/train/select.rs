//! Which epoch is best: the selection rule a train stage keeps its weights by and a
//! sweep ranks its arms by, so that the number a table ranks is the number of the weights
//! that are handed on.
//!
//! ```toml
//! select = { metric = "val-iou", mode = "max" }
//! ```

use serde::{Deserialize, Serialize};

use super::EpochRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Max,
    Min,
}

/// The selection rule: `{ metric = "val-iou", mode = "max" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
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

/// Metrics a rule can select on: the columns of `metrics.csv`, kebab-case.
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

    /// The rule's metric in one epoch's row.
    pub fn value(&self, r: &EpochRow) -> f64 {
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

    /// Whether `a` is better than `b` (NaN is never better; ties are not better, so
    /// the earliest of equal epochs or arms wins).
    pub fn better(&self, a: f64, b: f64) -> bool {
        !a.is_nan() && (b.is_nan() || if self.mode == Mode::Max { a > b } else { a < b })
    }

    /// The best row by this rule (the earliest of equals), if any is finite.
    pub fn best<'a>(&self, rows: &'a [EpochRow]) -> Option<&'a EpochRow> {
        let mut best: Option<&EpochRow> = None;
        for r in rows {
            if self.better(self.value(r), best.map_or(f64::NAN, |b| self.value(b))) {
                best = Some(r);
            }
        }
        best
    }
}

/// Which weights a train stage hands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The epoch that is best by the stage's `select` rule (the last weights are kept
    /// beside them as `last.safetensors`).
    #[default]
    Best,
    /// The last epoch's.
    Last,
}
