//! The command line: argument parsing, dispatch, and how results and errors are shown.
//! Data (JSON, tables) goes to stdout; logs, progress and errors to stderr.

mod fetch;
mod progress;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use crate::cache::{Cache, CacheError, LockFile};
use crate::config::{self, ConfigError, Override};
use crate::exec::{self, Outcome, PreviewStatus, RunOptions};
use crate::graph::Plan;

/// Exit codes, as `--help` documents them.
pub mod exit {
    pub const OK: i32 = 0;
    pub const STAGE_FAILED: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const CORRUPT: i32 = 3;
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a stage failed (its dependents were skipped)
  2  configuration or usage error (the pipeline file, an override, a flag)
  3  cache corruption or a verification mismatch";

#[derive(Parser, Debug)]
#[command(name = "kpipe", version, about = "Declarative, cached pipelines for kidney and kidney-tumor segmentation on CT (KiTS19)", after_help = EXIT_CODES)]
pub struct Cli {
    /// More logging: -v info, -vv debug, -vvv trace (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Cache directory
    #[arg(
        long,
        env = "KPIPE_CACHE_DIR",
        default_value = ".kpipe/cache",
        global = true
    )]
    cache_dir: PathBuf,
    /// Hide progress bars (they are hidden anyway when stderr is not a terminal)
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline: every node that is not cached
    #[command(after_help = EXIT_CODES)]
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Nodes run at once [default: number of cores]
        #[arg(short, long)]
        jobs: Option<usize>,
        /// Stop starting nodes after the first failure
        #[arg(long)]
        fail_fast: bool,
    },
    /// Show each node's key and whether it is cached or would run, and why
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
        format: TextOrJson,
    },
    /// Print the pipeline's dependency graph
    Graph {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// List cache entries, their sizes and the lock files that reference them
    Status,
    /// Describe a NIfTI volume: header, affine, value range
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Write synthetic CT phantom cases in the KiTS19 layout
    Synth {
        /// Output folder (created)
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 24)]
        cases: usize,
        /// Volume shape: slices,rows,columns
        #[arg(long, value_parser = parse_shape, default_value = "64,128,128")]
        shape: [usize; 3],
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// KiTS19-sized cases instead of --shape: 512x512, slice counts drawn like the
        /// real data's (29 to 1059, 216 on average)
        #[arg(long, conflicts_with = "shape")]
        kits19_size: bool,
    },
    /// Download a dataset into the folder layout the load stage reads
    #[command(subcommand)]
    Fetch(fetch::FetchCommand),
    /// Remove cache entries that no lock file references
    Gc {
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Instead: verify every entry and remove those whose content fails verification
        #[arg(long)]
        corrupt: bool,
    },
    /// Recompute a pipeline from scratch and compare every output with its lock file
    #[command(after_help = EXIT_CODES)]
    Verify {
        /// The pipeline file (not needed with --cache)
        #[arg(required_unless_present = "cache")]
        file: Option<PathBuf>,
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Instead: re-hash every entry of the existing cache and report rot
        #[arg(long, conflicts_with = "file")]
        cache: bool,
        #[arg(short, long)]
        jobs: Option<usize>,
        /// GPU nodes (and what reads them) pass when each metric in [0, 1] is within
        /// this of the locked result's: GPU training is not bit-reproducible
        #[arg(long, default_value_t = 0.02, value_name = "ABS")]
        gpu_tolerance: f64,
    },
    /// Measure throughput (medians over repeats); see scripts/ for the Python sides
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The official KiTS19 evaluation of two label volumes (or two folders of cases)
    #[command(after_help = EXIT_CODES)]
    Score {
        #[arg(long, required_unless_present = "truth_dir")]
        truth: Option<PathBuf>,
        #[arg(long, required_unless_present = "pred_dir")]
        pred: Option<PathBuf>,
        /// A KiTS19 folder of `case_XXXXX/segmentation.nii.gz`
        #[arg(long, requires = "pred_dir", conflicts_with = "truth")]
        truth_dir: Option<PathBuf>,
        /// Predictions as `case_XXXXX.nii.gz` or `case_XXXXX/prediction.nii.gz`
        #[arg(long, conflicts_with = "pred")]
        pred_dir: Option<PathBuf>,
        /// Labels above 2: `starter` (tumor, as the official code) or `rules` (background)
        #[arg(long, value_enum, default_value_t = crate::metrics::kits::LabelPolicy::Starter)]
        label_policy: crate::metrics::kits::LabelPolicy,
        #[arg(long)]
        json: bool,
    },
    /// Segment NIfTI volumes (files, or KiTS19 folders) with a trained model
    Predict {
        /// A train artifact (a directory with model.json and model.safetensors), or a
        /// node of a pipeline's latest run: `PIPELINE.toml:NODE[.OUTPUT]`, e.g.
        /// `pipelines/unet_lr_sweep.toml:sweep.best`
        #[arg(long, value_name = "DIR|PIPELINE:NODE")]
        model: String,
        /// The profile of a `PIPELINE:NODE` model
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output file (one input) or folder
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendArg,
    },
    /// The study's networks with their trainable and frozen parameter counts
    Models {
        /// Width of the first level
        #[arg(long, default_value_t = 64)]
        base: usize,
        /// Input channels (1, or 2k+1 with k context slices each side)
        #[arg(long, default_value_t = 1)]
        in_channels: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print where the pipeline's latest report is
    Report {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// The metrics of every evaluate and sweep node of the pipeline's latest results
    Metrics {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Load + window + resize of one case, one core (the slice stage's work)
    Slicing {
        imaging: PathBuf,
        segmentation: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// U-Net training steps (forward, backward, Adam) on random data
    Train(NetBench),
    /// U-Net inference (forward and argmax) on random data
    Infer(NetBench),
}

#[derive(Args, Debug)]
struct NetBench {
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    base: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Threads of the CPU backend's pool
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
}

#[derive(Args, Debug)]
struct PipelineArgs {
    /// The pipeline file (TOML)
    file: PathBuf,
    /// Merge `[profiles.<NAME>]` over the pipeline
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Override a value: `--set stages.train.epochs=2` (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TextOrJson {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Cpu,
    Gpu,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum GraphFormat {
    Dot,
    Json,
}

/// What went wrong, and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Stage(#[from] crate::stages::StageError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Nifti(#[from] crate::data::nifti::NiftiError),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => exit::CONFIG,
            CliError::Cache(CacheError::Corrupt { .. }) => exit::CORRUPT,
            CliError::Nifti(_) | CliError::Usage(_) => exit::CONFIG,
            CliError::Cache(_) | CliError::Stage(_) | CliError::Output(_) => exit::STAGE_FAILED,
        }
    }
}

/// Parses the arguments, runs the command, and returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            e.exit_code()
        }
    }
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn init_logging(verbose: u8) {
    let level = ["warn", "info", "debug", "trace"][usize::from(verbose.min(3))];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("kpipe={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color())
        .with_target(false)
        .try_init();
}

fn report_error(e: &CliError) {
    if let CliError::Config(c) = e {
        let mut stderr = StandardStream::stderr(if color() {
            ColorChoice::Auto
        } else {
            ColorChoice::Never
        });
        let _ = c.emit(&mut stderr);
        return;
    }
    let text = e.to_string();
    let (main, hints): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| !l.starts_with("hint:"));
    eprintln!("error: {}", main.join("\n"));
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    for h in hints {
        eprintln!("{h}");
    }
}

fn load(args: &PipelineArgs) -> Result<Plan, ConfigError> {
    let overrides: Vec<Override> = args.set.iter().cloned().map(Override).collect();
    let spec = config::load(&args.file, args.profile.as_deref(), &overrides)?;
    Ok(Plan::new(spec))
}

fn dispatch(cli: &Cli) -> Result<i32, CliError> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Run {
            pipeline,
            jobs,
            fail_fast,
        } => {
            let plan = load(pipeline)?;
            let cache = Cache::open(&cli.cache_dir)?;
            let mut opts = RunOptions {
                fail_fast: *fail_fast,
                ..RunOptions::default()
            };
            if let Some(j) = jobs {
                opts.jobs = (*j).max(1);
            }
            let reporter =
                progress::TermReporter::new(!cli.no_progress && std::io::stderr().is_terminal());
            let started = std::time::Instant::now();
            let summary = exec::run(&plan, &cache, &opts, &reporter)?;
            reporter.finish();
            let ran = summary.count(|o| matches!(o, Outcome::Ran { .. }));
            let cached = summary.count(|o| matches!(o, Outcome::Cached { .. }));
            let failed =
                summary.count(|o| matches!(o, Outcome::Failed { .. } | Outcome::Corrupt { .. }));
            let skipped = summary.count(|o| matches!(o, Outcome::Skipped { .. }));
            eprintln!(
                "{} nodes: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped in {:.2}s",
                summary.outcomes.len(),
                started.elapsed().as_secs_f64()
            );
            Ok(summary.exit_code())
        }
        Command::Plan { pipeline, format } => {
            let plan = load(pipeline)?;
            let cache = Cache::open(&cli.cache_dir)?;
            let nodes = exec::preview(&plan, &cache)?;
            match format {
                TextOrJson::Json => writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"nodes": nodes}))
                        .unwrap_or_default()
                )?,
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
                            stdout,
                            "{status:<6}  {:<width$}  {:<kinds$}  {key:<12}  {reason}",
                            n.id, n.kind
                        )?;
                    }
                    let to_run = nodes
                        .iter()
                        .filter(|n| n.status == PreviewStatus::Run)
                        .count();
                    writeln!(stdout, "{to_run} of {} nodes would run", nodes.len())?;
                }
            }
            Ok(exit::OK)
        }
        Command::Graph { pipeline, format } => {
            let plan = load(pipeline)?;
            match format {
                GraphFormat::Dot => write!(stdout, "{}", plan.to_dot())?,
                GraphFormat::Json => writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&plan.to_json()).unwrap_or_default()
                )?,
            }
            Ok(exit::OK)
        }
        Command::Inspect { file, json } => {
            let summary = crate::data::nifti::Volume::read(file)?.summary()?;
            if *json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                )?;
            } else {
                writeln!(stdout, "{}", file.display())?;
                writeln!(stdout, "  shape       {:?}", summary.shape)?;
                writeln!(
                    stdout,
                    "  datatype    {} ({}-endian)",
                    summary.datatype, summary.endianness
                )?;
                writeln!(stdout, "  spacing     {:?}", summary.spacing)?;
                writeln!(
                    stdout,
                    "  scaling     value * {} + {}",
                    summary.scl_slope, summary.scl_inter
                )?;
                writeln!(stdout, "  range       {} .. {}", summary.min, summary.max)?;
                writeln!(stdout, "  sum         {}", summary.sum)?;
                writeln!(stdout, "  NaN count   {}", summary.nan_count)?;
                writeln!(stdout, "  affine")?;
                for row in summary.affine {
                    writeln!(
                        stdout,
                        "    [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
                        row[0], row[1], row[2], row[3]
                    )?;
                }
            }
            Ok(exit::OK)
        }
        Command::Synth {
            out,
            cases,
            shape,
            seed,
            kits19_size,
        } => {
            use crate::data::phantom::{PhantomSpec, kits19_slices, write_dataset_shaped};
            let spec = PhantomSpec {
                cases: *cases,
                shape: *shape,
                seed: *seed,
            };
            let shape_of = |i| match kits19_size {
                true => [kits19_slices(*seed, i), 512, 512],
                false => *shape,
            };
            let written = write_dataset_shaped(out, &spec, &shape_of, &|_| {})?;
            let tumors = written.iter().filter(|c| c.has_tumor).count();
            writeln!(
                stdout,
                "wrote {} cases ({tumors} with tumor) to `{}`",
                written.len(),
                out.display()
            )?;
            Ok(exit::OK)
        }
        Command::Fetch(cmd) => fetch::run(cmd, cli.no_progress, &mut stdout),
        Command::Status => {
            let cache = Cache::open(&cli.cache_dir)?;
            status(&cache, &mut stdout)?;
            Ok(exit::OK)
        }
        Command::Gc { dry_run, corrupt } => {
            let cache = Cache::open(&cli.cache_dir)?;
            gc(&cache, *dry_run, *corrupt, &mut stdout)?;
            Ok(exit::OK)
        }
        Command::Verify {
            file,
            profile,
            set,
            cache,
            jobs,
            gpu_tolerance,
        } => {
            let store = Cache::open(&cli.cache_dir)?;
            if *cache {
                let rows = crate::verify::verify_cache(&store)?;
                let bad = rows.iter().filter(|r| r.2.is_some()).count();
                for (key, stage, problem) in &rows {
                    writeln!(
                        stdout,
                        "{}  {:<28} {}",
                        &key[..12],
                        stage,
                        problem.as_deref().unwrap_or("ok")
                    )?;
                }
                writeln!(stdout, "{} entries, {bad} corrupt", rows.len())?;
                return Ok(if bad > 0 { exit::CORRUPT } else { exit::OK });
            }
            let args = PipelineArgs {
                file: file.clone().unwrap_or_default(),
                profile: profile.clone(),
                set: set.clone(),
            };
            let plan = load(&args)?;
            let lock_path = LockFile::path_for(&plan.spec.file, plan.spec.profile.as_deref());
            if !lock_path.is_file() {
                return Err(CliError::Usage(format!(
                    "no lock file `{}` to verify against\nhint: run the pipeline first (`kpipe run {}{}`), or check out the lock file that came with it",
                    lock_path.display(),
                    args.file.display(),
                    args.profile
                        .as_deref()
                        .map(|p| format!(" --profile {p}"))
                        .unwrap_or_default()
                )));
            }
            let mut opts = RunOptions::default();
            if let Some(j) = jobs {
                opts.jobs = (*j).max(1);
            }
            let reporter =
                progress::TermReporter::new(!cli.no_progress && std::io::stderr().is_terminal());
            let checks =
                crate::verify::verify_pipeline(&plan, &store, &opts, &reporter, *gpu_tolerance)?;
            reporter.finish();
            let width = checks.iter().map(|c| c.id.len()).max().unwrap_or(4);
            writeln!(
                stdout,
                "{:<width$}  {:<9} {:<12}  {:<12}  result",
                "node", "kind", "locked", "recomputed"
            )?;
            for c in &checks {
                let short = |d: &Option<String>| {
                    d.as_deref()
                        .map_or("-".to_string(), |d| d[..12].to_string())
                };
                let verdict = match c.verdict {
                    crate::verify::Verdict::Match => "match".to_string(),
                    crate::verify::Verdict::Tolerated => match c.drift {
                        Some(d) => format!("within GPU tolerance (max drift {d:.4})"),
                        None => "within GPU tolerance (its inputs were)".into(),
                    },
                    crate::verify::Verdict::Mismatch => match c.drift {
                        Some(d) => format!("MISMATCH (GPU metrics drift {d:.4})"),
                        None => "MISMATCH".into(),
                    },
                    crate::verify::Verdict::Unlocked => "NOT IN LOCK FILE".into(),
                    crate::verify::Verdict::Failed => "FAILED".into(),
                };
                writeln!(
                    stdout,
                    "{:<width$}  {:<9} {:<12}  {:<12}  {verdict}",
                    c.id,
                    c.kind,
                    short(&c.locked),
                    short(&c.actual)
                )?;
            }
            let mismatches = checks
                .iter()
                .filter(|c| c.verdict == crate::verify::Verdict::Mismatch)
                .count();
            let unlocked = checks
                .iter()
                .filter(|c| c.verdict == crate::verify::Verdict::Unlocked)
                .count();
            let failed = checks
                .iter()
                .filter(|c| c.verdict == crate::verify::Verdict::Failed)
                .count();
            let tolerated = checks
                .iter()
                .filter(|c| c.verdict == crate::verify::Verdict::Tolerated)
                .count();
            let tolerated = if tolerated > 0 {
                format!(" ({tolerated} within GPU tolerance {gpu_tolerance})")
            } else {
                String::new()
            };
            let passed = checks.iter().filter(|c| c.passed()).count();
            writeln!(
                stdout,
                "{} nodes: {passed} match{tolerated}, {mismatches} mismatch, {unlocked} not in the lock file, {failed} failed",
                checks.len(),
            )?;
            if unlocked > 0 {
                eprintln!(
                    "error: {unlocked} node(s) have no record in `{}`: nothing to verify them against\nhint: the lock file is older than the pipeline; run it (`kpipe run`) where its results are trusted and commit the lock file",
                    lock_path.display()
                );
            }
            Ok(if mismatches > 0 || unlocked > 0 {
                exit::CORRUPT
            } else if failed > 0 {
                exit::STAGE_FAILED
            } else {
                exit::OK
            })
        }
        Command::Bench(BenchCommand::Slicing {
            imaging,
            segmentation,
            size,
            repeat,
        }) => {
            let (secs, first, slices) =
                crate::bench::bench_slicing(imaging, segmentation, *size, *repeat)?;
            writeln!(
                stdout,
                "kpipe: median {secs:.3} s over {repeat} runs, {:.0} slices/s ({slices} slices to {size}x{size}; first run, in fresh memory: {first:.3} s)",
                slices as f64 / secs
            )?;
            Ok(exit::OK)
        }
        Command::Bench(BenchCommand::Train(b)) | Command::Bench(BenchCommand::Infer(b)) => {
            let train = matches!(cli.command, Command::Bench(BenchCommand::Train(_)));
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(b.threads.max(1))
                .build_global();
            let rate = crate::bench::bench_unet(train, b.size, b.base, b.batch, b.steps.max(1));
            let what = if train { "train" } else { "infer" };
            writeln!(
                stdout,
                "kpipe {what}: {rate:.2} slices/s (U-Net base {} at {}x{}, batch {}, {} thread(s), median of {} steps)",
                b.base, b.size, b.size, b.batch, b.threads, b.steps
            )?;
            Ok(exit::OK)
        }
        Command::Score {
            truth,
            pred,
            truth_dir,
            pred_dir,
            label_policy,
            json,
        } => {
            let pairs: Vec<(String, PathBuf, PathBuf)> = match (truth, pred, truth_dir, pred_dir) {
                (Some(t), Some(p), _, _) => vec![(t.display().to_string(), t.clone(), p.clone())],
                (_, _, Some(td), Some(pd)) => score_pairs(td, pd)?,
                _ => {
                    return Err(CliError::Usage(
                        "give --truth and --pred, or --truth-dir and --pred-dir".into(),
                    ));
                }
            };
            let mut results = serde_json::Map::new();
            let (mut kt, mut tu) = (Vec::new(), Vec::new());
            for (name, t, p) in &pairs {
                let s = crate::metrics::kits::score_files(t, p, *label_policy).map_err(
                    |e| match e {
                        crate::metrics::kits::ScoreError::Nifti(n) => CliError::Nifti(n),
                        other => CliError::Usage(format!("{name}: {other}")),
                    },
                )?;
                kt.push(s.kidney_tumor_dice);
                tu.push(s.tumor_dice);
                results.insert(name.clone(), serde_json::to_value(&s).unwrap_or_default());
            }
            let mean = |v: &[f64]| crate::metrics::nan_mean(v.iter().copied());
            let out = if pairs.len() == 1 {
                results
                    .into_iter()
                    .next()
                    .map(|(_, v)| v)
                    .unwrap_or_default()
            } else {
                serde_json::json!({"cases": results, "kidney_tumor_dice": mean(&kt), "tumor_dice": mean(&tu), "score": mean(&[mean(&kt), mean(&tu)])})
            };
            if *json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&out).unwrap_or_default()
                )?;
            } else {
                print_flat(&mut stdout, "", &out)?;
            }
            Ok(exit::OK)
        }
        Command::Predict {
            model,
            profile,
            inputs,
            out,
            batch_size,
            backend,
        } => {
            let kind = match backend {
                BackendArg::Cpu => crate::backend::BackendKind::Cpu,
                BackendArg::Gpu => crate::backend::BackendKind::Gpu,
            };
            let device = crate::backend::device(kind, 0).map_err(CliError::Usage)?;
            let model = resolve_model(model, profile.as_deref(), &cli.cache_dir)?;
            let (net, file) = crate::train::load_network(&model, &device)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let pairs = crate::predict::plan_outputs(inputs, out)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let bar = indicatif::ProgressBar::new(pairs.len() as u64);
            if cli.no_progress || !std::io::stderr().is_terminal() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            for (input, output) in &pairs {
                bar.set_message(input.display().to_string());
                crate::predict::predict_volume(&net, &file, &device, input, output, *batch_size)
                    .map_err(|e| match e {
                        crate::predict::PredictError::Nifti(n) => CliError::Nifti(n),
                        other => CliError::Usage(other.to_string()),
                    })?;
                bar.inc(1);
                writeln!(stdout, "{} -> {}", input.display(), output.display())?;
            }
            bar.finish_and_clear();
            Ok(exit::OK)
        }
        Command::Models {
            base,
            in_channels,
            json,
        } => {
            let device = burn::tensor::Device::flex();
            let mut rows = Vec::new();
            for kind in crate::models::ModelKind::ALL {
                let config = crate::models::ModelConfig {
                    kind,
                    in_channels: *in_channels,
                    base: *base,
                    batch_norm: false,
                    up_kernel: 2,
                    freeze_encoder: true,
                };
                let net = config.init(&device);
                let (trainable, frozen) = crate::models::param_counts(
                    &net,
                    matches!(
                        kind,
                        crate::models::ModelKind::Fcn8s | crate::models::ModelKind::Fcn8sV2
                    ),
                );
                rows.push(serde_json::json!({"model": kind.name(), "trainable": trainable, "frozen": frozen, "study_trainable": kind.study_params()}));
            }
            if *json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                )?;
            } else {
                writeln!(
                    stdout,
                    "{:<10} {:>12} {:>12} {:>16}   (base {base}, {in_channels} input channel(s); FCN with its VGG16 encoder frozen, as the study)",
                    "model", "trainable", "frozen", "study trainable"
                )?;
                for r in &rows {
                    let study = r["study_trainable"]
                        .as_u64()
                        .map_or("-".to_string(), |v| v.to_string());
                    writeln!(
                        stdout,
                        "{:<10} {:>12} {:>12} {:>16}",
                        r["model"].as_str().unwrap_or(""),
                        r["trainable"].as_u64().unwrap_or(0),
                        r["frozen"].as_u64().unwrap_or(0),
                        study
                    )?;
                }
            }
            Ok(exit::OK)
        }
        Command::Report { pipeline } => {
            let plan = load(pipeline)?;
            let cache = Cache::open(&cli.cache_dir)?;
            let found = latest_outputs(&plan, &cache, "report");
            if found.is_empty() {
                return Err(CliError::Usage(format!(
                    "no report of `{}` in the cache\nhint: run the pipeline first",
                    pipeline.file.display()
                )));
            }
            for (id, dir) in found {
                writeln!(stdout, "{id}: {}", dir.join("report.html").display())?;
            }
            Ok(exit::OK)
        }
        Command::Metrics { pipeline, json } => {
            let plan = load(pipeline)?;
            let cache = Cache::open(&cli.cache_dir)?;
            let mut all = serde_json::Map::new();
            for (id, dir) in latest_outputs(&plan, &cache, "evaluate") {
                if let Ok(v) = std::fs::read_to_string(dir.join("summary.json"))
                    .map(|t| serde_json::from_str::<serde_json::Value>(&t))
                {
                    all.insert(id, v.unwrap_or_default());
                }
            }
            for (id, dir) in latest_outputs(&plan, &cache, "sweep") {
                if let Ok(file) = crate::stages::sweep::SweepFile::read(&dir) {
                    let wall: serde_json::Value =
                        std::fs::read_to_string(dir.join("volatile/wall_time.json"))
                            .ok()
                            .and_then(|t| serde_json::from_str(&t).ok())
                            .unwrap_or_default();
                    let arms: serde_json::Map<String, serde_json::Value> = file
                        .arms
                        .iter()
                        .map(|a| (a.id.clone(), serde_json::json!({"kept": a.best, "kept_epoch": a.best_epoch, "kept_val_iou": a.kept.val_iou, "kept_dice_kidney": a.kept.dice_kidney, "kept_dice_tumor": a.kept.dice_tumor, "final_val_iou": a.last.val_iou, "selected": a.selected, "wall_time_s": wall[&a.id]})))
                        .collect();
                    all.insert(
                        id,
                        serde_json::json!({"metric": file.select.metric, "arms": arms}),
                    );
                }
            }
            if all.is_empty() {
                return Err(CliError::Usage(format!(
                    "no evaluate or sweep results of `{}` in the cache\nhint: run the pipeline first",
                    pipeline.file.display()
                )));
            }
            if *json {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::to_string_pretty(&all).unwrap_or_default()
                )?;
            } else {
                for (id, v) in &all {
                    writeln!(stdout, "{id}")?;
                    print_flat(&mut stdout, "  ", v)?;
                }
            }
            Ok(exit::OK)
        }
    }
}

/// The artifact directories of the pipeline's nodes of `kind`, as the lock file records them.
fn latest_outputs(plan: &Plan, cache: &Cache, kind: &str) -> Vec<(String, PathBuf)> {
    let lock = LockFile::read(&LockFile::path_for(
        &plan.spec.file,
        plan.spec.profile.as_deref(),
    ))
    .unwrap_or_default();
    lock.nodes
        .iter()
        .filter(|(_, r)| r.kind == kind)
        .filter_map(|(id, r)| cache.peek(&r.key).map(|e| (id.clone(), e.out())))
        .collect()
}

/// `--model`: a directory as it is, or `PIPELINE.toml:NODE[.OUTPUT]` looked up in the
/// pipeline's lock file (for `profile`) and the cache, as a downstream stage would see it.
fn resolve_model(spec: &str, profile: Option<&str>, cache_dir: &Path) -> Result<PathBuf, CliError> {
    let direct = Path::new(spec);
    let Some(at) = spec.find(".toml:") else {
        if direct.is_dir() {
            return Ok(direct.to_path_buf());
        }
        return Err(CliError::Usage(format!(
            "--model `{spec}`: no such directory\nhint: give a train artifact directory or `PIPELINE.toml:NODE`"
        )));
    };
    let (file, node) = (Path::new(&spec[..at + 5]), &spec[at + 6..]);
    let lock_path = LockFile::path_for(file, profile);
    let lock = LockFile::read(&lock_path)?;
    if lock.nodes.is_empty() {
        return Err(CliError::Usage(format!(
            "--model `{spec}`: `{}` has no results (no `{}`)\nhint: run `kpipe run {}{}` first",
            file.display(),
            lock_path.display(),
            file.display(),
            profile
                .map(|p| format!(" --profile {p}"))
                .unwrap_or_default()
        )));
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
                return Err(CliError::Usage(format!(
                    "--model `{spec}`: no node `{node}` in `{}`\nhint: models there: {}",
                    lock_path.display(),
                    known.join(", ")
                )));
            }
        },
    };
    let cache = Cache::open(cache_dir)?;
    let entry = cache.get(&lock.nodes[id].key)?.ok_or_else(|| {
        CliError::Usage(format!(
            "--model `{spec}`: the result of `{id}` is no longer in the cache\nhint: run the pipeline again"
        ))
    })?;
    match port {
        None => Ok(entry.out()),
        Some(p) if entry.out().join(p).is_dir() => Ok(entry.out().join(p)),
        Some(p) => Err(CliError::Usage(format!(
            "--model `{spec}`: `{id}` has no output `{p}`"
        ))),
    }
}

/// (case, truth, prediction) of every case of a truth folder with a prediction.
fn score_pairs(
    truth_dir: &Path,
    pred_dir: &Path,
) -> Result<Vec<(String, PathBuf, PathBuf)>, CliError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(truth_dir)
        .map_err(|e| CliError::Usage(format!("cannot read `{}`: {e}", truth_dir.display())))?;
    let mut cases: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("case_"))
        .collect();
    cases.sort();
    for case in cases {
        let truth = truth_dir.join(&case).join("segmentation.nii.gz");
        let pred = [
            pred_dir.join(format!("{}.nii.gz", case.replace("case_", "prediction_"))),
            pred_dir.join(format!("{case}.nii.gz")),
            pred_dir.join(&case).join("prediction.nii.gz"),
            pred_dir.join(&case).join("segmentation.nii.gz"),
        ]
        .into_iter()
        .find(|p| p.exists());
        match (truth.exists(), pred) {
            (true, Some(p)) => out.push((case, truth, p)),
            (true, None) => {
                return Err(CliError::Usage(format!(
                    "no prediction for `{case}` in `{}`",
                    pred_dir.display()
                )));
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(CliError::Usage(format!(
            "no cases with a segmentation in `{}`",
            truth_dir.display()
        )));
    }
    Ok(out)
}

fn print_flat(out: &mut impl Write, indent: &str, v: &serde_json::Value) -> std::io::Result<()> {
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

/// Each entry's key, stage, size and referencing lock files.
fn references(cache: &Cache) -> Vec<(PathBuf, LockFile)> {
    cache
        .lock_files()
        .into_iter()
        .filter_map(|p| LockFile::read(&p).ok().map(|l| (p, l)))
        .collect()
}

fn status(cache: &Cache, out: &mut impl Write) -> Result<(), CliError> {
    let entries = cache.entries()?;
    let locks = references(cache);
    let total: u64 = entries.iter().map(|e| e.manifest.bytes).sum();
    writeln!(
        out,
        "cache `{}`: {} entries, {}",
        cache.root().display(),
        entries.len(),
        human_bytes(total)
    )?;
    for e in &entries {
        let m = &e.manifest;
        let refs: Vec<String> = locks
            .iter()
            .filter(|(_, l)| l.nodes.values().any(|r| r.key == m.key))
            .map(|(p, _)| display_path(p))
            .collect();
        let refs = if refs.is_empty() {
            "(unreferenced)".to_string()
        } else {
            refs.join(", ")
        };
        writeln!(
            out,
            "  {}  {:<24} {:<8} {:>10}  {refs}",
            &m.key[..12],
            m.stage,
            m.kind,
            human_bytes(m.bytes)
        )?;
    }
    Ok(())
}

fn gc(cache: &Cache, dry_run: bool, corrupt: bool, out: &mut impl Write) -> Result<(), CliError> {
    let entries = cache.entries()?;
    let locks = references(cache);
    let mut doomed = Vec::new();
    for e in entries {
        let drop = if corrupt {
            cache.get(&e.manifest.key).is_err()
        } else {
            !locks
                .iter()
                .any(|(_, l)| l.nodes.values().any(|r| r.key == e.manifest.key))
        };
        if drop {
            doomed.push(e);
        }
    }
    let bytes: u64 = doomed.iter().map(|e| e.manifest.bytes).sum();
    for e in &doomed {
        writeln!(
            out,
            "{} {}  {}",
            if dry_run { "would remove" } else { "removed" },
            &e.manifest.key[..12],
            e.manifest.stage
        )?;
        if !dry_run {
            cache.remove(&e.manifest.key)?;
        }
    }
    let verb = if dry_run { "would free" } else { "freed" };
    writeln!(
        out,
        "{} entries, {verb} {}",
        doomed.len(),
        human_bytes(bytes)
    )?;
    Ok(())
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>().map_err(|e| format!("`{p}`: {e}")))
        .collect::<Result<_, _>>()?;
    let shape: [usize; 3] = v
        .try_into()
        .map_err(|_| "expected three sizes: slices,rows,columns".to_string())?;
    if shape.iter().any(|&d| !(8..=1024).contains(&d)) {
        return Err("each size must be in 8..=1024".into());
    }
    Ok(shape)
}

fn display_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
