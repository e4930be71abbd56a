//! `kpipe run`, `kpipe plan` and `kpipe graph`: run a pipeline, preview what a run would
//! do, and print its dependency graph.

use std::io::Write;

use super::args::{ExecutorArg, GlobalArgs, GraphArgs, GraphFormat, PlanArgs, RunArgs, TextOrJson};
use super::util::{load, print_json, progress_bars};
use super::{CliError, exit, progress};
use crate::backend::{self, BackendKind};
use crate::cache::Cache;
use crate::exec::{self, Outcome, PreviewStatus, RunOptions};
use crate::slurm::{Slurm, SlurmOptions};

/// Runs every node that is not cached; the exit code says whether one failed. The
/// summary goes to stderr, with the progress.
pub(super) fn run(args: &RunArgs, global: &GlobalArgs) -> Result<i32, CliError> {
    let plan = load(&args.pipeline)?;
    let cache = Cache::open(&global.cache_dir)?;
    let mut opts = RunOptions {
        fail_fast: args.fail_fast,
        device_slots: args
            .devices
            .unwrap_or_else(|| default_devices(&plan))
            .max(1),
        ..RunOptions::default()
    };
    match args.jobs {
        Some(j) => opts.jobs = j.max(1),
        // every device busy needs as many nodes at once
        None => opts.jobs = opts.jobs.max(opts.device_slots),
    }
    let reporter = progress::TermReporter::new(progress_bars(global));
    let started = std::time::Instant::now();
    let summary = match args.executor {
        ExecutorArg::Local => exec::run(&plan, &cache, &opts, &reporter)?,
        ExecutorArg::Slurm => {
            let slurm = Slurm::connect(SlurmOptions {
                exe: std::env::current_exe()?,
                cache_dir: cache.root().to_path_buf(),
                pipeline: std::path::absolute(&args.pipeline.file)?,
                profile: args.pipeline.profile.clone(),
                overrides: args.pipeline.set.clone(),
                extra: args.slurm_arg.clone(),
                poll: std::time::Duration::from_secs_f64(args.slurm_poll.max(0.05)),
            })?;
            // the scheduler decides what runs at once and where: every ready node is
            // submitted
            opts.jobs = args.jobs.unwrap_or(10_000);
            opts.device_slots = opts.jobs;
            exec::run_with(&plan, &cache, &opts, &reporter, &slurm)?
        }
    };
    reporter.finish();
    let ran = summary.count(|o| matches!(o, Outcome::Ran { .. }));
    let cached = summary.count(|o| matches!(o, Outcome::Cached { .. }));
    let failed = summary.count(|o| matches!(o, Outcome::Failed { .. } | Outcome::Corrupt { .. }));
    let skipped = summary.count(|o| matches!(o, Outcome::Skipped { .. }));
    eprintln!(
        "{} nodes: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped in {:.2}s",
        summary.outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(summary.exit_code())
}

/// `--devices` when not given: every GPU the GPU backend finds where a node trains or
/// evaluates on it, else 1 (CPU nodes share the cores; more at once is a choice, see the
/// README).
fn default_devices(plan: &crate::graph::Plan) -> usize {
    let gpu = plan
        .spec
        .stages
        .iter()
        .any(|s| s.stage.backend() == Some(BackendKind::Gpu));
    if !gpu {
        return 1;
    }
    let n = backend::gpu_count();
    tracing::info!(
        gpus = n,
        "training and evaluation nodes run on every GPU at once"
    );
    n
}

/// Each node's key, and whether it is cached or would run, and why.
pub(super) fn plan(
    args: &PlanArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let plan = load(&args.pipeline)?;
    let cache = Cache::open(&global.cache_dir)?;
    let nodes = exec::preview(&plan, &cache)?;
    match args.format {
        TextOrJson::Json => print_json(out, &serde_json::json!({"nodes": nodes}))?,
        TextOrJson::Text => {
            let width = nodes.iter().map(|n| n.id.len()).max().unwrap_or(0);
            let kinds = nodes.iter().map(|n| n.kind.len()).max().unwrap_or(0);
            for n in &nodes {
                let status = match n.status {
                    PreviewStatus::Cached => "cached",
                    PreviewStatus::Run => "run",
                };
                let key = n.key.as_deref().map_or("?", |k| &k[..12]);
                let reason = n.reason.as_deref().unwrap_or("");
                writeln!(
                    out,
                    "{status:<6}  {:<width$}  {:<kinds$}  {key:<12}  {reason}",
                    n.id, n.kind
                )?;
            }
            let to_run = nodes
                .iter()
                .filter(|n| n.status == PreviewStatus::Run)
                .count();
            writeln!(out, "{to_run} of {} nodes would run", nodes.len())?;
        }
    }
    Ok(exit::OK)
}

/// The pipeline's dependency graph, as Graphviz dot or JSON.
pub(super) fn graph(args: &GraphArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let plan = load(&args.pipeline)?;
    match args.format {
        GraphFormat::Dot => write!(out, "{}", plan.to_dot())?,
        GraphFormat::Json => print_json(out, &plan.to_json())?,
    }
    Ok(exit::OK)
}
