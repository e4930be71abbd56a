//! `kpipe node run`: one node, as a job of an executor runs it (hidden from `--help`).

use super::args::{GlobalArgs, NodeCommand};
use super::util::load;
use super::{CliError, exit, progress, usage};
use crate::cache::Cache;
use crate::exec::{self, Done};

/// Runs the node if its key is still missing; the entry lands in the (shared) cache.
pub(super) fn run(cmd: &NodeCommand, global: &GlobalArgs) -> Result<i32, CliError> {
    let NodeCommand::Run(args) = cmd;
    let plan = load(&args.pipeline)?;
    let cache = Cache::open(&global.cache_dir)?;
    let id = &args.node;
    let index = plan
        .spec
        .stages
        .iter()
        .position(|s| &s.id == id)
        .ok_or_else(|| {
            usage(format!(
                "no node `{id}` in `{}`",
                args.pipeline.file.display()
            ))
        })?;
    let reporter = progress::TermReporter::new(false);
    match exec::run_one(&plan, &cache, index, &args.key, &reporter).map_err(CliError::Node)? {
        Done::Ran(_, seconds) => eprintln!("     ran  {id} ({seconds:.2}s)"),
        Done::Found(_) => eprintln!("  cached  {id}"),
    }
    Ok(exit::OK)
}
