//! `kind = "load"`: a KiTS19-layout folder, or synthetic phantoms, to a case table.
//!
//! ```toml
//! [stages.load]
//! kind = "load"
//! path = "/data/kits19/data"     # source = "kits19" (the default): a KiTS19 folder
//! label-policy = "error"         # or "background": labels outside {0,1,2} become 0
//! limit = 40                     # optional: the first N cases only
//!
//! [profiles.synthetic.stages.load]
//! source = "synthetic"           # writes phantom cases as NIfTI first, then loads them
//! cases = 24
//! shape = [64, 128, 128]         # slices, rows, columns
//! ```
//!
//! The output is `cases.json` (id, paths, shape, spacing, label counts, content digests
//! of both volumes). Paths are relative to the data root: `data/` inside the artifact for
//! synthetic volumes, the `path` folder for KiTS19, which the executor hands to the
//! stages that read the table ([`Stage::data_root`]).
//!
//! Keys and artifacts do not depend on where the folder is: `path` stays out of the
//! parameters that enter the key (and the lock file), and the key covers the content
//! (BLAKE3) of `kits.json` and of both volumes of each case loaded, not their paths or
//! modification times. The same data copied elsewhere, or cloned with fresh mtimes, has
//! the same keys; edit one voxel and the stage runs again, and `kpipe plan` names the
//! file. The [`crate::cache::StatCache`] spares re-reading files whose stat is unchanged.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::data::kits::{self, CaseTable, LabelPolicy};
use crate::data::phantom::{self, PhantomSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    #[default]
    Kits19,
    Synthetic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Load {
    #[serde(default)]
    pub source: Source,
    /// The KiTS19 `data` folder (source = "kits19"), relative to the pipeline file. Not
    /// part of the key: the content of its files is.
    #[serde(default, skip_serializing)]
    pub path: Option<String>,
    /// Synthetic cases to generate.
    #[serde(default = "default_cases")]
    pub cases: usize,
    /// Synthetic volume shape (slices, rows, columns).
    #[serde(default = "default_shape")]
    pub shape: [usize; 3],
    #[serde(default)]
    pub label_policy: LabelPolicy,
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_cases() -> usize {
    24
}

fn default_shape() -> [usize; 3] {
    [64, 128, 128]
}

impl Load {
    fn folder(&self, ctx: &CheckContext) -> Option<PathBuf> {
        self.path.as_ref().map(|p| ctx.pipeline_dir.join(p))
    }
}

impl Stage for Load {
    const KIND: &'static str = "load";

    fn check(&self, ctx: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        match self.source {
            Source::Kits19 => match self.folder(ctx) {
                None => issues.push(
                    ParamIssue::new("path", "is required when `source = \"kits19\"`").hint(
                        "hint: `path = \"<KiTS19 data folder>\"`, or `source = \"synthetic\"`",
                    ),
                ),
                Some(p) if !p.is_dir() => issues.push(ParamIssue::new(
                    "path",
                    format!("`{}` is not a directory", p.display()),
                )),
                Some(_) => {}
            },
            Source::Synthetic => {
                if self.cases < 3 {
                    issues.push(ParamIssue::new(
                        "cases",
                        "at least 3 cases are needed to split 7:2:1",
                    ));
                }
                if self.shape.iter().any(|&s| !(8..=1024).contains(&s)) {
                    issues.push(ParamIssue::new(
                        "shape",
                        "each of (slices, rows, columns) must be in 8..=1024",
                    ));
                }
            }
        }
        if self.limit == Some(0) {
            issues.push(ParamIssue::new("limit", "must be at least 1"));
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        vec![]
    }

    fn key_material(&self, ctx: &CheckContext) -> Result<serde_json::Value, StageError> {
        let Some(folder) = self.folder(ctx).filter(|_| self.source == Source::Kits19) else {
            return Ok(serde_json::Value::Null);
        };
        let mut out = serde_json::Map::new();
        for (rel, path) in case_files(&folder, self.limit)? {
            let digest = if path.exists() {
                ctx.file_digest(&path)
                    .map_err(StageError::io("hash", &path))?
            } else {
                "missing".into()
            };
            out.insert(rel, digest.into());
        }
        Ok(out.into())
    }

    fn data_root(&self, ctx: &CheckContext) -> Option<PathBuf> {
        let folder = self.folder(ctx).filter(|_| self.source == Source::Kits19)?;
        std::path::absolute(&folder).ok()
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let warn = |m: String| tracing::warn!("{m}");
        let (root, source) = match self.source {
            Source::Synthetic => {
                let root = ctx.out.join("data");
                let spec = PhantomSpec {
                    cases: self.cases,
                    shape: self.shape,
                    seed: ctx.seed,
                };
                let total = self.cases as u64;
                ctx.report(0, total, "generating phantoms");
                phantom::write_dataset(&root, &spec, &|n| {
                    ctx.report(n as u64, total, "generating phantoms");
                })
                .map_err(StageError::other)?;
                (root, "synthetic")
            }
            Source::Kits19 => {
                let folder = self
                    .folder(&CheckContext {
                        pipeline_dir: ctx.pipeline_dir,
                        stat_cache: None,
                    })
                    .unwrap_or_default();
                (
                    std::path::absolute(&folder).map_err(StageError::io("resolve", &folder))?,
                    "kits19",
                )
            }
        };
        ctx.report(0, 1, "checking cases");
        let mut cases = match self.source {
            // phantoms are new files in the artifact: nothing to look up
            Source::Synthetic => kits::scan(&root, self.label_policy, &warn),
            Source::Kits19 => kits::scan_with(&root, self.label_policy, &warn, &|p| {
                ctx.stat_cache.digest(p)
            }),
        }
        .map_err(StageError::other)?;
        if let Some(limit) = self.limit {
            cases.truncate(limit);
        }
        for c in &mut cases {
            for p in [&mut c.imaging, &mut c.segmentation] {
                *p = p
                    .strip_prefix(&root)
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|_| p.clone());
            }
        }
        let table = CaseTable {
            source: source.into(),
            root: (self.source == Source::Synthetic).then(|| PathBuf::from("data")),
            cases,
            label_policy: self.label_policy,
        };
        let path = ctx.out.join(CaseTable::FILE);
        let text =
            serde_json::to_string_pretty(&table).map_err(|e| StageError::Failed(e.to_string()))?;
        std::fs::write(&path, text).map_err(StageError::io("write", &path))?;
        tracing::info!(cases = table.cases.len(), "loaded");
        Ok(())
    }
}

/// The files a KiTS19 folder's key covers, by path relative to the folder: `kits.json`
/// and both volumes of each case the stage loads (the first `limit` case folders with a
/// segmentation; folders without one are the KiTS19 test set, which load skips).
fn case_files(folder: &Path, limit: Option<usize>) -> Result<Vec<(String, PathBuf)>, StageError> {
    let mut out = Vec::new();
    let json = folder.join("kits.json");
    if json.exists() {
        out.push(("kits.json".to_string(), json));
    }
    let ids = kits::case_folders(folder).map_err(StageError::io("list", folder))?;
    let labelled = ids
        .iter()
        .filter(|id| folder.join(id).join("segmentation.nii.gz").exists());
    for id in labelled.take(limit.unwrap_or(usize::MAX)) {
        for f in ["imaging.nii.gz", "segmentation.nii.gz"] {
            out.push((format!("{id}/{f}"), folder.join(id).join(f)));
        }
    }
    Ok(out)
}
