//! The command line: dispatch to one module per command (their arguments are in
//! `args.rs`), and how results and errors are shown.
//! Data (JSON, tables) goes to stdout; logs, progress and errors to stderr.

// The command line is where kpipe talks to its user.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod bench;
mod cache;
mod fetch;
mod inspect;
mod metrics;
mod models;
mod node;
mod predict;
mod progress;
mod run;
mod score;
mod util;
mod verify;

use std::io::IsTerminal;

use clap::Parser;
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

pub use args::Cli;
use args::Command;

use crate::cache::CacheError;
use crate::config::ConfigError;
use crate::data::nifti::NiftiError;
use crate::hint::{Hint, Message};
use crate::metrics::kits::ScoreError;
use crate::predict::PredictError;

/// Exit codes, as `--help` documents them.
pub mod exit {
    pub const OK: i32 = 0;
    pub const STAGE_FAILED: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const CORRUPT: i32 = 3;
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
    /// A bad argument (exit code 2).
    #[error(transparent)]
    Usage(Message),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Nifti(#[from] NiftiError),
    /// A model that cannot be loaded or run, or a volume that does not fit it.
    #[error(transparent)]
    Predict(#[from] PredictError),
    /// A node run alone (`kpipe node run`) that failed.
    #[error(transparent)]
    Node(crate::exec::NodeError),
    /// The Slurm executor cannot start: no `sbatch`, or the controller is down.
    #[error(transparent)]
    Slurm(#[from] crate::slurm::SlurmError),
    /// A pair of volumes that cannot be compared.
    #[error("{name}: {error}")]
    Score { name: String, error: ScoreError },
}

/// A bad argument.
pub(crate) fn usage(text: impl Into<String>) -> CliError {
    CliError::Usage(Message::new(text))
}

/// A bad argument, and what to do instead.
pub(crate) fn advise(text: impl Into<String>, hint: impl Into<String>) -> CliError {
    CliError::Usage(Message::new(text).with_hint(hint))
}

impl Hint for CliError {
    fn hint(&self) -> Option<String> {
        match self {
            CliError::Usage(m) => m.hint(),
            CliError::Cache(e) => e.hint(),
            CliError::Node(e) => e.hint(),
            CliError::Slurm(e) => e.hint(),
            CliError::Stage(e) => e.hint(),
            CliError::Nifti(e) | CliError::Predict(PredictError::Nifti(e)) => e.hint(),
            _ => None,
        }
    }
}

impl CliError {
    /// The one place an error becomes an exit code: a bad argument or configuration 2
    /// (a file that is not there included), a failure while working 1 (a volume or model
    /// that cannot be read), a corrupt cache entry 3. (Runs and verifications count their
    /// nodes' outcomes instead: [`crate::exec::RunSummary::exit_code`].)
    pub fn exit_code(&self) -> i32 {
        let nifti = |e: &NiftiError| {
            if e.is_not_found() {
                exit::CONFIG
            } else {
                exit::STAGE_FAILED
            }
        };
        match self {
            CliError::Config(_) | CliError::Usage(_) | CliError::Slurm(_) => exit::CONFIG,
            CliError::Node(e) if e.is_corrupt() => exit::CORRUPT,
            CliError::Cache(e) if e.is_corrupt() => exit::CORRUPT,
            CliError::Nifti(e) | CliError::Predict(PredictError::Nifti(e)) => nifti(e),
            CliError::Predict(PredictError::Input(_)) => exit::CONFIG,
            CliError::Cache(_)
            | CliError::Stage(_)
            | CliError::Output(_)
            | CliError::Predict(_)
            | CliError::Node(_)
            | CliError::Score { .. } => exit::STAGE_FAILED,
        }
    }
}

/// Parses the arguments, runs the command, and returns the exit code.
pub fn main() -> i32 {
    crate::backend::keep_freed_memory();
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
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
    eprintln!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    if let Some(h) = e.hint() {
        eprintln!("{}", hint_lines(&h));
    }
}

/// `hint: ...` for each line of a hint.
fn hint_lines(hint: &str) -> String {
    hint.lines()
        .map(|l| format!("hint: {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the command; stdout is locked for its whole run.
fn dispatch(cli: &Cli) -> Result<i32, CliError> {
    let out = &mut std::io::stdout().lock();
    let global = &cli.global;
    match &cli.command {
        Command::Run(args) => run::run(args, global),
        Command::Plan(args) => run::plan(args, global, out),
        Command::Graph(args) => run::graph(args, out),
        Command::Status => cache::status(global, out),
        Command::Inspect(args) => inspect::inspect(args, out),
        Command::Synth(args) => inspect::synth(args, out),
        Command::Fetch(cmd) => fetch::run(cmd, global, out),
        Command::Gc(args) => cache::gc(args, global, out),
        Command::Verify(args) => verify::run(args, global, out),
        Command::Bench(cmd) => bench::run(cmd, global, out),
        Command::Score(args) => score::run(args, out),
        Command::Predict(args) => predict::run(args, global, out),
        Command::Models(args) => models::run(args, out),
        Command::Report(args) => metrics::report(args, global, out),
        Command::Metrics(args) => metrics::metrics(args, global, out),
        Command::Node(cmd) => node::run(cmd, global),
    }
}
