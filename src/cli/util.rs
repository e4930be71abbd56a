//! Small helpers several commands share: loading a pipeline, whether to draw progress
//! bars, and printing JSON (pretty, or nested objects as an indented listing).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use super::args::{GlobalArgs, PipelineArgs};
use super::{CliError, advise, usage};
use crate::cache::{Cache, LockFile};
use crate::config::{self, ConfigError, Override};
use crate::graph::Plan;

/// The pipeline file with its profile and `--set` overrides, compiled into a plan.
pub(super) fn load(args: &PipelineArgs) -> Result<Plan, ConfigError> {
    let overrides: Vec<Override> = args.set.iter().cloned().map(Override).collect();
    let spec = config::load(&args.file, args.profile.as_deref(), &overrides)?;
    Ok(Plan::new(spec))
}

/// Whether to draw progress bars: not with `--no-progress`, and only on a terminal.
pub(super) fn progress_bars(global: &GlobalArgs) -> bool {
    !global.no_progress && std::io::stderr().is_terminal()
}

/// `v` as pretty JSON, on a line of its own.
pub(super) fn print_json(out: &mut impl Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    )
}

/// Nested JSON objects as an indented listing, numbers with four decimals.
pub(super) fn print_flat(
    out: &mut impl Write,
    indent: &str,
    v: &serde_json::Value,
) -> std::io::Result<()> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if x.is_object() {
                    writeln!(out, "{indent}{k}")?;
                    print_flat(out, &format!("{indent}  "), x)?;
                } else {
                    let shown = x.as_f64().map_or(x.to_string(), |f| format!("{f:.4}"));
                    writeln!(out, "{indent}{k:<22} {shown}")?;
                }
            }
            Ok(())
        }
        other => writeln!(out, "{indent}{other}"),
    }
}

/// An artifact a command reads: its flag, what it is, and the stage kinds that make it.
pub(super) struct Artifact {
    flag: &'static str,
    what: &'static str,
    kinds: &'static [&'static str],
    listed: &'static str,
}

impl Artifact {
    pub(super) const MODEL: Artifact = Artifact {
        flag: "--model",
        what: "a train artifact directory",
        kinds: &["train", "sweep"],
        listed: "models",
    };
    pub(super) const SLICES: Artifact = Artifact {
        flag: "--slices",
        what: "a slice artifact directory",
        kinds: &["slice"],
        listed: "slice stores",
    };
}

/// An artifact given as a directory as it is, or as `PIPELINE.toml:NODE[.OUTPUT]` looked
/// up in the pipeline's lock file (for `profile`) and the cache, as a downstream stage
/// would see it.
pub(super) fn resolve_artifact(
    a: Artifact,
    spec: &str,
    profile: Option<&str>,
    cache_dir: &Path,
) -> Result<PathBuf, CliError> {
    let flag = a.flag;
    let direct = Path::new(spec);
    let Some(at) = spec.find(".toml:") else {
        if direct.is_dir() {
            return Ok(direct.to_path_buf());
        }
        return Err(advise(
            format!("{flag} `{spec}`: no such directory"),
            format!("give {} or `PIPELINE.toml:NODE`", a.what),
        ));
    };
    let (file, node) = (Path::new(&spec[..at + 5]), &spec[at + 6..]);
    let lock_path = LockFile::path_for(file, profile);
    let lock = LockFile::read(&lock_path)?;
    if lock.nodes.is_empty() {
        return Err(advise(
            format!(
                "{flag} `{spec}`: `{}` has no results (no `{}`)",
                file.display(),
                lock_path.display(),
            ),
            format!(
                "run `kpipe run {}{}` first",
                file.display(),
                profile
                    .map(|p| format!(" --profile {p}"))
                    .unwrap_or_default()
            ),
        ));
    }
    let (id, port) = match lock.nodes.contains_key(node) {
        true => (node, None),
        false => match node.rsplit_once('.') {
            Some((id, port)) if lock.nodes.contains_key(id) => (id, Some(port)),
            _ => {
                let known: Vec<&str> = lock
                    .nodes
                    .iter()
                    .filter(|(_, r)| a.kinds.contains(&r.kind.as_str()))
                    .map(|(id, _)| id.as_str())
                    .collect();
                return Err(advise(
                    format!(
                        "{flag} `{spec}`: no node `{node}` in `{}`",
                        lock_path.display()
                    ),
                    format!("{} there: {}", a.listed, known.join(", ")),
                ));
            }
        },
    };
    let cache = Cache::open(cache_dir)?;
    let entry = cache.get(&lock.nodes[id].key)?.ok_or_else(|| {
        advise(
            format!("{flag} `{spec}`: the result of `{id}` is no longer in the cache"),
            "run the pipeline again",
        )
    })?;
    match port {
        None => Ok(entry.out()),
        Some(p) if entry.out().join(p).is_dir() => Ok(entry.out().join(p)),
        Some(p) => Err(usage(format!(
            "{flag} `{spec}`: `{id}` has no output `{p}`"
        ))),
    }
}
