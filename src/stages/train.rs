//! `kind = "train"`: train a segmentation network on the slices of one split part,
//! validating on another every epoch.
//!
//! ```toml
//! [stages.train]
//! kind = "train"
//! slices = "slice"            # the slice store
//! train = "split.train"       # the part to train on
//! validate = "split.test"     # the part scored every epoch (the study's `test`)
//! model = "unet"              # "unet", "fcn8s", "fcn8s-v2", "linknet"
//! base = 64                   # width of the first level
//! batch-norm = false
//! up-kernel = 2               # U-Net's transposed-conv kernel (the study's count fits 2)
//! epochs = 15
//! batch-size = 8
//! learning-rate = 1e-4        # or a schedule, see below
//! warmup-epochs = 0
//! betas = [0.9, 0.999]
//! epsilon = 1e-7
//! weight-decay = 0.0
//! loss = "ce"                 # "dice", "ce+dice"
//! loss-weights = [1.0, 1.0]   # (ce, dice) for "ce+dice"
//! class-weights = [1.0, 1.0, 1.0]
//! shuffle-buffer = 200        # the study's buffer; absent: a full shuffle per epoch
//! patch = { size = 64, foreground = 0.33 }  # train on 64x64 windows, a third of them
//!                             # centred on kidney or tumor (nnU-Net's rule); absent: whole
//!                             # slices. A multiple of 32; validation sees whole slices.
//! augment = { flip-horizontal = 0.5, flip-vertical = 0.5 }
//! init-from = "train"         # continue from another train stage's weights
//! pretrained = "vgg16.safetensors"  # FCN only: ImageNet VGG16 encoder weights
//!                             # (torchvision names), loaded and frozen
//! backend = "cpu"             # or "gpu" (burn-wgpu; build with `--features gpu`)
//! precision = "f32"           # GPU only: or "flex32" (f32 storage, f16 tiles), "f16"
//! keep = "best"               # weights of the best epoch by `select`; or "last"
//! select = { metric = "val-iou", mode = "max" }
//! seed = 7                    # optional: instead of the pipeline seed (replicates)
//! ```
//!
//! The arms of a sweep share the base stage's seed, so they start from the same weights
//! and see the same batches and augmentations; sweep `seed = [1, 2, 3]` for replicates.
//!
//! Schedules: [`crate::train::schedule`]; augmentation: [`crate::data::augment`].
//! Output: `model.safetensors` (the kept epoch's weights), `last.safetensors` (with
//! `keep = "best"`: the last epoch's), `model.json` (network and slice settings, for
//! predict and evaluate, and which epoch was kept), `metrics.csv` (one row per epoch). Checkpoints live outside the cache entry, in the
//! resume directory, until the stage succeeds.

use serde::{Deserialize, Serialize};

use super::split::SplitFile;
use super::{CheckContext, Inputs, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::backend::{self, BackendKind, Precision};
use crate::data::augment::Augment;
use crate::data::loader::{Patch, Shuffle, slices_of};
use crate::data::slices::SliceStore;
use crate::hint::Message;
use crate::models::{KeptEpoch, ModelConfig, ModelFile, ModelKind};
use crate::train::loss::{Loss, LossKind};
use crate::train::schedule::LearningRate;
use crate::train::select::{Keep, Select};
use crate::train::{EpochRow, Fit, adam, fit};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Train {
    pub slices: StageRef,
    pub train: StageRef,
    pub validate: StageRef,
    #[serde(default = "default_model")]
    pub model: ModelKind,
    #[serde(default = "default_base")]
    pub base: usize,
    #[serde(default)]
    pub batch_norm: bool,
    #[serde(default = "default_up_kernel")]
    pub up_kernel: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: LearningRate,
    #[serde(default)]
    pub warmup_epochs: usize,
    #[serde(default = "default_betas")]
    pub betas: [f32; 2],
    #[serde(default = "default_epsilon")]
    pub epsilon: f32,
    #[serde(default)]
    pub weight_decay: f32,
    #[serde(default)]
    pub loss: LossKind,
    #[serde(default = "default_loss_weights")]
    pub loss_weights: [f32; 2],
    #[serde(default)]
    pub class_weights: Option<[f32; 3]>,
    #[serde(default)]
    pub shuffle_buffer: Option<usize>,
    #[serde(default)]
    pub augment: Augment,
    #[serde(default)]
    pub patch: Option<Patch>,
    #[serde(default)]
    pub init_from: Option<StageRef>,
    #[serde(default)]
    pub backend: BackendKind,
    /// The GPU backend's float precision ("f32", "flex32", "f16"); the CPU computes in f32.
    #[serde(default)]
    pub precision: Precision,
    /// Cross-validation fold of a `folds = k` split (`split.test` is fold i).
    #[serde(default)]
    pub fold: Option<usize>,
    /// FCN: VGG16 encoder weights (safetensors, torchvision names), loaded and frozen.
    #[serde(default)]
    pub pretrained: Option<std::path::PathBuf>,
    /// A seed of its own instead of the pipeline's (sweep it for replicates).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Which epoch's weights `model.safetensors` holds: the best by `select`, or the last.
    #[serde(default)]
    pub keep: Keep,
    /// The rule for the best epoch (a sweep's `select` sets it for every arm).
    #[serde(default)]
    pub select: Select,
}

fn default_model() -> ModelKind {
    ModelKind::Unet
}
fn default_base() -> usize {
    64
}
fn default_up_kernel() -> usize {
    2
}
fn default_epochs() -> usize {
    15
}
fn default_batch() -> usize {
    8
}
fn default_lr() -> LearningRate {
    LearningRate::Constant(1e-4)
}
fn default_betas() -> [f32; 2] {
    [0.9, 0.999]
}
fn default_epsilon() -> f32 {
    1e-7
}
fn default_loss_weights() -> [f32; 2] {
    [1.0, 1.0]
}

impl Stage for Train {
    const KIND: &'static str = "train";
    const SWEEPABLE: bool = true;

    fn backend(&self) -> Option<BackendKind> {
        Some(self.backend)
    }

    fn key_params(&self) -> serde_json::Value {
        super::omit_unset(
            serde_json::to_value(self).unwrap_or_default(),
            &[
                ("fold", serde_json::Value::Null),
                ("precision", serde_json::json!("f32")),
                ("pretrained", serde_json::Value::Null),
                ("patch", serde_json::Value::Null),
                ("seed", serde_json::Value::Null),
            ],
        )
    }

    fn check(&self, ctx: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if let Some(p) = &self.pretrained {
            if !matches!(self.model, ModelKind::Fcn8s | ModelKind::Fcn8sV2) {
                issues.push(ParamIssue::new(
                    "pretrained",
                    "pretrained VGG16 weights fit `fcn8s` and `fcn8s-v2` only",
                ));
            } else if self.batch_norm {
                issues.push(ParamIssue::new(
                    "pretrained",
                    "VGG16's weights have no batch norm: set `batch-norm = false`",
                ));
            }
            if !ctx.pipeline_dir.join(p).is_file() {
                issues.push(ParamIssue::new(
                    "pretrained",
                    format!("no file `{}`", ctx.pipeline_dir.join(p).display()),
                ));
            }
        }
        for (key, r) in [("train", &self.train), ("validate", &self.validate)] {
            if r.port().is_none() {
                issues.push(ParamIssue::new(
                    key,
                    format!("reference a split part, like `{}.train`", r.stage()),
                ));
            }
        }
        if self.base < 2 || self.base > 256 {
            issues.push(ParamIssue::new("base", "must be in 2..=256"));
        }
        if self.model == ModelKind::Linknet && !self.base.is_multiple_of(4) {
            issues.push(ParamIssue::new(
                "base",
                "LinkNet's decoder divides widths by 4: use a multiple of 4",
            ));
        }
        if !matches!(self.up_kernel, 2 | 3) {
            issues.push(ParamIssue::new("up-kernel", "must be 2 or 3"));
        }
        if self.epochs == 0 {
            issues.push(ParamIssue::new("epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            issues.push(ParamIssue::new("batch-size", "must be at least 1"));
        }
        if let Some(why) = self.precision.unsupported_on(self.backend) {
            issues.push(ParamIssue::new("precision", why));
        }
        if let Some(why) = self.learning_rate.check() {
            issues.push(ParamIssue::new("learning-rate", why));
        }
        if self.shuffle_buffer == Some(0) {
            issues.push(ParamIssue::new("shuffle-buffer", "must be at least 1"));
        }
        if let Some(why) = self.patch.as_ref().and_then(Patch::check) {
            issues.push(ParamIssue::new("patch", why));
        }
        for (k, why) in self.augment.check() {
            issues.push(ParamIssue::new(format!("augment.{k}"), why));
        }
        if let Err(why) = self.select.check() {
            issues.push(ParamIssue::new("select.metric", why));
        }
        issues
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The pretrained weights' digest: new weights under the same name retrain.
    fn key_material(&self, ctx: &CheckContext) -> Result<serde_json::Value, StageError> {
        let Some(p) = &self.pretrained else {
            return Ok(serde_json::Value::Null);
        };
        let path = ctx.pipeline_dir.join(p);
        let digest = crate::cache::digest::tree_digest(&path)
            .map_err(StageError::io("hash pretrained weights", &path))?;
        Ok(serde_json::json!({ "pretrained": digest.hex }))
    }

    fn check_inputs(&self, input: &Inputs<'_>) -> Vec<ParamIssue> {
        let mut issues = super::split::check_fold(self.fold, &self.train, input);
        let slice_size = input(&self.slices)
            .and_then(|st| st.params().get("size").and_then(serde_json::Value::as_u64));
        if let (Some(p), Some(size)) = (self.patch, slice_size) {
            // every network's input size must be a multiple of this
            let m = ModelConfig::SIZE_MULTIPLE;
            if p.size as u64 > size || !p.size.is_multiple_of(m) {
                issues.push(ParamIssue::new(
                    "patch.size",
                    format!(
                        "a patch of {} does not fit `{}`'s slices of {size}: it must be at most the slice size and a multiple of {m}",
                        p.size,
                        self.slices.stage()
                    ),
                ));
            }
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        let mut v = vec![
            ("slices".into(), &self.slices),
            ("train".into(), &self.train),
            ("validate".into(), &self.validate),
        ];
        if let Some(r) = &self.init_from {
            v.push(("init-from".into(), r));
        }
        v
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let store = SliceStore::open(ctx.input(&self.slices)?).map_err(StageError::other)?;
        let part = |r: &StageRef| -> Result<Vec<String>, StageError> {
            SplitFile::read(ctx.input(r)?)?.cases(r, "train", self.fold)
        };
        let (train, val) = (
            slices_of(&store, &part(&self.train)?).map_err(StageError::Failed)?,
            slices_of(&store, &part(&self.validate)?).map_err(StageError::Failed)?,
        );
        let model = ModelConfig {
            kind: self.model,
            in_channels: store.meta.channels,
            base: self.base,
            batch_norm: self.batch_norm,
            up_kernel: self.up_kernel,
            freeze_encoder: self.pretrained.is_some(),
        };
        if !store.meta.size.is_multiple_of(model.size_multiple()) {
            let m = model.size_multiple();
            return Err(StageError::Advised(
                Message::new(format!(
                    "slice size {} is not a multiple of {m}, which {} needs",
                    store.meta.size,
                    self.model.name(),
                ))
                .with_hint(format!("set the slice stage's `size` to a multiple of {m}")),
            ));
        }
        let init_from = match &self.init_from {
            Some(r) => Some(ctx.input(r)?.join("model.safetensors")),
            None => None,
        };
        let device = backend::device(self.backend, ctx.device, self.precision)
            .map_err(StageError::Advised)?;
        let job = Fit {
            model: model.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: &self.learning_rate,
            warmup_epochs: self.warmup_epochs,
            adam: adam(self.betas, self.epsilon, self.weight_decay),
            loss: Loss {
                kind: self.loss,
                weights: self.loss_weights,
                class_weights: self.class_weights,
            },
            shuffle: self.shuffle_buffer.map_or(Shuffle::Full, Shuffle::Buffer),
            augment: &self.augment,
            patch: self.patch,
            init_from,
            pretrained: self.pretrained.as_ref().map(|p| ctx.pipeline_dir.join(p)),
            device,
            seed: ctx.seed,
            select: self.select.clone(),
            keep: self.keep,
        };
        tracing::info!(
            model = self.model.name(),
            train = train.len(),
            validate = val.len(),
            "training"
        );
        let fitted = fit(
            &job,
            &store,
            &train,
            &val,
            ctx.out,
            ctx.resume,
            &|d, t, m| ctx.report(d, t, m),
        )
        .map_err(StageError::other)?;
        let rows = &fitted.rows;
        let mut csv = String::from(EpochRow::HEADER);
        csv.push('\n');
        for r in rows {
            csv += &r.csv();
            csv.push('\n');
        }
        write(&ctx.out.join("metrics.csv"), csv.as_bytes())?;
        let kept = &rows[fitted.kept_epoch - 1];
        let file = ModelFile {
            model,
            slices: store.meta.clone(),
            kept: Some(KeptEpoch {
                epoch: fitted.kept_epoch,
                of: rows.len(),
                keep: match self.keep {
                    Keep::Best => "best",
                    Keep::Last => "last",
                }
                .into(),
                metric: self.select.metric.clone(),
                value: Some(self.select.value(kept)).filter(|v| v.is_finite()),
            }),
        };
        write(
            &ctx.out.join(ModelFile::FILE),
            &serde_json::to_vec_pretty(&file).map_err(|e| StageError::Failed(e.to_string()))?,
        )?;
        Ok(())
    }
}

fn write(path: &std::path::Path, bytes: &[u8]) -> Result<(), StageError> {
    std::fs::write(path, bytes).map_err(StageError::io("write", path))
}
