//! The command-line interface: clap's types for every command and flag, and the parsers
//! of argument values. Nothing here runs a command.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::fetch::{KITS19_IMAGING_URL, KITS19_SEGMENTATION_URL};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a stage failed (its dependents were skipped)
  2  configuration or usage error (the pipeline file, an override, a flag)
  3  cache corruption or a verification mismatch";

const FETCH_EXIT_CODES: &str = "\
Exit codes:
  0  every case is in place (fetched now, or already there and valid)
  1  a case or `kits.json` could not be fetched (the others were; rerun to resume)
  2  usage error";

#[derive(Parser, Debug)]
#[command(name = "kpipe", version, about = "Declarative, cached pipelines for kidney and kidney-tumor segmentation on CT (KiTS19)", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub(super) global: GlobalArgs,
    #[command(subcommand)]
    pub(super) command: Command,
}

/// The flags every command takes.
#[derive(Args, Debug)]
pub(super) struct GlobalArgs {
    /// More logging: -v info, -vv debug, -vvv trace (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(super) verbose: u8,
    /// Cache directory
    #[arg(
        long,
        env = "KPIPE_CACHE_DIR",
        default_value = ".kpipe/cache",
        global = true
    )]
    pub(super) cache_dir: PathBuf,
    /// Hide progress bars (they are hidden anyway when stderr is not a terminal)
    #[arg(long, global = true)]
    pub(super) no_progress: bool,
}

#[derive(Subcommand, Debug)]
pub(super) enum Command {
    /// Run a pipeline: every node that is not cached
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Show each node's key and whether it is cached or would run, and why
    Plan(PlanArgs),
    /// Print the pipeline's dependency graph
    Graph(GraphArgs),
    /// List cache entries, their sizes and the lock files that reference them
    Status,
    /// Describe a NIfTI volume: header, affine, value range
    Inspect(InspectArgs),
    /// Write synthetic CT phantom cases in the KiTS19 layout
    Synth(SynthArgs),
    /// Download a dataset into the folder layout the load stage reads
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Remove cache entries that no lock file references
    Gc(GcArgs),
    /// Recompute a pipeline from scratch and compare every output with its lock file
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
    /// Measure throughput (medians over repeats); see scripts/ for the Python sides
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The official KiTS19 evaluation of two label volumes (or two folders of cases)
    #[command(after_help = EXIT_CODES)]
    Score(ScoreArgs),
    /// Segment NIfTI volumes (files, or KiTS19 folders) with a trained model
    Predict(PredictArgs),
    /// The study's networks with their trainable and frozen parameter counts
    Models(ModelsArgs),
    /// Print where the pipeline's latest report is
    Report(PipelineArgs),
    /// The metrics of every evaluate and sweep node of the pipeline's latest results
    Metrics(MetricsArgs),
    /// Run one node as an executor's job does (`--executor slurm`)
    #[command(subcommand, hide = true)]
    Node(NodeCommand),
}

#[derive(Args, Debug)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) pipeline: PipelineArgs,
    /// Nodes run at once [default: number of cores]
    #[arg(short, long)]
    pub(super) jobs: Option<usize>,
    /// Stop starting nodes after the first failure
    #[arg(long)]
    pub(super) fail_fast: bool,
    /// Training nodes that run at once, each on a device of its own (the GPU adapter
    /// index; on the CPU backend they share the cores) [default: every GPU found where a
    /// node uses the GPU backend, else 1]
    #[arg(long, value_name = "N")]
    pub(super) devices: Option<usize>,
    /// Where nodes run: here, or as Slurm jobs (the cache must be on a filesystem every
    /// node sees)
    #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
    pub(super) executor: ExecutorArg,
    /// Another `sbatch` argument for every job (repeatable), e.g. `--slurm-arg=--qos=high`
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub(super) slurm_arg: Vec<String>,
    /// Seconds between the Slurm driver's looks at its jobs
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 5.0,
        env = "KPIPE_SLURM_POLL"
    )]
    pub(super) slurm_poll: f64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExecutorArg {
    Local,
    Slurm,
}

/// `kpipe node`: what a job of an executor runs.
#[derive(Subcommand, Debug)]
pub(super) enum NodeCommand {
    /// Run one node whose inputs are in the cache, and commit its entry there
    Run(NodeRunArgs),
}

#[derive(Args, Debug)]
pub(super) struct NodeRunArgs {
    #[command(flatten)]
    pub(super) pipeline: PipelineArgs,
    /// The node's id
    #[arg(long)]
    pub(super) node: String,
    /// The key the driver computed for it
    #[arg(long)]
    pub(super) key: String,
}

#[derive(Args, Debug)]
pub(super) struct PlanArgs {
    #[command(flatten)]
    pub(super) pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    pub(super) format: TextOrJson,
}

#[derive(Args, Debug)]
pub(super) struct GraphArgs {
    #[command(flatten)]
    pub(super) pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
    pub(super) format: GraphFormat,
}

#[derive(Args, Debug)]
pub(super) struct InspectArgs {
    pub(super) file: PathBuf,
    /// Print JSON instead of text
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args, Debug)]
pub(super) struct SynthArgs {
    /// Output folder (created)
    #[arg(long)]
    pub(super) out: PathBuf,
    #[arg(long, default_value_t = 24)]
    pub(super) cases: usize,
    /// Volume shape: slices,rows,columns
    #[arg(long, value_parser = parse_shape, default_value = "64,128,128")]
    pub(super) shape: [usize; 3],
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// KiTS19-sized cases instead of --shape: 512x512, slice counts drawn like the
    /// real data's (29 to 1059, 216 on average)
    #[arg(long, conflicts_with = "shape")]
    pub(super) kits19_size: bool,
}

#[derive(Subcommand, Debug)]
pub(super) enum FetchCommand {
    /// KiTS19: imaging from the KiTS-Challenge-Imaging data set, segmentations and
    /// `kits.json` from the kits19 repository, into `OUT/case_XXXXX/` and `OUT/kits.json`
    #[command(after_help = FETCH_EXIT_CODES)]
    Kits19(Kits19Args),
}

#[derive(Args, Debug)]
pub(super) struct Kits19Args {
    /// Output folder (created): the load stage's `path`
    #[arg(long)]
    pub(super) out: PathBuf,
    /// Cases to fetch: `0-209`, `5`, `0-9,20-29`
    #[arg(long, default_value = "0-209", value_parser = parse_case_list)]
    pub(super) cases: CaseList,
    /// Files downloaded at once
    #[arg(short, long, default_value_t = 4)]
    pub(super) jobs: usize,
    /// The imaging's root, under which `images/case_XXXXX.nii.gz`
    #[arg(long, value_name = "BASE", default_value = KITS19_IMAGING_URL)]
    pub(super) imaging_url: String,
    /// The segmentations' root, under which `data/case_XXXXX/segmentation.nii.gz` and
    /// `data/kits.json`
    #[arg(long, value_name = "BASE", default_value = KITS19_SEGMENTATION_URL)]
    pub(super) segmentation_url: String,
    /// Failed attempts in a row (without new bytes) before a file is given up
    #[arg(long, default_value_t = 5)]
    pub(super) retries: u32,
    /// Seconds before the first retry; the wait doubles each time, up to 60
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    pub(super) retry_wait: Duration,
}

#[derive(Debug, Clone)]
pub(super) struct CaseList(pub(super) Vec<u32>);

#[derive(Args, Debug)]
pub(super) struct GcArgs {
    /// Say what would be removed, remove nothing
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Instead: verify every entry and remove those whose content fails verification
    #[arg(long)]
    pub(super) corrupt: bool,
}

#[derive(Args, Debug)]
pub(super) struct VerifyArgs {
    /// The pipeline file (not needed with --cache)
    #[arg(required_unless_present = "cache")]
    pub(super) file: Option<PathBuf>,
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(super) set: Vec<String>,
    /// Instead: re-hash every entry of the existing cache and report rot
    #[arg(long, conflicts_with = "file")]
    pub(super) cache: bool,
    #[arg(short, long)]
    pub(super) jobs: Option<usize>,
    /// GPU nodes (and what reads them) pass when each metric in [0, 1] is within
    /// this of the locked result's: GPU training is not bit-reproducible
    #[arg(long, default_value_t = 0.02, value_name = "ABS")]
    pub(super) gpu_tolerance: f64,
}

#[derive(Subcommand, Debug)]
pub(super) enum BenchCommand {
    /// Load + window + resize of one case, one core (the slice stage's work)
    Slicing(SlicingArgs),
    /// U-Net training steps (forward, backward, Adam) on random data
    Train(NetBench),
    /// U-Net inference (forward and argmax) on random data
    Infer(NetBench),
    /// The training loader alone (reading the slice store, the study's flips, batching on
    /// its own thread), nothing consuming the batches
    Loader(LoaderArgs),
}

#[derive(Args, Debug)]
pub(super) struct LoaderArgs {
    /// A slice artifact (a directory with the slice store), or a slice node of a
    /// pipeline's latest run: `PIPELINE.toml:NODE`, e.g. `pipelines/unet_lr_sweep.toml:slice`
    #[arg(long, value_name = "DIR|PIPELINE:NODE")]
    pub(super) slices: String,
    /// The profile of a `PIPELINE:NODE` store
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub(super) batch: usize,
    /// Epochs over every slice of the store (one rate each)
    #[arg(long, default_value_t = 3)]
    pub(super) epochs: usize,
    /// Without the study's random flips (up/down and left/right, each with p = 0.5)
    #[arg(long)]
    pub(super) no_flips: bool,
}

#[derive(Args, Debug)]
pub(super) struct SlicingArgs {
    pub(super) imaging: PathBuf,
    pub(super) segmentation: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub(super) size: usize,
    #[arg(long, default_value_t = 5)]
    pub(super) repeat: usize,
}

#[derive(Args, Debug)]
pub(super) struct NetBench {
    #[arg(long, default_value_t = 128)]
    pub(super) size: usize,
    #[arg(long, default_value_t = 16)]
    pub(super) base: usize,
    #[arg(long, default_value_t = 8)]
    pub(super) batch: usize,
    /// Threads of the CPU backend's pool
    #[arg(long, default_value_t = 1)]
    pub(super) threads: usize,
    #[arg(long, default_value_t = 5)]
    pub(super) steps: usize,
    /// Untimed steps first (on a GPU they include autotuning)
    #[arg(long, default_value_t = 1)]
    pub(super) warmup: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub(super) backend: BackendArg,
    /// The GPU backend's float precision
    #[arg(long, value_enum, default_value = "f32")]
    pub(super) precision: PrecisionArg,
    /// The U-Net without batch norm (the study's network; the default has it, as the
    /// PyTorch script's)
    #[arg(long)]
    pub(super) no_batch_norm: bool,
}

#[derive(Args, Debug)]
pub(super) struct ScoreArgs {
    #[arg(long, required_unless_present = "truth_dir")]
    pub(super) truth: Option<PathBuf>,
    #[arg(long, required_unless_present = "pred_dir")]
    pub(super) pred: Option<PathBuf>,
    /// A KiTS19 folder of `case_XXXXX/segmentation.nii.gz`
    #[arg(long, requires = "pred_dir", conflicts_with = "truth")]
    pub(super) truth_dir: Option<PathBuf>,
    /// Predictions as `case_XXXXX.nii.gz` or `case_XXXXX/prediction.nii.gz`
    #[arg(long, conflicts_with = "pred")]
    pub(super) pred_dir: Option<PathBuf>,
    /// Labels above 2: `starter` (tumor, as the official code) or `rules` (background)
    #[arg(long, value_enum, default_value_t = crate::metrics::kits::LabelPolicy::Starter)]
    pub(super) label_policy: crate::metrics::kits::LabelPolicy,
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args, Debug)]
pub(super) struct PredictArgs {
    /// A train artifact (a directory with model.json and model.safetensors), or a
    /// node of a pipeline's latest run: `PIPELINE.toml:NODE[.OUTPUT]`, e.g.
    /// `pipelines/unet_lr_sweep.toml:sweep.best`
    #[arg(long, value_name = "DIR|PIPELINE:NODE")]
    pub(super) model: String,
    /// The profile of a `PIPELINE:NODE` model
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    #[arg(required = true)]
    pub(super) inputs: Vec<PathBuf>,
    /// Output file (one input) or folder
    #[arg(short, long)]
    pub(super) out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub(super) batch_size: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub(super) backend: BackendArg,
    /// The GPU backend's float precision (the CPU computes in f32)
    #[arg(long, value_enum, default_value = "f32")]
    pub(super) precision: PrecisionArg,
}

#[derive(Args, Debug)]
pub(super) struct ModelsArgs {
    /// Width of the first level
    #[arg(long, default_value_t = 64)]
    pub(super) base: usize,
    /// Input channels (1, or 2k+1 with k context slices each side)
    #[arg(long, default_value_t = 1)]
    pub(super) in_channels: usize,
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args, Debug)]
pub(super) struct MetricsArgs {
    #[command(flatten)]
    pub(super) pipeline: PipelineArgs,
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Args, Debug)]
pub(super) struct PipelineArgs {
    /// The pipeline file (TOML)
    pub(super) file: PathBuf,
    /// Merge `[profiles.<NAME>]` over the pipeline
    #[arg(long, value_name = "NAME")]
    pub(super) profile: Option<String>,
    /// Override a value: `--set stages.train.epochs=2` (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(super) set: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(super) enum TextOrJson {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(super) enum BackendArg {
    Cpu,
    Gpu,
}

impl BackendArg {
    pub(super) fn kind(self) -> crate::backend::BackendKind {
        match self {
            BackendArg::Cpu => crate::backend::BackendKind::Cpu,
            BackendArg::Gpu => crate::backend::BackendKind::Gpu,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(super) enum PrecisionArg {
    F32,
    Flex32,
    F16,
}

impl PrecisionArg {
    pub(super) fn precision(self) -> crate::backend::Precision {
        match self {
            PrecisionArg::F32 => crate::backend::Precision::F32,
            PrecisionArg::Flex32 => crate::backend::Precision::Flex32,
            PrecisionArg::F16 => crate::backend::Precision::F16,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(super) enum GraphFormat {
    Dot,
    Json,
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

fn parse_case_list(s: &str) -> Result<CaseList, String> {
    crate::fetch::parse_cases(s).map(CaseList)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|x| Duration::try_from_secs_f64(x).ok())
        .ok_or_else(|| format!("`{s}` is not a number of seconds"))
}
