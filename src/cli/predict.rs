//! `kpipe predict`: segment NIfTI volumes with a trained model, given as an artifact
//! directory or as a node of a pipeline's latest run.

use std::io::Write;

use super::args::{GlobalArgs, PredictArgs};
use super::util::{Artifact, progress_bars, resolve_artifact};
use super::{CliError, exit};
use crate::predict::PredictError;

/// Segments each input; a line `input -> output` per volume written.
pub(super) fn run(
    args: &PredictArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let device = crate::backend::device(args.backend.kind(), 0, args.precision.precision())
        .map_err(CliError::Usage)?;
    let model = resolve_artifact(
        Artifact::MODEL,
        &args.model,
        args.profile.as_deref(),
        &global.cache_dir,
    )?;
    let (net, file) = crate::train::load_network(&model, &device).map_err(PredictError::Train)?;
    let pairs = crate::predict::plan_outputs(&args.inputs, &args.out)?;
    let bar = indicatif::ProgressBar::new(pairs.len() as u64);
    if !progress_bars(global) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for (input, output) in &pairs {
        bar.set_message(input.display().to_string());
        crate::backend::on_pool(crate::backend::cores(), || {
            crate::predict::predict_volume(&net, &file, &device, input, output, args.batch_size)
        })?;
        bar.inc(1);
        writeln!(out, "{} -> {}", input.display(), output.display())?;
    }
    bar.finish_and_clear();
    Ok(exit::OK)
}
