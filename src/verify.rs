//! Reproducibility checks: `kpipe verify` recomputes a pipeline from scratch into a
//! scratch cache and compares every node's output digest with the lock file; `kpipe
//! verify --cache` re-hashes the existing cache and reports rot.

use std::path::Path;

use serde::Serialize;

use crate::cache::{Cache, CacheError, LockFile};
use crate::exec::{self, Outcome, Reporter, RunOptions};
use crate::graph::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Match,
    Mismatch,
    /// The node has no record in the lock file.
    Unlocked,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeCheck {
    pub id: String,
    pub kind: String,
    pub locked: Option<String>,
    pub actual: Option<String>,
    pub verdict: Verdict,
}

/// Recomputes every node of `plan` into a fresh cache under `scratch_parent` and compares.
pub fn verify_pipeline(
    plan: &Plan,
    scratch_parent: &Path,
    opts: &RunOptions,
    reporter: &dyn Reporter,
) -> Result<Vec<NodeCheck>, CacheError> {
    let lock_path = LockFile::path_for(&plan.spec.file, plan.spec.profile.as_deref());
    let lock = LockFile::read(&lock_path)?;
    std::fs::create_dir_all(scratch_parent).map_err(|source| CacheError::Io {
        action: "create",
        path: scratch_parent.into(),
        source,
    })?;
    let scratch = tempfile::Builder::new()
        .prefix("verify-")
        .tempdir_in(scratch_parent)
        .map_err(|source| CacheError::Io {
            action: "create",
            path: scratch_parent.into(),
            source,
        })?;
    let cache = Cache::open(scratch.path())?;
    let opts = RunOptions {
        record_lock: false,
        ..opts.clone()
    };
    let summary = exec::run(plan, &cache, &opts, reporter)?;
    Ok(summary
        .outcomes
        .iter()
        .map(|(id, outcome)| {
            let kind = plan
                .spec
                .stages
                .iter()
                .find(|s| &s.id == id)
                .map(|s| s.stage.kind().to_string())
                .unwrap_or_default();
            let locked = lock.nodes.get(id).map(|r| r.output.clone());
            let actual = match outcome {
                Outcome::Ran { output, .. } | Outcome::Cached { output } => Some(output.clone()),
                _ => None,
            };
            let verdict = match (&locked, &actual) {
                (_, None) => Verdict::Failed,
                (None, Some(_)) => Verdict::Unlocked,
                (Some(l), Some(a)) if l == a => Verdict::Match,
                _ => Verdict::Mismatch,
            };
            NodeCheck {
                id: id.clone(),
                kind,
                locked,
                actual,
                verdict,
            }
        })
        .collect())
}

/// Re-hashes every entry of a cache: (key, stage, None if sound or the problem).
pub fn verify_cache(cache: &Cache) -> Result<Vec<(String, String, Option<String>)>, CacheError> {
    Ok(cache
        .entries()?
        .into_iter()
        .map(|e| {
            let problem = cache.get(&e.manifest.key).err().map(|err| err.to_string());
            (e.manifest.key.clone(), e.manifest.stage.clone(), problem)
        })
        .collect())
}
