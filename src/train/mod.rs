//! The training loop: a hand-written loop over burn (rather than burn-train's Learner),
//! for full control of data order, metrics, checkpoints and progress.
//!
//! Every epoch: train on the shuffled, augmented training slices; score the validation
//! slices (loss, the study's IoU, foreground IoU, per-class IoU and Dice); append a row
//! to the metrics; checkpoint model and optimiser state in the resume directory. A run
//! that finds a checkpoint continues after its epoch: data order and augmentation depend
//! only on (seed, epoch, position), so the result equals an uninterrupted run.

pub mod adam;
pub mod loss;
pub mod schedule;
pub mod select;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::store::{FloatCastAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::augment::{Augment, Mixup};
use crate::data::loader::{Batch, Patch, Sampling, Shuffle, SliceId, batch, epoch_order, prefetch};
use crate::data::slices::SliceStore;
use crate::metrics::SliceScores;
use crate::models::{ModelConfig, Network};
pub use adam::AdamSettings;
use loss::Loss;
use schedule::LearningRate;
use select::{Keep, Select};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot {action} `{path}`: {why}")]
    File {
        action: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{0}")]
    Data(String),
    #[error(
        "the training loss became {loss} at epoch {epoch}, step {step} (learning rate {lr}): training stopped there"
    )]
    NonFinite {
        epoch: usize,
        step: usize,
        loss: f32,
        lr: f64,
    },
}

impl crate::hint::Hint for TrainError {
    fn hint(&self) -> Option<String> {
        match self {
            TrainError::NonFinite { .. } => Some(
                "lower the learning rate (or add warmup-epochs); on the GPU with a 16-bit precision, try precision = \"f32\"".into(),
            ),
            _ => None,
        }
    }
}

fn file_err(action: &'static str, path: &Path) -> impl FnOnce(String) -> TrainError {
    let path = path.to_path_buf();
    move |why| TrainError::File { action, path, why }
}

/// Everything a fit needs.
pub struct Fit<'a> {
    pub model: ModelConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: &'a LearningRate,
    pub warmup_epochs: usize,
    pub adam: AdamSettings,
    pub loss: Loss,
    pub shuffle: Shuffle,
    pub augment: &'a Augment,
    /// Train on patches of the slices instead of whole slices.
    pub patch: Option<Patch>,
    /// Weights (safetensors) to start from.
    pub init_from: Option<PathBuf>,
    /// FCN: VGG16 encoder weights to load and freeze.
    pub pretrained: Option<PathBuf>,
    pub device: Device,
    pub seed: u64,
    /// The rule that says which epoch is best, and whether to keep that epoch's weights.
    pub select: Select,
    pub keep: Keep,
}

/// What a fit produced: one row per epoch and the epoch whose weights were kept.
#[derive(Debug, Clone)]
pub struct Fitted {
    pub rows: Vec<EpochRow>,
    /// 1-based epoch of `model.safetensors`.
    pub kept_epoch: usize,
}

/// One epoch's row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_iou: f64,
    pub val_iou_present: f64,
    pub val_fg_iou: f64,
    pub iou: [f64; 3],
    pub dice: [f64; 3],
}

impl EpochRow {
    pub const HEADER: &'static str = "epoch,lr,train_loss,val_loss,val_iou,val_iou_present,val_fg_iou,iou_background,iou_kidney,iou_tumor,dice_background,dice_kidney,dice_tumor";

    pub fn from_csv(line: &str) -> Option<EpochRow> {
        let v: Vec<f64> = line
            .split(',')
            .map(|c| {
                if c.is_empty() {
                    Ok(f64::NAN)
                } else {
                    c.parse()
                }
            })
            .collect::<Result<_, _>>()
            .ok()?;
        (v.len() == 13).then(|| EpochRow {
            epoch: v[0] as usize,
            lr: v[1],
            train_loss: v[2],
            val_loss: v[3],
            val_iou: v[4],
            val_iou_present: v[5],
            val_fg_iou: v[6],
            iou: [v[7], v[8], v[9]],
            dice: [v[10], v[11], v[12]],
        })
    }

    pub fn csv(&self) -> String {
        let f = |v: f64| {
            if v.is_nan() {
                String::new()
            } else {
                format!("{v}")
            }
        };
        let mut cols = vec![
            self.epoch.to_string(),
            f(self.lr),
            f(self.train_loss),
            f(self.val_loss),
            f(self.val_iou),
            f(self.val_iou_present),
            f(self.val_fg_iou),
        ];
        cols.extend(self.iou.iter().chain(&self.dice).map(|&v| f(v)));
        cols.join(",")
    }
}

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    epochs_done: usize,
    /// Metrics rows as CSV lines (JSON has no NaN).
    rows: Vec<String>,
    /// The best epoch so far by the selection rule, whose weights are `best.bpk`.
    #[serde(default)]
    best_epoch: Option<usize>,
}

/// Progress callback: (done, total, message).
pub type Report<'a> = &'a (dyn Fn(u64, u64, String) + Sync);

/// Trains, writing `model.safetensors` (the kept epoch's weights; with `keep = "best"`
/// also `last.safetensors`) and returning one row per epoch.
pub fn fit(
    f: &Fit,
    store: &SliceStore,
    train: &[SliceId],
    val: &[SliceId],
    out: &Path,
    resume: &Path,
    report: Report,
) -> Result<Fitted, TrainError> {
    if train.is_empty() || val.is_empty() {
        return Err(TrainError::Data(format!(
            "{} training and {} validation slices: both parts need slices",
            train.len(),
            val.len()
        )));
    }
    let device = f.device.clone().autodiff();
    // burn's backends keep one random generator per process, and draw a parameter's
    // initial value lazily, at its first use in the first forward pass: from seeding to
    // the end of that pass, a training holds this lock, so that trainings running at once
    // (`--devices`) each start from their own seed's weights, the same as alone
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let mut drawing = Some(
        INIT.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    device.seed(f.seed);
    let mut model: Network = f.model.init(&device);
    match &f.pretrained {
        Some(path) => {
            model = model
                .load_vgg16(path, &device)
                .map_err(file_err("load VGG16 weights from", path))?;
            tracing::info!(path = %path.display(), "VGG16 encoder loaded from pretrained weights, frozen");
        }
        None if matches!(model, Network::Fcn(_)) => {
            tracing::warn!("no `pretrained` VGG16 weights: the FCN encoder trains from scratch");
        }
        None => {}
    }
    if let Some(path) = &f.init_from {
        let mut st = weights_store(path, &device);
        model
            .load_from(&mut st)
            .map_err(|e| file_err("load weights from", path)(e.to_string()))?;
        tracing::info!(path = %path.display(), "initialised from weights");
    }
    let mut optim = f.adam.init();
    let state_path = resume.join("checkpoint.json");
    let mut rows: Vec<EpochRow> = Vec::new();
    // the best epoch so far and its weights (inference copy)
    let mut best: Option<(usize, Network)> = None;
    if let Ok(text) = std::fs::read_to_string(&state_path) {
        match resume_from(&text, resume, model.clone(), optim.clone()) {
            Ok((m, o, r, b)) => {
                (model, optim, rows, best) = (m, o, r, b);
                tracing::info!(epoch = rows.len(), "resumed from checkpoint");
            }
            Err(e) => tracing::warn!(
                "ignoring an unreadable checkpoint in `{}`: {e}",
                resume.display()
            ),
        }
    }
    let mut model = model.frozen_as(&f.model);
    let batches_per_epoch = train.len().div_ceil(f.batch_size) as u64;
    let total = batches_per_epoch * f.epochs as u64;
    for epoch in rows.len()..f.epochs {
        let lr = f.learning_rate.at(epoch, f.epochs, f.warmup_epochs);
        let order = epoch_order(train, f.shuffle, f.seed, epoch);
        let started = Instant::now();
        let sampling = Sampling {
            augment: f.augment,
            patch: f.patch,
            seed: f.seed,
            epoch,
            pool: train,
        };
        // the loader runs a batch or two ahead on a thread of its own
        let stepped = std::thread::scope(|scope| -> Result<_, TrainError> {
            let (mut model, mut optim, mut loss_sum) = (model, optim, 0.0);
            let batches = prefetch(scope, store, &order, f.batch_size, sampling, 2);
            for (b, data) in batches.into_iter().enumerate() {
                let data = data.map_err(|e| TrainError::Data(e.to_string()))?;
                let mixup = f.augment.mixup.as_ref();
                let loss = match mixup.and_then(|m| m.draw(f.seed, epoch, b, data.len)) {
                    None => {
                        let x = batch_tensor(store, &data, &data.images, &device);
                        f.loss.forward(model.forward(x), &data.labels)
                    }
                    Some((lambda, perm)) => {
                        let per = data.images.len() / data.len;
                        let mixed = Mixup::mix(&data.images, per, lambda, &perm);
                        let pixels = data.labels.len() / data.len;
                        let other: Vec<u8> = perm
                            .iter()
                            .flat_map(|&j| data.labels[j * pixels..][..pixels].iter().copied())
                            .collect();
                        let logits = model.forward(batch_tensor(store, &data, &mixed, &device));
                        f.loss.forward(logits.clone(), &data.labels) * lambda
                            + f.loss.forward(logits, &other) * (1.0 - lambda)
                    }
                };
                drawing.take(); // every weight is drawn
                let value = loss.clone().into_scalar::<f32>();
                if !value.is_finite() {
                    // a step on it would poison every weight: stop before it
                    return Err(TrainError::NonFinite {
                        epoch: epoch + 1,
                        step: b + 1,
                        loss: value,
                        lr,
                    });
                }
                loss_sum += f64::from(value) * data.len as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
                let done = epoch as u64 * batches_per_epoch + b as u64 + 1;
                let rate = ((b + 1) * f.batch_size).min(order.len()) as f64
                    / started.elapsed().as_secs_f64().max(1e-9);
                report(
                    done,
                    total,
                    format!(
                        "epoch {}/{} loss {:.4} {rate:.1} slices/s",
                        epoch + 1,
                        f.epochs,
                        loss_sum / ((b + 1) * f.batch_size).min(order.len()) as f64
                    ),
                );
            }
            Ok((model, optim, loss_sum))
        })?;
        let loss_sum;
        (model, optim, loss_sum) = stepped;
        let train_loss = loss_sum / order.len() as f64;
        let (val_loss, scores) = validate(&model.valid(), store, val, f.batch_size, &f.loss)?;
        let s = scores.summary();
        let row = EpochRow {
            epoch: epoch + 1,
            lr,
            train_loss,
            val_loss,
            val_iou: s.study_iou,
            val_iou_present: s.study_iou_present,
            val_fg_iou: s.fg_iou,
            iou: s.class_iou,
            dice: s.class_dice,
        };
        tracing::info!(
            epoch = epoch + 1,
            lr,
            train_loss,
            val_loss,
            val_iou = s.study_iou,
            val_fg_iou = s.fg_iou,
            kidney_dice = s.class_dice[1],
            seconds = started.elapsed().as_secs_f64(),
            "epoch"
        );
        let improved = f.select.better(
            f.select.value(&row),
            best.as_ref()
                .map_or(f64::NAN, |(e, _)| f.select.value(&rows[e - 1])),
        );
        rows.push(row);
        if improved {
            best = Some((epoch + 1, model.valid()));
        }
        save_checkpoint(&model, &optim, &rows, best.as_ref(), resume)?;
    }
    let last = model.valid();
    let epochs = rows.len();
    let (kept_epoch, kept) = match (f.keep, best) {
        (Keep::Best, Some((e, m))) => {
            save_weights(&last, &out.join("last.safetensors"))?;
            (e, m)
        }
        (Keep::Best, None) => {
            tracing::warn!(
                metric = f.select.metric,
                "no epoch has a finite selection metric: keeping the last epoch's weights"
            );
            save_weights(&last, &out.join("last.safetensors"))?;
            (epochs, last)
        }
        (Keep::Last, _) => (epochs, last),
    };
    save_weights(&kept, &out.join("model.safetensors"))?;
    Ok(Fitted { rows, kept_epoch })
}

/// Saves inference weights as canonical safetensors.
fn save_weights(model: &Network, path: &Path) -> Result<(), TrainError> {
    // f32 on disk whatever the precision trained in: evaluate and predict load any
    let mut st = SafetensorsStore::from_file(path.to_path_buf())
        .overwrite(true)
        .with_to_adapter(FloatCastAdapter::to(DType::F32));
    model
        .clone()
        .save_into(&mut st)
        .map_err(|e| file_err("save weights to", path)(e.to_string()))?;
    drop(st);
    canonical_safetensors(path).map_err(|e| file_err("rewrite", path)(e.to_string()))
}

/// Rewrites a safetensors header with its keys sorted: burn writes its metadata map in
/// hash order, which would make identical weights differ byte-wise between runs.
pub fn canonical_safetensors(path: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(|| bad("no header"))?
            .try_into()
            .expect("8 bytes"),
    ) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(bytes.get(8..8 + n).ok_or_else(|| bad("short header"))?)
            .map_err(|e| bad(&e.to_string()))?;
    let mut text = String::new();
    crate::files::canonical_json(&header, &mut text);
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    crate::files::write_atomic(path, &out)
}

/// A batch of `n` images `[n, channels, size, size]` as a tensor on `device`.
pub fn images_tensor_sized(
    images: &[f32],
    n: usize,
    channels: usize,
    size: usize,
    device: &Device,
) -> Tensor<4> {
    // in the device's precision (data arrives as f32; a no-op on an f32 device)
    Tensor::<4>::from_data(
        TensorData::new(images.to_vec(), [n, channels, size, size]),
        device,
    )
    .cast(device.settings().float_dtype)
}

/// `images` (a batch's, or a mix of them) as a tensor shaped like `data`'s images.
fn batch_tensor(store: &SliceStore, data: &Batch, images: &[f32], device: &Device) -> Tensor<4> {
    images_tensor_sized(images, data.len, store.meta.channels, data.size, device)
}

pub fn images_tensor(store: &SliceStore, images: &[f32], n: usize, device: &Device) -> Tensor<4> {
    let (c, s) = (store.meta.channels, store.meta.size);
    images_tensor_sized(images, n, c, s, device)
}

/// Loss and scores of `model` on `slices` (no augmentation, in store order).
pub fn validate(
    model: &Network,
    store: &SliceStore,
    slices: &[SliceId],
    batch_size: usize,
    loss: &Loss,
) -> Result<(f64, SliceScores), TrainError> {
    let device = model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(crate::backend::cpu);
    let mut scores = SliceScores::default();
    let mut loss_sum = 0.0;
    let plane = store.meta.size * store.meta.size;
    for ids in slices.chunks(batch_size) {
        let data = batch(store, ids, None).map_err(|e| TrainError::Data(e.to_string()))?;
        let logits = model.forward(images_tensor(store, &data.images, data.len, &device));
        loss_sum += f64::from(
            loss.forward(logits.clone(), &data.labels)
                .into_scalar::<f32>(),
        ) * data.len as f64;
        let pred = predict_labels(logits)?;
        for (t, p) in data.labels.chunks(plane).zip(pred.chunks(plane)) {
            scores.add_slice(t, p);
        }
    }
    Ok((loss_sum / slices.len().max(1) as f64, scores))
}

/// Weights (f32 on disk) to load into a network on `device`, cast to its precision.
fn weights_store(path: &Path, device: &Device) -> SafetensorsStore {
    let st = SafetensorsStore::from_file(path.to_path_buf());
    match device.settings().float_dtype {
        FloatDType::F16 => st.with_from_adapter(FloatCastAdapter::to(DType::F16)),
        _ => st,
    }
}

/// A trained network and its `model.json`, from a train artifact, on `device`.
pub fn load_network(
    dir: &Path,
    device: &Device,
) -> Result<(Network, crate::models::ModelFile), TrainError> {
    let path = dir.join(crate::models::ModelFile::FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| file_err("read", &path)(e.to_string()))?;
    let file: crate::models::ModelFile =
        serde_json::from_str(&text).map_err(|e| file_err("read", &path)(e.to_string()))?;
    let mut net = file.model.init(device);
    let weights = dir.join("model.safetensors");
    let mut st = weights_store(&weights, device);
    net.load_from(&mut st)
        .map_err(|e| file_err("load weights from", &weights)(e.to_string()))?;
    Ok((net, file))
}

/// Argmax over the class axis, as label maps `[n, h, w]` flattened.
pub fn predict_labels(logits: Tensor<4>) -> Result<Vec<u8>, TrainError> {
    let pred = logits
        .argmax(1)
        .try_into_vec_as::<i64>()
        .map_err(|e| TrainError::Data(format!("cannot read predictions: {e:?}")))?;
    Ok(pred.into_iter().map(|v| v.clamp(0, 2) as u8).collect())
}

type Resumed = (
    Network,
    burn::optim::ModuleOptimizer,
    Vec<EpochRow>,
    Option<(usize, Network)>,
);

fn resume_from(
    text: &str,
    resume: &Path,
    model: Network,
    optim: burn::optim::ModuleOptimizer,
) -> Result<Resumed, String> {
    let ck: Checkpoint = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let rows: Vec<EpochRow> = ck
        .rows
        .iter()
        .map(|l| EpochRow::from_csv(l).ok_or_else(|| format!("bad metrics row `{l}`")))
        .collect::<Result<_, _>>()?;
    if rows.len() != ck.epochs_done {
        return Err("metrics rows and epochs disagree".into());
    }
    let (m, o) = (
        resume.join(format!("model-{}.bpk", ck.epochs_done)),
        resume.join(format!("optim-{}.bpk", ck.epochs_done)),
    );
    let best = match ck.best_epoch {
        Some(e) if (1..=rows.len()).contains(&e) => Some((
            e,
            model
                .valid()
                .try_load_file(resume.join("best.bpk"))
                .map_err(|e| e.to_string())?,
        )),
        Some(e) => return Err(format!("best epoch {e} is not among the epochs done")),
        None => None,
    };
    let model = model.try_load_file(&m).map_err(|e| e.to_string())?;
    let optim = optim.load(&o).map_err(|e| e.to_string())?;
    Ok((model, optim, rows, best))
}

fn save_checkpoint(
    model: &Network,
    optim: &burn::optim::ModuleOptimizer,
    rows: &[EpochRow],
    best: Option<&(usize, Network)>,
    resume: &Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(resume).map_err(|e| file_err("create", resume)(e.to_string()))?;
    let n = rows.len();
    let (m, o) = (
        resume.join(format!("model-{n}.bpk")),
        resume.join(format!("optim-{n}.bpk")),
    );
    for p in [&m, &o] {
        let _ = std::fs::remove_file(p);
    }
    model
        .clone()
        .save_file(&m)
        .map_err(|e| file_err("write checkpoint", &m)(e.to_string()))?;
    optim
        .save(&o)
        .map_err(|e| file_err("write checkpoint", &o)(e.to_string()))?;
    // the best weights change only when an epoch improves on them
    if let Some((e, m)) = best.filter(|(e, _)| *e == n) {
        let p = resume.join("best.bpk");
        let _ = std::fs::remove_file(&p);
        m.clone()
            .save_file(&p)
            .map_err(|err| file_err("write checkpoint", &p)(format!("epoch {e}: {err}")))?;
    }
    let state = serde_json::to_vec(&Checkpoint {
        epochs_done: n,
        rows: rows.iter().map(EpochRow::csv).collect(),
        best_epoch: best.map(|(e, _)| *e),
    })
    .map_err(|e| TrainError::Data(e.to_string()))?;
    let path = resume.join("checkpoint.json");
    crate::files::write_atomic(&path, &state)
        .map_err(|e| file_err("write", &path)(e.to_string()))?;
    if n > 1 {
        for p in [
            resume.join(format!("model-{}.bpk", n - 1)),
            resume.join(format!("optim-{}.bpk", n - 1)),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// The Adam optimiser of the study's settings.
pub fn adam(betas: [f32; 2], epsilon: f32, weight_decay: f32) -> AdamSettings {
    AdamSettings {
        betas,
        epsilon,
        weight_decay,
    }
}
