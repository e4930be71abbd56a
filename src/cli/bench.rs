//! `kpipe bench`: the slicing, U-Net training and U-Net inference throughput measurements
//! of [`crate::bench`], printed as one line each.

use std::io::Write;

use super::args::{BenchCommand, GlobalArgs, LoaderArgs, NetBench, SlicingArgs};
use super::util::{Artifact, resolve_artifact};
use super::{CliError, exit};

/// Runs one measurement.
pub(super) fn run(
    cmd: &BenchCommand,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    match cmd {
        BenchCommand::Slicing(args) => slicing(args, out),
        BenchCommand::Train(b) => net(true, b, out),
        BenchCommand::Infer(b) => net(false, b, out),
        BenchCommand::Loader(args) => loader(args, global, out),
    }
}

/// The loader's slices per second, one figure per epoch, and their median.
fn loader(args: &LoaderArgs, global: &GlobalArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let dir = resolve_artifact(
        Artifact::SLICES,
        &args.slices,
        args.profile.as_deref(),
        &global.cache_dir,
    )?;
    let failed = |e: crate::data::slices::StoreError| {
        CliError::Stage(crate::stages::StageError::Other(Box::new(e)))
    };
    let store = crate::data::slices::SliceStore::open(&dir).map_err(failed)?;
    let flips = if args.no_flips { 0.0 } else { 0.5 };
    let augment = crate::data::augment::Augment {
        flip_horizontal: flips,
        flip_vertical: flips,
        ..Default::default()
    };
    let (rates, slices) =
        crate::bench::bench_loader(&store, args.batch.max(1), &augment, args.epochs.max(1))
            .map_err(failed)?;
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    writeln!(
        out,
        "kpipe loader: {:.0} slices/s (median of {} epochs of {slices} slices of {}x{}, {} channel(s), batch {}, {}; each epoch: {})",
        crate::bench::median(rates.clone()),
        rates.len(),
        store.meta.size,
        store.meta.size,
        store.meta.channels,
        args.batch.max(1),
        if args.no_flips {
            "no augmentation"
        } else {
            "random flips"
        },
        each.join(", ")
    )?;
    Ok(exit::OK)
}

fn slicing(args: &SlicingArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let SlicingArgs {
        imaging,
        segmentation,
        size,
        repeat,
    } = args;
    let (secs, first, slices) = crate::bench::bench_slicing(imaging, segmentation, *size, *repeat)?;
    writeln!(
        out,
        "kpipe: median {secs:.3} s over {repeat} runs, {:.0} slices/s ({slices} slices to {size}x{size}; first run, in fresh memory: {first:.3} s)",
        slices as f64 / secs
    )?;
    Ok(exit::OK)
}

/// U-Net training (`train`) or inference steps, on a pool of `b.threads` threads (the
/// CPU backend's, as a training node's), on the device `b.backend` names.
fn net(train: bool, b: &NetBench, out: &mut impl Write) -> Result<i32, CliError> {
    let kind = b.backend.kind();
    let precision = b.precision.precision();
    let device = crate::backend::device(kind, 0, precision).map_err(CliError::Usage)?;
    let name = crate::backend::describe(&device, kind);
    let bench = crate::bench::NetBench {
        train,
        size: b.size,
        base: b.base,
        batch_norm: !b.no_batch_norm,
        batch: b.batch,
        steps: b.steps.max(1),
        warmup: b.warmup.max(1),
        device,
    };
    let rate = crate::backend::on_pool(b.threads, || crate::bench::bench_unet(&bench));
    let what = if train { "train" } else { "infer" };
    writeln!(
        out,
        "kpipe {what}: {rate:.2} slices/s (U-Net base {}{} at {}x{}, batch {}, {}, {}, {} CPU thread(s), median of {} steps after {} warm-up)",
        b.base,
        if b.no_batch_norm {
            " without batch norm"
        } else {
            ""
        },
        b.size,
        b.size,
        b.batch,
        name,
        precision.name(),
        b.threads,
        b.steps,
        b.warmup.max(1)
    )?;
    Ok(exit::OK)
}
