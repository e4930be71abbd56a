//! Small helpers several commands share: loading a pipeline, whether to draw progress
//! bars, and printing JSON (pretty, or nested objects as an indented listing).

use std::io::{IsTerminal, Write};

use super::args::{GlobalArgs, PipelineArgs};
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
