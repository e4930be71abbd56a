//! Sweeps: a stage with a `sweep` table becomes one node per arm, plus a `sweep` node
//! that compares them.
//!
//! ```toml
//! [stages.train.sweep]
//! learning-rate = [1e-3, 1e-4, 1e-5, { piecewise = [[1e-3, 6], [1e-4, 9]] }]
//! select = { metric = "val-iou", mode = "max" }
//! ```
//!
//! Every key but `select` is an axis; arms are the grid's points. Arm ids read
//! `train[learning-rate=1e-3]` (axes sorted, comma-separated); each arm is an ordinary
//! node with its own cache key, so adding an arm runs only that arm. The stage's own id
//! (`train`) names the comparison node; `train.best` is the selected arm's artifact.

use std::collections::BTreeMap;

use toml::Value;

use super::diagnostics::Problems;
use super::document::Document;
use super::spec::report;
use crate::schema::{ParamIssue, join, parse_params};
use crate::stages::sweep::{Select, Sweep, SweepArm};
use crate::stages::{CheckContext, DynStage, Kind, Stage, StageRef};

#[allow(clippy::too_many_arguments)]
pub(crate) fn expand(
    doc: &Document,
    id: &str,
    kind: &Kind,
    mut base: toml::Table,
    sweep: Value,
    ctx: &CheckContext,
    problems: &mut Problems,
) -> Vec<(String, Box<dyn DynStage>)> {
    let prefix = format!("stages.{id}");
    if !kind.sweepable {
        problems.error(
            format!("stage `{id}` (kind `{}`) cannot be swept", kind.name),
            doc.key_at(&join(&prefix, "sweep")),
            "not sweepable",
            vec!["hint: sweeps vary the keys of `train` stages, whose per-epoch metrics the comparison ranks".into()],
        );
        return vec![];
    }
    let Value::Table(mut table) = sweep else {
        problems.error(
            "`sweep` must be a table of `key = [values]`",
            doc.value_at(&join(&prefix, "sweep")),
            "expected a table",
            vec![],
        );
        return vec![];
    };
    // One rule for both: each arm keeps its best epoch by the rule the sweep ranks by.
    let (select, at) = match (table.remove("select"), base.get("select").cloned()) {
        (Some(_), Some(_)) => {
            problems.error(
                format!("`select` is set both on `{id}` and in its sweep"),
                doc.key_at(&join(&prefix, "sweep.select")),
                "set twice",
                vec![
                    "hint: keep one: the arms keep their best epoch by the rule the sweep ranks by"
                        .into(),
                ],
            );
            return vec![];
        }
        (Some(v), None) => {
            base.insert("select".into(), v.clone());
            (Some(v), "sweep.select")
        }
        (None, v) => (v, "select"),
    };
    let select = match select {
        None => Some(Select::default()),
        Some(v) => {
            let (s, mut issues) = parse_params::<Select>(v);
            if let Some(Err(why)) = s.as_ref().map(Select::check) {
                issues.push(ParamIssue::new("metric", why));
            }
            let ok = issues.is_empty();
            report(doc, &join(&prefix, at), issues, problems);
            if !ok {
                // reported once here, not again by every arm
                base.remove("select");
            }
            s.filter(|_| ok)
        }
    };
    let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
    let mut seed_error = false;
    for (key, values) in table {
        match values {
            Value::Array(v) if key == "seed" && v.len() == 1 => {
                problems.error(
                    format!("`{prefix}.sweep.seed` has one value: replicates need two or more"),
                    doc.value_at(&format!("{prefix}.sweep.seed")),
                    "one seed",
                    vec![format!(
                        "hint: set `seed = {}` on the stage itself, or list more seeds",
                        label(&v[0])
                    )],
                );
                // still checked as an axis, so the arms' other problems are reported too
                seed_error = true;
                axes.push((key, v));
            }
            Value::Array(v) if !v.is_empty() => axes.push((key, v)),
            _ => problems.error(
                format!("`{prefix}.sweep.{key}` must be a non-empty array of values"),
                doc.value_at(&format!("{prefix}.sweep.{key}")),
                "expected `[value, ...]`",
                vec![],
            ),
        }
    }
    if axes.is_empty() {
        problems.error(
            format!("the sweep of `{id}` varies nothing"),
            doc.key_at(&join(&prefix, "sweep")),
            "no axes",
            vec!["hint: e.g. `learning-rate = [1e-3, 1e-4]`".into()],
        );
        return vec![];
    }
    // The grid: every combination of one value per axis.
    let mut points: Vec<Vec<(usize, usize)>> = vec![vec![]];
    for (a, (_, values)) in axes.iter().enumerate() {
        points = points
            .into_iter()
            .flat_map(|p| (0..values.len()).map(move |i| [p.clone(), vec![(a, i)]].concat()))
            .collect();
    }
    let mut out = Vec::new();
    let mut arms = Vec::new();
    let mut ok = true;
    let mut seen = std::collections::HashSet::new();
    for point in points {
        let mut params = base.clone();
        let mut labels = BTreeMap::new();
        for &(a, i) in &point {
            let (key, values) = &axes[a];
            params.insert(key.clone(), values[i].clone());
            labels.insert(key.clone(), label(&values[i]));
        }
        let arm_id = format!(
            "{id}[{}]",
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if out
            .iter()
            .any(|(o, _): &(String, Box<dyn DynStage>)| *o == arm_id)
        {
            problems.error(
                format!("two arms of `{id}` are both `{arm_id}`"),
                doc.key_at(&join(&prefix, "sweep")),
                "repeated value",
                vec![],
            );
            ok = false;
            continue;
        }
        match kind.configure(Value::Table(params), ctx) {
            Ok(stage) => out.push((arm_id.clone(), stage)),
            Err(issues) => {
                ok = false;
                let mapped = issues.into_iter().map(|mut issue| {
                    if let Some(&(a, i)) = point.iter().find(|(a, _)| {
                        issue.path == axes[*a].0
                            || issue.path.starts_with(&format!("{}.", axes[*a].0))
                    }) {
                        let rest = &issue.path[axes[a].0.len()..];
                        issue.path = format!("sweep.{}.{i}{rest}", axes[a].0);
                        issue.message = format!("{} (arm `{arm_id}`)", issue.message);
                    }
                    issue
                });
                // a problem with a key every arm shares is reported once
                let fresh = mapped
                    .filter(|i| seen.insert((i.path.clone(), i.message.clone())))
                    .collect();
                report(doc, &prefix, fresh, problems);
            }
        }
        arms.push(SweepArm {
            stage: StageRef(arm_id),
            params: labels,
        });
    }
    let Some(select) = select else { return vec![] };
    if !ok || seed_error {
        return vec![];
    }
    let sweep = Sweep { arms, select };
    if !<Sweep as Stage>::check(&sweep, ctx).is_empty() {
        return vec![];
    }
    out.push((id.to_string(), Box::new(sweep)));
    out
}

/// A short, readable rendering of a value for arm ids: `1e-3`, `unet`,
/// `piecewise((1e-3,6),(1e-4,9))`.
pub fn label(v: &Value) -> String {
    match v {
        Value::Float(f) if *f != 0.0 && (f.abs() < 0.1 || f.abs() >= 1e4) => format!("{f:e}"),
        Value::Float(f) => format!("{f}"),
        Value::Integer(i) => i.to_string(),
        Value::String(s) => s.clone(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Array(_) => format!("({})", label(i)),
                _ => label(i),
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Table(t) => t
            .iter()
            .map(|(k, v)| format!("{k}({})", label(v)))
            .collect::<Vec<_>>()
            .join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::label;

    #[test]
    fn labels_are_short_and_readable() {
        let v: toml::Table = toml::from_str(
            "a = 1e-3\nb = 0.5\nc = { piecewise = [[1e-3, 6], [1e-4, 9]] }\nd = \"unet\"",
        )
        .unwrap();
        assert_eq!(label(&v["a"]), "1e-3");
        assert_eq!(label(&v["b"]), "0.5");
        assert_eq!(label(&v["c"]), "piecewise((1e-3,6),(1e-4,9))");
        assert_eq!(label(&v["d"]), "unet");
    }
}
