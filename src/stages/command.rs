//! `kind = "command"`: run a program, as a dvc.yaml stage does.
//!
//! ```toml
//! [stages.count]
//! kind = "command"
//! cmd = ["sh", "-c", "wc -l in/data/rows.txt > count.txt"]
//! inputs = ["data"]           # stages whose artifacts appear under in/<id>/
//! deps = ["scripts/count.sh"] # files or directories (from the pipeline's directory) whose content enters the key
//! outs = ["count.txt"]        # what the command must create; becomes the artifact
//! ```
//!
//! The command runs in a fresh, empty working directory with `in/<id>/` linking to each
//! input's artifact, and these variables set: `KPIPE_STAGE` (the node id), `KPIPE_SEED`
//! (its seed) and `KPIPE_PIPELINE_DIR` (absolute directory of the pipeline file, where
//! `deps` live). A relative program path with a `/` in it (`./tool.sh`) is taken from the
//! pipeline's directory. A non-zero exit, or a declared out that is missing, fails the
//! node and caches nothing.

use std::path::{Component, Path};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::cache::tree_digest;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Command {
    /// Program and arguments.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub inputs: Vec<StageRef>,
    #[serde(default)]
    pub deps: Vec<String>,
    #[serde(default)]
    pub outs: Vec<String>,
}

impl Stage for Command {
    const KIND: &'static str = "command";

    fn check(&self, ctx: &CheckContext) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if self.cmd.is_empty() || self.cmd[0].is_empty() {
            issues.push(
                ParamIssue::new("cmd", "must name a program")
                    .hint("hint: `cmd = [\"sh\", \"-c\", \"...\"]`"),
            );
        }
        for (i, out) in self.outs.iter().enumerate() {
            let p = Path::new(out);
            let plain =
                !out.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                issues.push(ParamIssue::new(
                    format!("outs.{i}"),
                    format!("`{out}` must be a relative path inside the working directory"),
                ));
            } else if self.outs[..i].contains(out) {
                issues.push(ParamIssue::new(
                    format!("outs.{i}"),
                    format!("`{out}` is declared twice"),
                ));
            }
        }
        for (i, dep) in self.deps.iter().enumerate() {
            if !ctx.pipeline_dir.join(dep).exists() {
                issues.push(
                    ParamIssue::new(format!("deps.{i}"), format!("`{dep}` does not exist")).hint(
                        format!(
                            "hint: deps are read from the pipeline's directory, `{}`",
                            ctx.pipeline_dir.display()
                        ),
                    ),
                );
            }
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("inputs.{i}"), r))
            .collect()
    }

    fn key_material(&self, ctx: &CheckContext) -> Result<serde_json::Value, StageError> {
        let mut deps = serde_json::Map::new();
        for dep in &self.deps {
            let path = ctx.pipeline_dir.join(dep);
            let digest = tree_digest(&path).map_err(StageError::io("hash dependency", &path))?;
            deps.insert(dep.clone(), digest.hex.into());
        }
        Ok(if deps.is_empty() {
            serde_json::Value::Null
        } else {
            deps.into()
        })
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let work = ctx.scratch.join("work");
        let in_dir = work.join("in");
        std::fs::create_dir_all(&in_dir).map_err(StageError::io("create", &in_dir))?;
        for r in &self.inputs {
            let link = in_dir.join(r.stage());
            if !link.exists() {
                std::os::unix::fs::symlink(ctx.input(r)?, &link)
                    .map_err(StageError::io("link input", &link))?;
            }
        }
        let pipeline_dir = std::path::absolute(ctx.pipeline_dir)
            .map_err(StageError::io("resolve", ctx.pipeline_dir))?;
        let program = if self.cmd[0].contains('/') && Path::new(&self.cmd[0]).is_relative() {
            pipeline_dir.join(&self.cmd[0]).into_os_string()
        } else {
            self.cmd[0].clone().into()
        };
        let log_path = ctx.scratch.join("output.log");
        let log = std::fs::File::create(&log_path).map_err(StageError::io("create", &log_path))?;
        let log2 = log.try_clone().map_err(StageError::io("open", &log_path))?;
        let shown = self.cmd.join(" ");
        let status = std::process::Command::new(&program)
            .args(&self.cmd[1..])
            .current_dir(&work)
            .env("KPIPE_STAGE", ctx.id)
            .env("KPIPE_SEED", ctx.seed.to_string())
            .env("KPIPE_PIPELINE_DIR", &pipeline_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(|e| StageError::Failed(format!("cannot run `{}`: {e}", self.cmd[0])))?;
        if !status.success() {
            let tail = tail_lines(&log_path, 15);
            return Err(StageError::Failed(format!(
                "command `{shown}` failed ({status}){tail}"
            )));
        }
        for out in &self.outs {
            let from = work.join(out);
            if std::fs::symlink_metadata(&from).is_err() {
                let tail = tail_lines(&log_path, 15);
                return Err(StageError::Failed(format!(
                    "command `{shown}` did not create its declared out `{out}`{tail}"
                )));
            }
            let to = ctx.out.join(out);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(StageError::io("create", parent))?;
            }
            std::fs::rename(&from, &to).map_err(StageError::io("capture out", &from))?;
        }
        Ok(())
    }
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(n);
    format!("\n  | {}", lines[start..].join("\n  | "))
}
