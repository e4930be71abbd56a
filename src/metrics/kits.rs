//! The official KiTS19 evaluation of two label volumes (`kpipe score`), following the
//! challenge's starter code: a 4-D prediction is argmaxed over its last axis; float
//! labels are rounded half to even; shapes must match. Slices are taken along the first
//! array axis (KiTS19's slice axis).

use serde::Serialize;

use super::{CLASSES, Counts};
use crate::data::nifti::{NiftiError, Volume};

/// What labels above 2 mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelPolicy {
    /// As the official starter code: anything above 1 is tumor.
    Starter,
    /// As the challenge rules: anything outside {0, 1, 2} is background.
    Rules,
}

#[derive(Debug, Clone, Serialize)]
pub struct SliceMeanIou {
    /// Over all slices.
    pub all: f64,
    /// Over slices where truth or prediction shows kidney or tumor.
    pub nonempty: f64,
    /// Over slices whose truth shows kidney or tumor.
    pub truth_fg: f64,
}

/// `kpipe score`'s answer; NaN serialises as null.
#[derive(Debug, Clone, Serialize)]
pub struct KitsScore {
    pub kidney_tumor_dice: f64,
    pub tumor_dice: f64,
    /// IoU of background, kidney, tumor over the volume; NaN for a class in neither.
    pub iou: [f64; 3],
    pub slice_mean_iou: SliceMeanIou,
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Nifti(#[from] NiftiError),
    #[error("shapes differ: truth {truth:?}, prediction {pred:?}")]
    Shape { truth: Vec<usize>, pred: Vec<usize> },
}

/// Labels of a volume in file order, with its 3-D shape: a 4-D volume is argmaxed over
/// its last axis (first maximum wins, as numpy's), floats are rounded half to even.
pub fn labels_of(v: &Volume, policy: LabelPolicy) -> Result<(Vec<u8>, Vec<usize>), NiftiError> {
    Ok(labels_from(&v.to_f64()?, &v.shape, policy))
}

/// [`labels_of`] on values in file order (first index fastest) of nibabel shape `shape`.
pub fn labels_from(values: &[f64], shape: &[usize], policy: LabelPolicy) -> (Vec<u8>, Vec<usize>) {
    let mut shape = shape.to_vec();
    while shape.len() > 4 && shape.last() == Some(&1) {
        shape.pop();
    }
    let labels: Vec<i64> = if shape.len() == 4 && shape[3] > 1 {
        let n: usize = shape[..3].iter().product();
        let c = shape[3];
        (0..n)
            .map(|i| {
                let mut best = 0;
                for ch in 1..c {
                    if values[i + n * ch] > values[i + n * best] {
                        best = ch;
                    }
                }
                best as i64
            })
            .collect()
    } else {
        values.iter().map(|v| v.round_ties_even() as i64).collect()
    };
    shape.truncate(3);
    let mapped = labels
        .into_iter()
        .map(|l| match (l, policy) {
            (0..=2, _) => l as u8,
            (3.., LabelPolicy::Starter) => 2,
            _ => 0,
        })
        .collect();
    (mapped, shape)
}

fn dice(inter: u64, a: u64, b: u64) -> f64 {
    if a + b == 0 {
        f64::NAN
    } else {
        2.0 * inter as f64 / (a + b) as f64
    }
}

/// Scores a prediction against the truth.
pub fn score(truth: &[u8], pred: &[u8], shape: &[usize]) -> KitsScore {
    let d = shape.first().copied().unwrap_or(1).max(1);
    let (mut kt, mut tu) = ([0u64; 3], [0u64; 3]);
    let mut per_slice = vec![Counts::default(); d];
    let mut total = Counts::default();
    for (i, (&t, &p)) in truth.iter().zip(pred).enumerate() {
        kt[0] += u64::from(t > 0 && p > 0);
        kt[1] += u64::from(t > 0);
        kt[2] += u64::from(p > 0);
        tu[0] += u64::from(t > 1 && p > 1);
        tu[1] += u64::from(t > 1);
        tu[2] += u64::from(p > 1);
        let c = &mut per_slice[i % d];
        let (t, p) = (usize::from(t), usize::from(p));
        c.truth[t] += 1;
        c.pred[p] += 1;
        if t == p {
            c.inter[t] += 1;
        }
    }
    for c in &per_slice {
        total.add(c);
    }
    let mean_present = |c: &Counts| {
        let v: Vec<f64> = (0..CLASSES).filter_map(|k| c.iou(k)).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let avg = |f: &dyn Fn(&Counts) -> bool| {
        let v: Vec<f64> = per_slice
            .iter()
            .filter(|c| f(c))
            .map(mean_present)
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    KitsScore {
        kidney_tumor_dice: dice(kt[0], kt[1], kt[2]),
        tumor_dice: dice(tu[0], tu[1], tu[2]),
        iou: [0, 1, 2].map(|k| total.iou(k).unwrap_or(f64::NAN)),
        slice_mean_iou: SliceMeanIou {
            all: avg(&|_| true),
            nonempty: avg(&|c| c.truth_has_foreground() || c.pred[1] + c.pred[2] > 0),
            truth_fg: avg(&|c| c.truth_has_foreground()),
        },
    }
}

/// Reads and scores two label files.
pub fn score_files(
    truth: &std::path::Path,
    pred: &std::path::Path,
    policy: LabelPolicy,
) -> Result<KitsScore, ScoreError> {
    let (t, ts) = labels_of(&Volume::read(truth)?, policy)?;
    let (p, ps) = labels_of(&Volume::read(pred)?, policy)?;
    if ts != ps {
        return Err(ScoreError::Shape {
            truth: ts,
            pred: ps,
        });
    }
    Ok(score(&t, &p, &ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_against_empty_is_nan_and_swapped_labels_score_zero() {
        let s = score(&[0; 8], &[0; 8], &[2, 2, 2]);
        assert!(s.kidney_tumor_dice.is_nan() && s.tumor_dice.is_nan());
        assert_eq!(s.iou[0], 1.0);
        assert!(s.iou[1].is_nan());
        assert_eq!(s.slice_mean_iou.all, 1.0);
        assert!(s.slice_mean_iou.truth_fg.is_nan());
        let s = score(&[1, 1, 2, 2], &[2, 2, 1, 1], &[1, 2, 2]);
        assert_eq!(s.kidney_tumor_dice, 1.0, "label > 0 agrees everywhere");
        assert_eq!(s.tumor_dice, 0.0);
        assert_eq!((s.iou[1], s.iou[2]), (0.0, 0.0));
    }

    #[test]
    fn four_d_probabilities_are_argmaxed_over_the_last_axis() {
        // 2 voxels x 3 channels, first index fastest: channel c of voxel i at i + 2c
        let probs = [0.1, 0.5, 0.7, 0.5, 0.2, 0.0];
        let (labels, shape) = labels_from(&probs, &[2, 1, 1, 3], LabelPolicy::Starter);
        assert_eq!(shape, [2, 1, 1]);
        assert_eq!(
            labels,
            [1, 0],
            "voxel 1 ties 0.5/0.5: the first maximum wins"
        );
        // a trailing size-1 axis is not a channel axis
        let (labels, shape) = labels_from(&[2.0, 1.0], &[2, 1, 1, 1], LabelPolicy::Starter);
        assert_eq!((labels, shape), (vec![2, 1], vec![2, 1, 1]));
    }

    #[test]
    fn float_labels_round_half_to_even_and_follow_the_label_policy() {
        let values = [0.5, 1.5, 2.5, 0.49, 3.0, -1.0];
        let (starter, _) = labels_from(&values, &[6, 1, 1], LabelPolicy::Starter);
        assert_eq!(starter, [0, 2, 2, 0, 2, 0]);
        let (rules, _) = labels_from(&values, &[6, 1, 1], LabelPolicy::Rules);
        assert_eq!(rules, [0, 2, 2, 0, 0, 0]);
    }

    #[test]
    fn slice_means_average_the_classes_present() {
        // two slices along the first axis (index % 2): slice 0 all background in both,
        // slice 1 truth kidney, prediction background
        let truth = [0, 1, 0, 1];
        let pred = [0, 0, 0, 0];
        let s = score(&truth, &pred, &[2, 2, 1]);
        // slice 0: background IoU 1; slice 1: background 0/2, kidney 0/2 -> 0
        assert_eq!(s.slice_mean_iou.all, 0.5);
        assert_eq!(s.slice_mean_iou.nonempty, 0.0);
        assert_eq!(s.slice_mean_iou.truth_fg, 0.0);
        assert_eq!(s.kidney_tumor_dice, 0.0);
    }
}
