//! `kpipe predict`: segment NIfTI volumes with a trained model, given as an artifact
//! directory or as a node of a pipeline's latest run.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::args::{GlobalArgs, PredictArgs};
use super::util::progress_bars;
use super::{CliError, advise, exit, usage};
use crate::cache::{Cache, LockFile};
use crate::predict::PredictError;

/// Segments each input; a line `input -> output` per volume written.
pub(super) fn run(
    args: &PredictArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let device = crate::backend::device(args.backend.kind(), 0, args.precision.precision())
        .map_err(CliError::Usage)?;
    let model = resolve_model(&args.model, args.profile.as_deref(), &global.cache_dir)?;
    let (net, file) = crate::train::load_network(&model, &device).map_err(PredictError::Train)?;
    let pairs = crate::predict::plan_outputs(&args.inputs, &args.out)?;
    let bar = indicatif::ProgressBar::new(pairs.len() as u64);
    if !progress_bars(global) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for (input, output) in &pairs {
        bar.set_message(input.display().to_string());
        crate::predict::predict_volume(&net, &file, &device, input, output, args.batch_size)?;
        bar.inc(1);
        writeln!(out, "{} -> {}", input.display(), output.display())?;
    }
    bar.finish_and_clear();
    Ok(exit::OK)
}

/// `--model`: a directory as it is, or `PIPELINE.toml:NODE[.OUTPUT]` looked up in the
/// pipeline's lock file (for `profile`) and the cache, as a downstream stage would see it.
fn resolve_model(spec: &str, profile: Option<&str>, cache_dir: &Path) -> Result<PathBuf, CliError> {
    let direct = Path::new(spec);
    let Some(at) = spec.find(".toml:") else {
        if direct.is_dir() {
            return Ok(direct.to_path_buf());
        }
        return Err(advise(
            format!("--model `{spec}`: no such directory"),
            "give a train artifact directory or `PIPELINE.toml:NODE`",
        ));
    };
    let (file, node) = (Path::new(&spec[..at + 5]), &spec[at + 6..]);
    let lock_path = LockFile::path_for(file, profile);
    let lock = LockFile::read(&lock_path)?;
    if lock.nodes.is_empty() {
        return Err(advise(
            format!(
                "--model `{spec}`: `{}` has no results (no `{}`)",
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
                    .filter(|(_, r)| r.kind == "train" || r.kind == "sweep")
                    .map(|(id, _)| id.as_str())
                    .collect();
                return Err(advise(
                    format!(
                        "--model `{spec}`: no node `{node}` in `{}`",
                        lock_path.display()
                    ),
                    format!("models there: {}", known.join(", ")),
                ));
            }
        },
    };
    let cache = Cache::open(cache_dir)?;
    let entry = cache.get(&lock.nodes[id].key)?.ok_or_else(|| {
        advise(
            format!("--model `{spec}`: the result of `{id}` is no longer in the cache"),
            "run the pipeline again",
        )
    })?;
    match port {
        None => Ok(entry.out()),
        Some(p) if entry.out().join(p).is_dir() => Ok(entry.out().join(p)),
        Some(p) => Err(usage(format!(
            "--model `{spec}`: `{id}` has no output `{p}`"
        ))),
    }
}
