//! `kind = "slice"`: CT volumes to 2-D axial slices for training.
//!
//! ```toml
//! [stages.slice]
//! kind = "slice"
//! input = "load"
//! window = [-79.0, 304.0]   # HU clip (the KiTS19 window nnU-Net and MLPerf use)
//! normalize = "unit"        # [0, 1] over the window; or "z-score" with `mean` and
//!                           # `std`, or without them: the foreground (kidney + tumor)
//!                           # statistics of the training cases, named by `fit-on`
//! fit-on = "split.train"    # z-score without mean/std: the cases the statistics come
//!                           # from (never test or eval cases: no leakage)
//! size = 256                # output slices are size x size
//! resize = "area"           # or "bilinear" (images); labels always nearest
//! non-square = "pad"        # or "stretch"
//! keep-empty = 1.0          # fraction of slices without kidney or tumor kept (seeded)
//! context = 0               # k neighbouring slices each side as extra channels (2.5D)
//! storage = "float32"       # or "float16" images (half the size)
//! ```
//!
//! The order of work is: HU window, normalisation, then padding and resizing. Cases run
//! in parallel (rayon), each holding one volume at a time, so memory does not grow with
//! the number of cases. See [`crate::data::slices`] for the layout written.

use std::io::Write;

use ndarray::{Array3, Array4};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::data::kits::CaseTable;
use crate::data::nifti::{ReadBuffers, Volume};
use crate::data::resample::Filter;
use crate::data::slices::{
    F16, NonSquare, Normalization, SliceMeta, SlicedCase, StorageType, prepare_case,
};
use crate::hint::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    #[default]
    Unit,
    ZScore,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Slice {
    pub input: StageRef,
    #[serde(default = "default_window")]
    pub window: [f64; 2],
    #[serde(default)]
    pub normalize: Normalize,
    #[serde(default)]
    pub mean: Option<f64>,
    #[serde(default)]
    pub std: Option<f64>,
    /// The split part whose cases the z-score statistics are fitted on.
    #[serde(default)]
    pub fit_on: Option<StageRef>,
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default = "default_filter")]
    pub resize: Filter,
    #[serde(default)]
    pub non_square: NonSquare,
    #[serde(default = "default_keep")]
    pub keep_empty: f64,
    #[serde(default)]
    pub context: usize,
    /// `"float32"` or `"float16"` images.
    #[serde(default)]
    pub storage: StorageType,
}

fn default_window() -> [f64; 2] {
    [-79.0, 304.0]
}
fn default_size() -> usize {
    256
}
fn default_filter() -> Filter {
    Filter::Area
}
fn default_keep() -> f64 {
    1.0
}

impl Stage for Slice {
    const KIND: &'static str = "slice";

    fn key_params(&self) -> serde_json::Value {
        super::omit_unset(
            serde_json::to_value(self).unwrap_or_default(),
            &[
                ("fit-on", serde_json::Value::Null),
                ("storage", serde_json::json!("float32")),
            ],
        )
    }

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if self.window[0].partial_cmp(&self.window[1]) != Some(std::cmp::Ordering::Less) {
            issues.push(ParamIssue::new(
                "window",
                "must be [low, high] with low < high",
            ));
        }
        if !(8..=2048).contains(&self.size) {
            issues.push(ParamIssue::new("size", "must be in 8..=2048"));
        }
        if !(0.0..=1.0).contains(&self.keep_empty) {
            issues.push(ParamIssue::new(
                "keep-empty",
                "must be a fraction in [0, 1]",
            ));
        }
        if self.context > 8 {
            issues.push(ParamIssue::new("context", "at most 8 neighbours each side"));
        }
        match (self.normalize, self.mean, self.std) {
            (Normalize::Unit, Some(_), _) | (Normalize::Unit, _, Some(_)) => {
                issues.push(ParamIssue::new(
                    "normalize",
                    "`mean` and `std` apply to `normalize = \"z-score\"` only",
                ));
            }
            (Normalize::ZScore, Some(_), None) | (Normalize::ZScore, None, Some(_)) => {
                issues.push(ParamIssue::new(
                    "normalize",
                    "give both `mean` and `std`, or neither (foreground statistics)",
                ));
            }
            (_, _, Some(s)) if s <= 0.0 => issues.push(ParamIssue::new("std", "must be positive")),
            _ => {}
        }
        match (self.normalize, self.mean, &self.fit_on) {
            (Normalize::ZScore, None, None) => issues.push(
                ParamIssue::new(
                    "normalize",
                    "z-score statistics need the cases they are fitted on",
                )
                .hint("hint: `fit-on = \"split.train\"` (training cases only), or give `mean` and `std`"),
            ),
            (Normalize::ZScore, None, Some(r)) if r.port() != Some("train") => issues.push(
                ParamIssue::new(
                    "fit-on",
                    format!("`{r}` is not a training part: statistics fitted on it would leak into training"),
                )
                .hint(format!("hint: `fit-on = \"{}.train\"`", r.stage())),
            ),
            (Normalize::ZScore, None, Some(_)) => {}
            (_, _, Some(_)) => issues.push(ParamIssue::new(
                "fit-on",
                "applies to `normalize = \"z-score\"` without `mean` and `std` only",
            )),
            _ => {}
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        let mut v = vec![("input".into(), &self.input)];
        if let Some(r) = &self.fit_on {
            v.push(("fit-on".into(), r));
        }
        v
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let input = ctx.input(&self.input)?;
        let table = CaseTable::read(input).map_err(StageError::other)?;
        let data = table
            .data_dir(input, ctx.data_root(&self.input))
            .map_err(StageError::other)?;
        let [lo, hi] = self.window;
        let normalization = match (self.normalize, self.mean, self.std) {
            (Normalize::Unit, _, _) => Normalization::Unit { lo, hi },
            (Normalize::ZScore, Some(mean), Some(std)) => {
                Normalization::ZScore { lo, hi, mean, std }
            }
            (Normalize::ZScore, _, _) => {
                let fit_on = self
                    .fit_on
                    .as_ref()
                    .ok_or_else(|| StageError::Failed("z-score statistics need `fit-on`".into()))?;
                let train = super::split::SplitFile::read(ctx.input(fit_on)?)?
                    .cases(fit_on, "train", None)?;
                ctx.report(0, train.len() as u64, "foreground statistics");
                let (mean, std) = foreground_stats(&table, &train, &data, lo, hi)?;
                tracing::info!(mean, std, "foreground statistics");
                Normalization::ZScore { lo, hi, mean, std }
            }
        };
        let total = table.cases.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        let results: Vec<(SlicedCase, Vec<String>)> = table
            .cases
            .par_iter()
            .map_init(ReadBuffers::default, |bufs, case| {
                let r = self.slice_case(ctx, &data, case, normalization, bufs);
                ctx.report(
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                    total,
                    "slicing",
                );
                r
            })
            .collect::<Result<_, _>>()?;
        let meta = SliceMeta {
            size: self.size,
            channels: 2 * self.context + 1,
            context: self.context,
            normalization,
            filter: self.resize,
            non_square: self.non_square,
            storage: self.storage,
            cases: results.iter().map(|(c, _)| c.clone()).collect(),
        };
        let path = ctx.out.join(SliceMeta::FILE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&meta).map_err(|e| StageError::Failed(e.to_string()))?,
        )
        .map_err(StageError::io("write", &path))?;
        let path = ctx.out.join("index.csv");
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path).map_err(StageError::io("create", &path))?,
        );
        let mut write = || -> std::io::Result<()> {
            writeln!(f, "case,row,slice,has_kidney,has_tumor")?;
            for (_, lines) in &results {
                for l in lines {
                    writeln!(f, "{l}")?;
                }
            }
            f.flush()
        };
        write().map_err(StageError::io("write", &path))?;
        Ok(())
    }
}

impl Slice {
    fn slice_case(
        &self,
        ctx: &RunContext,
        data: &std::path::Path,
        case: &crate::data::kits::CaseRecord,
        norm: Normalization,
        bufs: &mut ReadBuffers,
    ) -> Result<(SlicedCase, Vec<String>), StageError> {
        // the bytes decoded are the bytes the load stage hashed, or an error
        let img = Volume::read_checked(&data.join(&case.imaging), bufs, Some(&case.imaging_digest))
            .map_err(StageError::other)?;
        let seg = Volume::read_checked(
            &data.join(&case.segmentation),
            bufs,
            Some(&case.segmentation_digest),
        )
        .map_err(StageError::other)?;
        let shape = img.shape3().map_err(StageError::other)?;
        let p = prepare_case(
            &img,
            Some(&seg),
            norm,
            self.size,
            self.resize,
            self.non_square,
        )
        .map_err(StageError::other)?;
        img.recycle(bufs);
        seg.recycle(bufs);
        let (d, s, c) = (p.depth, self.size, 2 * self.context + 1);
        let plane = s * s;
        let mut kept = Vec::new();
        let mut lines = Vec::new();
        for k in 0..d {
            let (kidney, tumor) = (p.kidney[k], p.tumor[k]);
            if !(kidney || tumor)
                && self.keep_empty < 1.0
                && unit_draw(ctx.seed, &case.id, k) >= self.keep_empty
            {
                continue;
            }
            lines.push(format!(
                "{},{},{k},{},{}",
                case.id,
                kept.len(),
                u8::from(kidney),
                u8::from(tumor)
            ));
            kept.push(k);
        }
        let mut images = Vec::with_capacity(kept.len() * c * plane);
        let mut label_out = Vec::with_capacity(kept.len() * plane);
        for &k in &kept {
            for off in 0..c {
                let kk = (k + off).saturating_sub(self.context).min(d - 1);
                images.extend_from_slice(&p.images[kk * plane..(kk + 1) * plane]);
            }
            label_out.extend_from_slice(&p.labels[k * plane..(k + 1) * plane]);
        }
        let dir = ctx.out.join("cases").join(&case.id);
        std::fs::create_dir_all(&dir).map_err(StageError::io("create", &dir))?;
        let n = kept.len();
        let images = Array4::from_shape_vec((n, c, s, s), images)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        let label_out = Array3::from_shape_vec((n, s, s), label_out)
            .map_err(|e| StageError::Failed(e.to_string()))?;
        match self.storage {
            StorageType::Float32 => ndarray_npy::write_npy(dir.join("image.npy"), &images),
            StorageType::Float16 => ndarray_npy::write_npy(
                dir.join("image.npy"),
                &images.mapv(|v| F16(half::f16::from_f32(v))),
            ),
        }
        .map_err(StageError::other)?;
        ndarray_npy::write_npy(dir.join("labels.npy"), &label_out).map_err(StageError::other)?;
        let sliced = SlicedCase {
            id: case.id.clone(),
            rows: n,
            source_shape: shape,
            spacing: case.spacing,
            has_tumor: case.has_tumor(),
        };
        Ok((sliced, lines))
    }
}

/// A uniform draw in [0, 1) from (seed, case, slice): the same on every run and thread.
fn unit_draw(seed: u64, case: &str, slice: usize) -> f64 {
    let mut h = blake3::Hasher::new_derive_key("kpipe keep-empty v1");
    h.update(&seed.to_le_bytes());
    h.update(case.as_bytes());
    h.update(&(slice as u64).to_le_bytes());
    let v = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    (v >> 11) as f64 / (1u64 << 53) as f64
}

/// Mean and standard deviation of windowed HU over the kidney and tumor voxels of the
/// cases named `fit` (the training part) only.
fn foreground_stats(
    table: &CaseTable,
    fit: &[String],
    data: &std::path::Path,
    lo: f64,
    hi: f64,
) -> Result<(f64, f64), StageError> {
    let parts: Vec<(f64, f64, f64)> = table
        .cases
        .par_iter()
        .filter(|c| fit.contains(&c.id))
        .map(|case| {
            let read = |p: &std::path::Path, digest: &str| {
                Volume::read_checked(&data.join(p), &mut ReadBuffers::default(), Some(digest))
                    .map_err(StageError::other)
            };
            let img = read(&case.imaging, &case.imaging_digest)?;
            let seg = read(&case.segmentation, &case.segmentation_digest)?;
            let (labels, _) = seg.to_labels().map_err(StageError::other)?;
            let values = img.to_f64().map_err(StageError::other)?;
            let (mut n, mut s, mut s2) = (0.0, 0.0, 0.0);
            for (v, l) in values.iter().zip(labels.iter()) {
                if *l == 1 || *l == 2 {
                    let v = v.clamp(lo, hi);
                    n += 1.0;
                    s += v;
                    s2 += v * v;
                }
            }
            Ok((n, s, s2))
        })
        .collect::<Result<_, StageError>>()?;
    let (n, s, s2) = parts
        .iter()
        .fold((0.0, 0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
    if n == 0.0 {
        return Err(StageError::Advised(
            Message::new("no kidney or tumor voxels to compute z-score statistics from")
                .with_hint("give `mean` and `std`"),
        ));
    }
    let mean = s / n;
    Ok((mean, (s2 / n - mean * mean).max(1e-12).sqrt()))
}
