//! The command line: argument parsing, dispatch, and how results and errors are shown.
//! Data (JSON, tables) goes to stdout; logs, progress and errors to stderr.

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
    },
    /// Remove cache entries that no lock file references
    Gc {
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Instead: verify every entry and remove those whose content fails verification
        #[arg(long)]
        corrupt: bool,
    },
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
            CliError::Nifti(_) => exit::CONFIG,
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
        } => {
            let spec = crate::data::phantom::PhantomSpec {
                cases: *cases,
                shape: *shape,
                seed: *seed,
            };
            let written = crate::data::phantom::write_dataset(out, &spec, &|_| {})?;
            let tumors = written.iter().filter(|c| c.has_tumor).count();
            writeln!(
                stdout,
                "wrote {} cases ({tumors} with tumor) to `{}`",
                written.len(),
                out.display()
            )?;
            Ok(exit::OK)
        }
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
