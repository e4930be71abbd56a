//! Segmentation metrics over label maps (0 background, 1 kidney, 2 tumor).
//!
//! - The study's metric: per slice, the IoU of each of the 3 classes averaged over the
//!   classes, then averaged over slices. A class absent from both truth and prediction on
//!   a slice counts as 1 (MONAI's `ignore_empty=False`), which is why slices without
//!   kidney inflate it; [`SliceScores::study_present`] averages over the classes present
//!   instead.
//! - Honest companions: the same over slices whose truth shows kidney or tumor only, and
//!   per-class IoU and Dice pooled over all pixels.

pub mod kits;

use serde::Serialize;

pub const CLASSES: usize = 3;

/// Per-class intersection and union counts of one slice (or any pixel set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub inter: [u64; CLASSES],
    pub pred: [u64; CLASSES],
    pub truth: [u64; CLASSES],
}

impl Counts {
    pub fn of(truth: &[u8], pred: &[u8]) -> Counts {
        let mut c = Counts::default();
        for (&t, &p) in truth.iter().zip(pred) {
            let (t, p) = (usize::from(t.min(2)), usize::from(p.min(2)));
            c.truth[t] += 1;
            c.pred[p] += 1;
            if t == p {
                c.inter[t] += 1;
            }
        }
        c
    }

    pub fn add(&mut self, o: &Counts) {
        for k in 0..CLASSES {
            self.inter[k] += o.inter[k];
            self.pred[k] += o.pred[k];
            self.truth[k] += o.truth[k];
        }
    }

    pub fn union(&self, k: usize) -> u64 {
        self.pred[k] + self.truth[k] - self.inter[k]
    }

    /// IoU of class `k`, `None` when the class is in neither.
    pub fn iou(&self, k: usize) -> Option<f64> {
        let u = self.union(k);
        (u > 0).then(|| self.inter[k] as f64 / u as f64)
    }

    /// Dice of class `k`, `None` when the class is in neither.
    pub fn dice(&self, k: usize) -> Option<f64> {
        let d = self.pred[k] + self.truth[k];
        (d > 0).then(|| 2.0 * self.inter[k] as f64 / d as f64)
    }

    pub fn truth_has_foreground(&self) -> bool {
        self.truth[1] + self.truth[2] > 0
    }
}

/// Accumulates per-slice scores and pooled counts over a set of slices.
#[derive(Debug, Clone, Default)]
pub struct SliceScores {
    study_sum: f64,
    present_sum: f64,
    present_n: u64,
    fg_sum: f64,
    fg_n: u64,
    slices: u64,
    pub pooled: Counts,
}

impl SliceScores {
    pub fn add_slice(&mut self, truth: &[u8], pred: &[u8]) {
        let c = Counts::of(truth, pred);
        let study: f64 =
            (0..CLASSES).map(|k| c.iou(k).unwrap_or(1.0)).sum::<f64>() / CLASSES as f64;
        self.study_sum += study;
        let present: Vec<f64> = (0..CLASSES).filter_map(|k| c.iou(k)).collect();
        if !present.is_empty() {
            self.present_sum += present.iter().sum::<f64>() / present.len() as f64;
            self.present_n += 1;
        }
        if c.truth_has_foreground() {
            self.fg_sum += study;
            self.fg_n += 1;
        }
        self.slices += 1;
        self.pooled.add(&c);
    }

    pub fn summary(&self) -> ScoreSummary {
        let mean = |s: f64, n: u64| if n == 0 { f64::NAN } else { s / n as f64 };
        ScoreSummary {
            slices: self.slices,
            study_iou: mean(self.study_sum, self.slices),
            study_iou_present: mean(self.present_sum, self.present_n),
            fg_iou: mean(self.fg_sum, self.fg_n),
            fg_slices: self.fg_n,
            class_iou: [0, 1, 2].map(|k| self.pooled.iou(k).unwrap_or(f64::NAN)),
            class_dice: [0, 1, 2].map(|k| self.pooled.dice(k).unwrap_or(f64::NAN)),
        }
    }
}

/// What a set of slices scored (NaN where undefined; JSON null).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScoreSummary {
    pub slices: u64,
    /// The study's metric: mean over slices of the mean class IoU, absent classes = 1.
    pub study_iou: f64,
    /// The same with each slice averaging only the classes present in truth or prediction.
    pub study_iou_present: f64,
    /// The study's metric over slices whose truth shows kidney or tumor.
    pub fg_iou: f64,
    pub fg_slices: u64,
    /// Pooled over all pixels: background, kidney, tumor.
    pub class_iou: [f64; 3],
    pub class_dice: [f64; 3],
}

/// Mean over the finite values (NaN when there are none), as the KiTS19 evaluation
/// averages per-case Dice (a case where both masks are empty has none).
pub fn nan_mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v.into_iter().filter(|x| !x.is_nan()) {
        s += x;
        n += 1;
    }
    if n == 0 { f64::NAN } else { s / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_slices_score_one_in_the_study_metric_and_are_left_out_of_the_honest_one() {
        let mut s = SliceScores::default();
        s.add_slice(&[0, 0, 0, 0], &[0, 0, 0, 0]); // empty: 1.0
        s.add_slice(&[0, 1, 1, 2], &[0, 1, 0, 0]); // bg 1/3, kidney 1/2, tumor 0 -> 5/18
        let m = s.summary();
        assert!((m.study_iou - (1.0 + 5.0 / 18.0) / 2.0).abs() < 1e-12);
        assert!((m.fg_iou - 5.0 / 18.0).abs() < 1e-12);
        assert_eq!(m.fg_slices, 1);
        // present-only: slice 1 averages background alone (1.0); slice 2 all three
        assert!((m.study_iou_present - (1.0 + 5.0 / 18.0) / 2.0).abs() < 1e-12);
        // pooled kidney: inter 1, pred 1, truth 2
        assert!((m.class_iou[1] - 0.5).abs() < 1e-12);
        assert!((m.class_dice[1] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn swapped_labels_score_zero_on_foreground() {
        let c = Counts::of(&[1, 1, 2, 2], &[2, 2, 1, 1]);
        assert_eq!(c.iou(1), Some(0.0));
        assert_eq!(c.dice(2), Some(0.0));
        assert_eq!(c.iou(0), None);
    }
}
