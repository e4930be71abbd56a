//! Losses: cross-entropy (optionally class-weighted), soft Dice of the foreground classes
//! present in the batch, and their weighted sum (the hybrid loss the study proposed as
//! future work).

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::activation::softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LossKind {
    #[default]
    #[serde(rename = "ce")]
    CrossEntropy,
    #[serde(rename = "dice")]
    Dice,
    #[serde(rename = "ce+dice")]
    CrossEntropyDice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub kind: LossKind,
    /// Weights of (cross-entropy, Dice) in `ce+dice`.
    pub weights: [f32; 2],
    pub class_weights: Option<[f32; 3]>,
}

impl Loss {
    /// The loss of `logits` `[n, 3, h, w]` against `labels` (`n * h * w`, row-major),
    /// computed in f32 whatever the precision of the logits (a 16-bit softmax and sums
    /// over a whole batch lose the small classes).
    pub fn forward(&self, logits: Tensor<4>, labels: &[u8]) -> Tensor<1> {
        let logits = logits.cast(FloatDType::F32);
        let [n, c, h, w] = logits.dims();
        let device = logits.device();
        let ce = || {
            let targets: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
            let targets =
                Tensor::<1, Int>::from_data(TensorData::new(targets, [n * h * w]), &device);
            let flat = logits.clone().permute([0, 2, 3, 1]).reshape([n * h * w, c]);
            CrossEntropyLossConfig::new()
                .with_weights(self.class_weights.map(|w| w.to_vec()))
                .init(&device)
                .forward(flat, targets)
        };
        // Soft Dice over the batch (nnU-Net's batch Dice) of the foreground classes that
        // the batch's truth shows, averaged over them: a class absent from the batch
        // adds nothing, so batches without tumor do not teach the network to never
        // predict it; a batch with no foreground has no Dice term.
        let dice = || {
            let mut onehot = vec![0.0f32; n * c * h * w];
            let mut present = [0.0f32; crate::models::CLASSES];
            for (i, &l) in labels.iter().enumerate() {
                let (b, p) = (i / (h * w), i % (h * w));
                onehot[(b * c + usize::from(l)) * h * w + p] = 1.0;
                present[usize::from(l).min(c - 1)] = 1.0;
            }
            present[0] = 0.0;
            let count: f32 = present.iter().sum();
            if count == 0.0 {
                return Tensor::<1>::zeros([1], &device);
            }
            let t = Tensor::<4>::from_data(TensorData::new(onehot, [n, c, h, w]), &device)
                .cast(FloatDType::F32);
            let p = softmax(logits.clone(), 1);
            let sum = |x: Tensor<4>| x.sum_dim(0).sum_dim(2).sum_dim(3).reshape([c]);
            let inter = sum(p.clone() * t.clone());
            let denom = sum(p) + sum(t);
            let dice = (inter * 2.0 + 1.0) / (denom + 1.0);
            let mask = Tensor::<1>::from_data(TensorData::new(present[..c].to_vec(), [c]), &device)
                .cast(FloatDType::F32);
            ((dice * mask).sum() * (-1.0 / count) + 1.0).reshape([1])
        };
        match self.kind {
            LossKind::CrossEntropy => ce(),
            LossKind::Dice => dice(),
            LossKind::CrossEntropyDice => ce() * self.weights[0] + dice() * self.weights[1],
        }
    }
}
