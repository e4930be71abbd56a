//! The second pass: a merged [`Document`] to a validated [`PipelineSpec`].

use std::path::{Path, PathBuf};

use codespan_reporting::diagnostic::{Diagnostic, Label};
use serde::Deserialize;
use toml::Value;

use super::diagnostics::{ConfigError, Located, Problems, Sources};
use super::document::{Document, Override, stage_hint};
use super::resources::Resources;
use crate::schema::{ParamIssue, closest, join, parse_params};
use crate::stages::{self, CheckContext, DynStage, StageRef};

/// A pipeline whose every stage is checked: ready to be compiled into a [`crate::graph::Plan`].
pub struct PipelineSpec {
    pub name: String,
    pub seed: u64,
    /// The pipeline file as given, and its directory.
    pub file: PathBuf,
    pub dir: PathBuf,
    pub profile: Option<String>,
    /// Stages sorted by id.
    pub stages: Vec<StageSpec>,
}

/// One checked stage.
pub struct StageSpec {
    pub id: String,
    /// Seed of this stage: from the pipeline seed (or the stage's own `seed` key) and the
    /// id, without a sweep arm's `[...]`, never from the clock.
    pub seed: u64,
    pub stage: Box<dyn DynStage>,
    /// What a Slurm job of the stage asks for (not in the key).
    pub resources: Resources,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Header {
    name: String,
    #[serde(default)]
    seed: u64,
    #[serde(default = "format_version")]
    version: i64,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
}

fn format_version() -> i64 {
    super::FORMAT_VERSION
}

/// Reads, merges and checks a pipeline file; every problem is reported at once.
pub fn load(
    file: &Path,
    profile: Option<&str>,
    overrides: &[Override],
) -> Result<PipelineSpec, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigError::plain(
            format!("cannot read pipeline file `{}`: {e}", file.display()),
            vec![],
        )
    })?;
    let mut sources = Sources::default();
    let mut problems = Problems::default();
    let name = file.display().to_string();
    let doc = Document::load(
        &name,
        &text,
        profile,
        overrides,
        &mut sources,
        &mut problems,
    );
    let spec = doc.and_then(|doc| {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        check(&doc, file, &dir, profile, &mut problems)
    });
    match spec {
        Some(spec) if problems.is_empty() => Ok(spec),
        _ => Err(ConfigError::new(sources, problems.list)),
    }
}

fn check(
    doc: &Document,
    file: &Path,
    dir: &Path,
    profile: Option<&str>,
    problems: &mut Problems,
) -> Option<PipelineSpec> {
    for key in doc.root.keys() {
        if key != "pipeline" && key != "stages" {
            problems.error(
                format!("unknown top-level key `{key}`"),
                doc.key_at(key),
                "unknown key",
                vec!["hint: a pipeline file holds `[pipeline]`, `[stages.<id>]` and `[profiles.<name>]` tables".into()],
            );
        }
    }
    let header = match doc.root.get("pipeline") {
        None => {
            problems.error(
                "missing `[pipeline]` table",
                None,
                "",
                vec!["hint: add `[pipeline]` with `name` and `seed`".into()],
            );
            None
        }
        Some(v) => {
            let (header, issues) = parse_params::<Header>(v.clone());
            report(doc, "pipeline", issues, problems);
            header
        }
    };
    if let Some(h) = &header
        && h.version != super::FORMAT_VERSION
    {
        problems.error(
            format!("unsupported pipeline format version {}", h.version),
            doc.value_at("pipeline.version"),
            format!("this kpipe reads version {}", super::FORMAT_VERSION),
            vec![],
        );
    }
    let ctx = CheckContext {
        pipeline_dir: dir,
        stat_cache: None,
    };
    let mut stages = Vec::new();
    match doc.root.get("stages") {
        Some(Value::Table(table)) => {
            for (id, value) in table {
                let resources = resources_of(doc, id, value, problems);
                for (id, stage) in check_stage(doc, id, value, &ctx, problems) {
                    stages.push(StageSpec {
                        id,
                        seed: 0,
                        stage,
                        resources: resources.clone(),
                    });
                }
            }
        }
        Some(_) => problems.error(
            "`stages` must be a table",
            doc.value_at("stages"),
            "expected `[stages.<id>]` tables",
            vec![],
        ),
        None => problems.error(
            "the pipeline has no stages",
            None,
            "",
            vec!["hint: add a `[stages.<id>]` table".into()],
        ),
    }
    stages.sort_by(|a, b| a.id.cmp(&b.id));
    let all_ids: Vec<&str> = match doc.root.get("stages") {
        Some(Value::Table(t)) => t.keys().map(String::as_str).collect(),
        _ => vec![],
    };
    check_references(doc, &stages, &all_ids, problems);
    check_inputs(doc, &stages, problems);
    let header = header?;
    for s in &mut stages {
        // Arms of a sweep share their base stage's seed (paired arms): they differ only
        // in the swept keys, unless `seed` itself is swept (replicates).
        let base = s.id.split('[').next().unwrap_or(&s.id);
        s.seed = stage_seed(s.stage.seed().unwrap_or(header.seed), base);
    }
    Some(PipelineSpec {
        name: header.name,
        seed: header.seed,
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        profile: profile.map(str::to_string),
        stages,
    })
}

fn check_stage(
    doc: &Document,
    id: &str,
    value: &Value,
    ctx: &CheckContext,
    problems: &mut Problems,
) -> Vec<(String, Box<dyn DynStage>)> {
    let path = format!("stages.{id}");
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        problems.error(
            format!("invalid stage id `{id}`"),
            doc.key_at(&path),
            "ids use letters, digits, `-` and `_`",
            vec!["hint: `.` separates a stage from its output in references, so ids cannot contain it".into()],
        );
        return vec![];
    }
    let Value::Table(table) = value else {
        problems.error(
            format!("stage `{id}` must be a table"),
            doc.value_at(&path),
            "expected a table",
            vec![],
        );
        return vec![];
    };
    let kinds: Vec<&str> = stages::KINDS.iter().map(|k| k.name).collect();
    let kind_hint = format!(
        "hint: kinds are {}",
        kinds
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let kind = match table.get("kind") {
        Some(Value::String(k)) => match stages::kind(k) {
            Some(kind) => kind,
            None => {
                let hint = closest(k, kinds.iter().copied())
                    .map_or(kind_hint, |c| format!("hint: did you mean `{c}`?"));
                problems.error(
                    format!("unknown stage kind `{k}`"),
                    doc.value_at(&join(&path, "kind")),
                    "unknown kind",
                    vec![hint],
                );
                return vec![];
            }
        },
        Some(_) => {
            problems.error(
                "`kind` must be a string",
                doc.value_at(&join(&path, "kind")),
                "expected a string",
                vec![kind_hint],
            );
            return vec![];
        }
        None => {
            problems.error(
                format!("stage `{id}` has no `kind`"),
                doc.key_at(&path),
                "missing `kind`",
                vec![kind_hint],
            );
            return vec![];
        }
    };
    let mut params = table.clone();
    params.remove("kind");
    params.remove("resources"); // the executor's, see `resources_of`
    if let Some(sweep) = params.remove("sweep") {
        return super::sweep::expand(doc, id, kind, params, sweep, ctx, problems);
    }
    match kind.configure(Value::Table(params), ctx) {
        Ok(stage) => vec![(id.to_string(), stage)],
        Err(issues) => {
            report(doc, &path, issues, problems);
            vec![]
        }
    }
}

/// A stage's `resources` table, checked (the default when it has none or a bad one).
fn resources_of(doc: &Document, id: &str, value: &Value, problems: &mut Problems) -> Resources {
    let Some(r) = value.get("resources") else {
        return Resources::default();
    };
    let (parsed, mut issues) = parse_params::<Resources>(r.clone());
    if let Some(p) = &parsed {
        issues.extend(p.check());
    }
    report(doc, &format!("stages.{id}.resources"), issues, problems);
    parsed.unwrap_or_default()
}

pub(crate) fn report(
    doc: &Document,
    prefix: &str,
    issues: Vec<ParamIssue>,
    problems: &mut Problems,
) {
    for issue in issues {
        let path = join(prefix, &issue.path);
        let (at, label) = if issue.on_key {
            (doc.key_at(&path), "unknown key")
        } else {
            (doc.value_at(&path), "here")
        };
        let notes = issue.hint.into_iter().collect();
        problems.error(format!("`{path}`: {}", issue.message), at, label, notes);
    }
}

/// The rules between a stage and those it reads ([`crate::stages::Stage::check_inputs`]);
/// a sweep arm's problem points into its base stage's `sweep` table.
fn check_inputs(doc: &Document, stages: &[StageSpec], problems: &mut Problems) {
    let input = |r: &StageRef| {
        stages
            .iter()
            .find(|t| t.id == r.stage())
            .map(|t| t.stage.as_ref())
    };
    for s in stages {
        let issues = s.stage.check_inputs(&input);
        let path = match s.id.split_once('[') {
            Some((base, _)) => format!("stages.{base}.sweep"),
            None => format!("stages.{}", s.id),
        };
        report(doc, &path, issues, problems);
    }
}

/// Unknown references and cycles between stages.
fn check_references(
    doc: &Document,
    stages: &[StageSpec],
    all_ids: &[&str],
    problems: &mut Problems,
) {
    let valid: Vec<String> = stages
        .iter()
        .flat_map(|s| {
            std::iter::once(s.id.clone()).chain(
                s.stage
                    .outputs()
                    .iter()
                    .map(move |o| format!("{}.{o}", s.id)),
            )
        })
        .collect();
    let mut edges: Vec<(usize, usize, Option<Located>)> = Vec::new();
    for (to, s) in stages.iter().enumerate() {
        for (param, r) in s.stage.inputs() {
            let at = doc.value_at(&format!("stages.{}.{param}", s.id)).cloned();
            let Some(from) = stages.iter().position(|t| t.id == r.stage()) else {
                if all_ids.contains(&r.stage()) {
                    continue; // the referenced stage has its own errors
                }
                let mut hint = stage_hint(r.stage(), all_ids);
                if !valid.is_empty() {
                    hint = format!(
                        "{hint}\nhint: valid references: {}",
                        valid
                            .iter()
                            .map(|v| format!("`{v}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                problems.error(
                    format!("unknown reference `{r}` in stage `{}`", s.id),
                    at.as_ref(),
                    "no stage with this id",
                    vec![hint],
                );
                continue;
            };
            if let Some(port) = r.port() {
                let outputs = stages[from].stage.outputs();
                if !outputs.contains(&port) {
                    let hint = if outputs.is_empty() {
                        format!(
                            "hint: a `{}` stage has one output: reference it as `{}`",
                            stages[from].stage.kind(),
                            r.stage()
                        )
                    } else {
                        format!(
                            "hint: `{}` outputs {}",
                            r.stage(),
                            outputs
                                .iter()
                                .map(|o| format!("`{}.{o}`", r.stage()))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    problems.error(
                        format!("unknown output `{port}` of stage `{}`", r.stage()),
                        at.as_ref(),
                        "no such output",
                        vec![hint],
                    );
                    continue;
                }
            }
            edges.push((from, to, at));
        }
    }
    for group in super::cycles::cycles(stages.len(), edges.iter().map(|(f, t, _)| (*f, *t))) {
        let names: Vec<&str> = group.iter().map(|&i| stages[i].id.as_str()).collect();
        let labels: Vec<Label<usize>> = edges
            .iter()
            .filter(|(f, t, _)| group.contains(f) && group.contains(t))
            .filter_map(|(f, t, at)| {
                at.as_ref().map(|at| {
                    Label::primary(at.file, at.span.clone())
                        .with_message(format!("`{}` reads `{}`", stages[*t].id, stages[*f].id))
                })
            })
            .collect();
        let mut cycle = names.clone();
        cycle.push(names[0]);
        problems.push(
            Diagnostic::error()
                .with_message(format!(
                    "dependency cycle between stages {}",
                    cycle
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(" -> ")
                ))
                .with_labels(labels)
                .with_notes(vec![
                    "hint: a stage cannot read its own output, directly or through others".into(),
                ]),
        );
    }
}

/// The seed of stage `id`: a hash of the pipeline seed and the id.
pub fn stage_seed(pipeline_seed: u64, id: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("kpipe stage seed v1");
    h.update(&pipeline_seed.to_le_bytes());
    h.update(id.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_seeds_depend_on_seed_and_id() {
        assert_eq!(stage_seed(1, "a"), stage_seed(1, "a"));
        assert_ne!(stage_seed(1, "a"), stage_seed(2, "a"));
        assert_ne!(stage_seed(1, "a"), stage_seed(1, "b"));
    }
}
