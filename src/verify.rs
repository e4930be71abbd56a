//! Reproducibility checks: `kpipe verify` recomputes a pipeline from scratch into a
//! scratch cache and compares every node's output digest with the lock file; `kpipe
//! verify --cache` re-hashes the existing cache and reports rot.
//!
//! Only what the lock file records can be checked: a node it does not record fails
//! ([`Verdict::Unlocked`]), as does a node that does not complete. Keys and digests are
//! location-free (content digests, paths relative to the data root), so a lock file
//! written on one machine verifies on another that has the same data anywhere.
//!
//! GPU training is not bit-reproducible (kernels sum in varying orders), so a node that
//! runs on the GPU (`backend = "gpu"`), or reads one that does, may differ in its bytes
//! and still pass: a train or evaluate node when each of its metrics (per-epoch
//! validation IoU and Dice, the evaluation summary: all in [0, 1]) is within the declared
//! tolerance of the locked result's, which must still be in the cache; a node without
//! metrics (sweep, report) when everything it reads passed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::cache::{Cache, CacheError, LockFile};
use crate::exec::{self, Outcome, Reporter, RunOptions};
use crate::graph::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Match,
    /// A GPU node (or one downstream of it) whose bytes differ but metrics agree.
    Tolerated,
    Mismatch,
    /// The node has no record in the lock file: nothing to check it against (a failure).
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
    /// The largest metric difference to the locked result (GPU nodes).
    pub drift: Option<f64>,
}

/// Recomputes every node of `plan` into a fresh cache beside `store` (the pipeline's
/// cache, where locked results are looked up) and compares; GPU nodes pass within
/// `gpu_tolerance`.
pub fn verify_pipeline(
    plan: &Plan,
    store: &Cache,
    opts: &RunOptions,
    reporter: &dyn Reporter,
    gpu_tolerance: f64,
) -> Result<Vec<NodeCheck>, CacheError> {
    let scratch_parent = store.root();
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
    let cache = Cache::open(scratch.path())?.sharing_stat_cache(store);
    let opts = RunOptions {
        record_lock: false,
        ..opts.clone()
    };
    let summary = exec::run(plan, &cache, &opts, reporter)?;
    let mut checks: Vec<NodeCheck> = summary
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
                Outcome::Ran { output, .. } | Outcome::Cached { output, .. } => {
                    Some(output.clone())
                }
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
                drift: None,
            }
        })
        .collect();
    // GPU nodes and what reads them, in plan order (dependencies first)
    let index: BTreeMap<&str, usize> = plan
        .spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut gpu_tainted = vec![false; plan.len()];
    let mut passed = vec![false; plan.len()];
    for (check, (_, outcome)) in checks.iter_mut().zip(&summary.outcomes) {
        let i = index[check.id.as_str()];
        let stage = &plan.spec.stages[i].stage;
        let deps = plan.dependencies(i);
        let on_gpu = stage.params()["backend"] == "gpu";
        gpu_tainted[i] = on_gpu || deps.iter().any(|&d| gpu_tainted[d]);
        if check.verdict == Verdict::Mismatch && gpu_tainted[i] {
            let locked_dir = lock.nodes.get(&check.id).and_then(|r| store.peek(&r.key));
            let actual_dir = match outcome {
                Outcome::Ran { key, .. } | Outcome::Cached { key, .. } => cache.peek(key),
                _ => None,
            };
            let metrics =
                |e: &Option<crate::cache::Entry>| e.as_ref().and_then(|e| metrics_of(&e.out()));
            check.verdict = match (metrics(&locked_dir), metrics(&actual_dir)) {
                (Some(a), Some(b)) => {
                    let d = drift(&a, &b);
                    check.drift = Some(d);
                    if d <= gpu_tolerance {
                        Verdict::Tolerated
                    } else {
                        Verdict::Mismatch
                    }
                }
                // no metrics of its own: it passes when everything GPU it reads passed
                (None, None) if !on_gpu && deps.iter().all(|&d| !gpu_tainted[d] || passed[d]) => {
                    Verdict::Tolerated
                }
                _ => Verdict::Mismatch,
            };
        }
        passed[i] = matches!(check.verdict, Verdict::Match | Verdict::Tolerated);
    }
    Ok(checks)
}

/// A node's metrics, all in [0, 1]: a train artifact's per-epoch validation IoU and Dice
/// (`metrics.csv`), or an evaluate artifact's summary (`summary.json`); `None` for others.
pub fn metrics_of(dir: &Path) -> Option<BTreeMap<String, f64>> {
    if let Ok(text) = std::fs::read_to_string(dir.join("metrics.csv")) {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next()?.split(',').collect();
        let mut out = BTreeMap::new();
        for (row, line) in lines.enumerate() {
            for (name, v) in header.iter().zip(line.split(',')) {
                let bounded = name.starts_with("val_iou")
                    || name.starts_with("val_fg_iou")
                    || name.starts_with("iou_")
                    || name.starts_with("dice_");
                if bounded {
                    out.insert(format!("{row}.{name}"), v.parse().unwrap_or(f64::NAN));
                }
            }
        }
        return Some(out);
    }
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut out = BTreeMap::new();
    flatten("", &v, &mut out);
    Some(out)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{prefix}{k}."), v, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}{i}."), v, out);
            }
        }
        // counts (slices, cases) are not metrics; null is NaN
        serde_json::Value::Number(n) if n.is_f64() => {
            out.insert(
                prefix.trim_end_matches('.').into(),
                n.as_f64().unwrap_or(f64::NAN),
            );
        }
        serde_json::Value::Null => {
            out.insert(prefix.trim_end_matches('.').into(), f64::NAN);
        }
        _ => {}
    }
}

/// The largest difference between two sets of metrics; infinite when they name
/// different metrics or one is NaN where the other is not.
pub fn drift(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> f64 {
    if a.len() != b.len() || a.keys().ne(b.keys()) {
        return f64::INFINITY;
    }
    a.values()
        .zip(b.values())
        .map(|(x, y)| match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (x - y).abs(),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

/// Re-hashes every entry of a cache: (key, stage, None if sound or the problem).
pub fn verify_cache(cache: &Cache) -> Result<Vec<(String, String, Option<String>)>, CacheError> {
    Ok(cache
        .entries()?
        .into_iter()
        .map(|e| {
            let problem = cache.verify(&e).err().map(|err| err.to_string());
            (e.manifest.key.clone(), e.manifest.stage.clone(), problem)
        })
        .collect())
}

impl NodeCheck {
    /// Whether the node reproduced its locked result (bit for bit, or within the GPU
    /// tolerance).
    pub fn passed(&self) -> bool {
        matches!(self.verdict, Verdict::Match | Verdict::Tolerated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_drift_is_the_largest_difference_of_bounded_metrics() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let header =
            "epoch,lr,train_loss,val_loss,val_iou,val_iou_present,val_fg_iou,iou_bg,dice_kidney";
        std::fs::write(
            a.path().join("metrics.csv"),
            format!("{header}\n0,0.001,1.5,1.2,0.50,0.4,0.3,0.9,0.6\n"),
        )
        .unwrap();
        // losses differ a lot (not bounded: ignored); val_fg_iou by 0.02
        std::fs::write(
            b.path().join("metrics.csv"),
            format!("{header}\n0,0.001,1.9,0.7,0.50,0.4,0.32,0.9,0.6\n"),
        )
        .unwrap();
        let (ma, mb) = (metrics_of(a.path()).unwrap(), metrics_of(b.path()).unwrap());
        assert_eq!(ma.len(), 5, "{ma:?}");
        assert!((drift(&ma, &mb) - 0.02).abs() < 1e-12);
        // an evaluation summary: NaN (null) agrees with NaN only; integers are counts
        std::fs::write(
            a.path().join("summary.json"),
            r#"{"study_iou": 0.8, "tumor_dice": null, "cases": 3}"#,
        )
        .unwrap();
        std::fs::remove_file(a.path().join("metrics.csv")).unwrap();
        let m = metrics_of(a.path()).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        let mut other = m.clone();
        assert_eq!(drift(&m, &other), 0.0);
        other.insert("tumor_dice".into(), 0.5);
        assert_eq!(drift(&m, &other), f64::INFINITY);
        other.remove("tumor_dice");
        assert_eq!(
            drift(&m, &other),
            f64::INFINITY,
            "a missing metric never passes"
        );
        assert!(metrics_of(tempfile::tempdir().unwrap().path()).is_none());
    }
}
