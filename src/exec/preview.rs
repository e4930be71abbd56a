//! `kpipe plan`: what a run would do, and why each node would run.

use serde::Serialize;

use super::node_key;
use crate::cache::{Cache, LockFile, LockRecord};
use crate::graph::Plan;
use crate::stages::StageError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreviewStatus {
    Cached,
    Run,
}

/// One node of `kpipe plan`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct NodePreview {
    pub id: String,
    pub kind: String,
    /// Unknown (`null`) while an input has yet to run: the key depends on its output.
    pub key: Option<String>,
    pub status: PreviewStatus,
    pub reason: Option<String>,
}

/// Each node in plan order, cached or to run, with the reason. Entries are trusted by
/// their manifests here; `run` verifies their content.
pub fn preview(plan: &Plan, cache: &Cache) -> Result<Vec<NodePreview>, StageError> {
    let lock = LockFile::read(&LockFile::path_for(
        &plan.spec.file,
        plan.spec.profile.as_deref(),
    ))
    .unwrap_or_default();
    let mut digests: Vec<Option<String>> = vec![None; plan.len()];
    let mut out = Vec::new();
    for &i in plan.order() {
        let st = &plan.spec.stages[i];
        let key = node_key(plan, cache, i, &digests)?;
        let cached = key.as_ref().and_then(|k| cache.peek(&k.key));
        let (status, reason) = match (&key, &cached) {
            (Some(_), Some(entry)) => {
                digests[i] = Some(entry.manifest.output.clone());
                (PreviewStatus::Cached, None)
            }
            (None, _) => {
                let pending = plan
                    .dependencies(i)
                    .into_iter()
                    .find(|&d| digests[d].is_none())
                    .map(|d| plan.spec.stages[d].id.clone());
                (
                    PreviewStatus::Run,
                    Some(format!("input `{}` will run", pending.unwrap_or_default())),
                )
            }
            (Some(k), None) => {
                let params = st.stage.key_params();
                (
                    PreviewStatus::Run,
                    Some(why(
                        lock.nodes.get(&st.id),
                        st.stage.kind(),
                        &k.key,
                        &params,
                        &k.inputs,
                        &k.extra,
                    )),
                )
            }
        };
        out.push(NodePreview {
            id: st.id.clone(),
            kind: st.stage.kind().into(),
            key: key.map(|k| k.key),
            status,
            reason,
        });
    }
    if let Err(e) = cache.stat_cache().save() {
        tracing::warn!("cannot save the stat cache: {e}");
    }
    Ok(out)
}

fn why(
    last: Option<&LockRecord>,
    kind: &str,
    key: &str,
    params: &serde_json::Value,
    inputs: &std::collections::BTreeMap<String, String>,
    extra: &serde_json::Value,
) -> String {
    let Some(last) = last else {
        return "new stage: not in the lock file".into();
    };
    if last.key == key {
        return "missing entry: the lock file records this key but the cache does not hold it"
            .into();
    }
    if last.kind != kind {
        return format!("kind changed from `{}`", last.kind);
    }
    let mut changes = Vec::new();
    let changed = changed_keys(&last.params, params);
    if !changed.is_empty() {
        changes.push(format!("params changed: {}", changed.join(", ")));
    }
    let inputs_changed: Vec<String> = inputs
        .iter()
        .filter(|(id, d)| last.inputs.get(*id) != Some(d))
        .map(|(id, _)| format!("`{id}`"))
        .collect();
    if !inputs_changed.is_empty() || inputs.len() != last.inputs.len() {
        changes.push(format!(
            "changed input: {}",
            if inputs_changed.is_empty() {
                "inputs added or removed".into()
            } else {
                inputs_changed.join(", ")
            }
        ));
    }
    if &last.extra != extra {
        let files = changed_keys(&last.extra, extra);
        changes.push(if files.is_empty() {
            "declared dependencies changed".into()
        } else {
            format!("changed dependencies: {}", files.join(", "))
        });
    }
    if changes.is_empty() {
        "the pipeline seed or kpipe's cache format changed".into()
    } else {
        changes.join("; ")
    }
}

/// Top-level keys whose values differ, as `` `key` (old -> new) ``.
fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return if old == new {
            vec![]
        } else {
            vec![format!("{old} -> {new}")]
        };
    };
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| o.get(*k) != n.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| match v {
                None => "unset".to_string(),
                // content digests (a data file's) are told apart by their first digits
                Some(serde_json::Value::String(d))
                    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    format!("{}…", &d[..12])
                }
                Some(v) => v.to_string(),
            };
            format!("`{k}` ({} -> {})", show(o.get(k)), show(n.get(k)))
        })
        .collect()
}
