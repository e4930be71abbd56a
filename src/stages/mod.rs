//! Stage kinds: what a node of the pipeline does.
//!
//! Each kind is one module with a parameter struct implementing [`Stage`]: serde gives the
//! TOML schema (kebab-case keys, defaults), [`Stage::check`] the value rules,
//! [`Stage::inputs`] the references to other stages, and [`Stage::run`] the work. The
//! executor only sees the object-safe [`DynStage`], which every [`Stage`] is.
//!
//! A stage is a pure function of its cache key: its resolved parameters, its inputs'
//! output digests, its seed (from the pipeline seed and the stage id) and whatever it
//! adds through [`Stage::key_material`]. It must not read the clock, the environment or
//! files it has not declared.

pub mod command;
pub mod evaluate;
pub mod load;
pub mod report;
pub mod slice;
pub mod split;
pub mod sweep;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::schema::ParamIssue;

use crate::backend::BackendKind;
use crate::hint::{Hint, Message};

/// A reference to another stage's output: `"split"` or `"split.train"`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageRef(pub String);

impl StageRef {
    /// The id of the referenced stage.
    pub fn stage(&self) -> &str {
        self.split().0
    }

    /// The named output, if any (`train` in `split.train`).
    pub fn port(&self) -> Option<&str> {
        self.split().1
    }

    /// A sweep arm's id (`train[lr=1e-3]`) may hold dots inside its brackets.
    fn split(&self) -> (&str, Option<&str>) {
        let end = self.0.rfind(']').map_or(0, |i| i + 1);
        match self.0[end..].find('.') {
            Some(i) => (&self.0[..end + i], Some(&self.0[end + i + 1..])),
            None => (&self.0, None),
        }
    }
}

impl std::fmt::Display for StageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    /// A failure with advice.
    #[error(transparent)]
    Advised(#[from] Message),
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl Hint for StageError {
    /// The advice of the failure, or of the lower layer's error it keeps.
    fn hint(&self) -> Option<String> {
        match self {
            StageError::Advised(m) => m.hint(),
            StageError::Other(e) => {
                if let Some(e) = e.downcast_ref::<crate::data::nifti::NiftiError>() {
                    e.hint()
                } else if let Some(e) = e.downcast_ref::<crate::data::kits::KitsError>() {
                    e.hint()
                } else if let Some(e) = e.downcast_ref::<crate::train::TrainError>() {
                    e.hint()
                } else {
                    e.downcast_ref::<Message>().and_then(Hint::hint)
                }
            }
            _ => None,
        }
    }
}

impl StageError {
    /// Any error of a lower layer (NIfTI, the slice store, training), kept as the cause.
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> StageError {
        StageError::Other(Box::new(e))
    }

    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StageError {
        let path = path.into();
        move |source| StageError::Io {
            action,
            path,
            source,
        }
    }
}

/// What a stage may look at while it is checked or keyed: never the clock or environment.
pub struct CheckContext<'a> {
    /// The directory of the pipeline file; relative paths in parameters start here.
    pub pipeline_dir: &'a Path,
    /// Digests of files outside the cache by their stat (while keying; `None` while
    /// checking a pipeline file, which hashes nothing).
    pub stat_cache: Option<&'a crate::cache::StatCache>,
}

impl CheckContext<'_> {
    /// The content digest of a declared file, through the stat cache when there is one.
    pub fn file_digest(&self, path: &Path) -> std::io::Result<String> {
        match self.stat_cache {
            Some(s) => s.digest(path),
            None => crate::cache::file_digest(path),
        }
    }
}

/// Progress of a running stage, forwarded to the executor's reporter.
#[derive(Debug, Clone)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    pub message: String,
}

/// Everything a running stage gets.
pub struct RunContext<'a> {
    /// The node id (`train[learning-rate=1e-3]` for a sweep arm).
    pub id: &'a str,
    /// This node's seed, derived from the pipeline seed and the id.
    pub seed: u64,
    /// An empty directory that becomes the artifact when the stage succeeds.
    pub out: &'a Path,
    /// An empty directory for temporary files, removed afterwards.
    pub scratch: &'a Path,
    /// A directory that survives an interrupted run of the same key (checkpoints), outside
    /// the cache entry; removed once the stage succeeds.
    pub resume: &'a Path,
    pub pipeline_dir: &'a Path,
    /// Artifact directory of every referenced stage, by stage id.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// The data folder outside the cache that an input's artifact names files in, by
    /// stage id, for inputs that have one ([`Stage::data_root`]: a KiTS19 folder).
    pub data_roots: &'a BTreeMap<String, PathBuf>,
    /// Digests of files outside the cache by their stat.
    pub stat_cache: &'a crate::cache::StatCache,
    /// The device a training node runs on (the GPU adapter index; one node per device).
    pub device: usize,
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

impl RunContext<'_> {
    /// The artifact directory of the referenced stage.
    pub fn input(&self, r: &StageRef) -> Result<&Path, StageError> {
        self.inputs
            .get(r.stage())
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::Failed(format!("input `{r}` was not provided")))
    }

    /// The directory a reference points into: the output's own subdirectory where the
    /// artifact has one (`train.best` of a sweep), else the whole artifact.
    pub fn input_dir(&self, r: &StageRef) -> Result<PathBuf, StageError> {
        let dir = self.input(r)?;
        Ok(match r.port() {
            Some(p) if dir.join(p).is_dir() => dir.join(p),
            _ => dir.to_path_buf(),
        })
    }

    /// The data folder the referenced stage's artifact names files relative to, where
    /// it is outside the cache (the load stage's `path`).
    pub fn data_root(&self, r: &StageRef) -> Option<&Path> {
        self.data_roots.get(r.stage()).map(PathBuf::as_path)
    }

    pub fn report(&self, done: u64, total: u64, message: impl Into<String>) {
        (self.progress)(Progress {
            done,
            total,
            message: message.into(),
        });
    }
}

/// The stage a reference names, while a pipeline is checked.
pub type Inputs<'a> = dyn Fn(&StageRef) -> Option<&'a dyn DynStage> + 'a;

/// A stage kind's parameters and behaviour.
pub trait Stage: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The `kind = "..."` value.
    const KIND: &'static str;
    /// Named outputs others may reference as `id.name`; `id` alone is the whole artifact.
    const OUTPUTS: &'static [&'static str] = &[];

    /// The backend a node of this stage computes on (training, evaluation): such a node
    /// holds one of the run's device slots (`--devices`) while it runs; `None`: no slot.
    fn backend(&self) -> Option<BackendKind> {
        None
    }

    /// Value rules serde cannot express (ranges, paths that must exist).
    fn check(&self, _ctx: &CheckContext) -> Vec<ParamIssue> {
        vec![]
    }

    /// The stages this one reads, each with the parameter path that names it.
    fn inputs(&self) -> Vec<(String, &StageRef)>;

    /// Rules that involve the stages this one reads, looked up with `input` (the train
    /// stage's `fold` against its split's `folds`); checked once every stage is built.
    fn check_inputs(&self, _input: &Inputs<'_>) -> Vec<ParamIssue> {
        vec![]
    }

    /// Extra content that enters the cache key, such as digests of declared files.
    fn key_material(&self, _ctx: &CheckContext) -> Result<serde_json::Value, StageError> {
        Ok(serde_json::Value::Null)
    }

    /// A seed of the stage's own that replaces the pipeline seed (train's `seed` key,
    /// swept for replicates).
    fn seed(&self) -> Option<u64> {
        None
    }

    /// The parameters that enter the cache key and the lock file: every key, less the
    /// options added after lock files existed while they hold the value that means "as
    /// before" (see [`omit_unset`]), so that adding an option kept every earlier key.
    fn key_params(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Whether a `sweep` table may expand this kind into arms (the sweep node compares
    /// the arms' per-epoch metrics, which only training writes).
    const SWEEPABLE: bool = false;

    /// A folder outside the cache whose files the artifact names by relative paths
    /// (and content digests), handed to the stages that read it: the artifact and its
    /// key stay the same wherever the folder is.
    fn data_root(&self, _ctx: &CheckContext) -> Option<PathBuf> {
        None
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError>;
}

/// The object-safe face of a [`Stage`], as the graph and executor use it.
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn outputs(&self) -> &'static [&'static str];
    fn backend(&self) -> Option<BackendKind>;
    /// Whether a node holds a device slot while it runs.
    fn uses_device(&self) -> bool {
        self.backend().is_some()
    }
    /// The resolved parameters, canonical (defaults filled, keys in a fixed order).
    fn params(&self) -> serde_json::Value;
    /// The parameters as the cache key and the lock file see them ([`Stage::key_params`]).
    fn key_params(&self) -> serde_json::Value;
    fn inputs(&self) -> Vec<(String, &StageRef)>;
    fn check_inputs(&self, input: &Inputs<'_>) -> Vec<ParamIssue>;
    fn key_material(&self, ctx: &CheckContext) -> Result<serde_json::Value, StageError>;
    fn seed(&self) -> Option<u64>;
    fn data_root(&self, ctx: &CheckContext) -> Option<PathBuf>;
    fn run(&self, ctx: &RunContext) -> Result<(), StageError>;
}

impl<S: Stage> DynStage for S {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn outputs(&self) -> &'static [&'static str] {
        S::OUTPUTS
    }
    fn backend(&self) -> Option<BackendKind> {
        Stage::backend(self)
    }
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
    fn key_params(&self) -> serde_json::Value {
        Stage::key_params(self)
    }
    fn inputs(&self) -> Vec<(String, &StageRef)> {
        Stage::inputs(self)
    }
    fn check_inputs(&self, input: &Inputs<'_>) -> Vec<ParamIssue> {
        Stage::check_inputs(self, input)
    }
    fn key_material(&self, ctx: &CheckContext) -> Result<serde_json::Value, StageError> {
        Stage::key_material(self, ctx)
    }
    fn seed(&self) -> Option<u64> {
        Stage::seed(self)
    }
    fn data_root(&self, ctx: &CheckContext) -> Option<PathBuf> {
        Stage::data_root(self, ctx)
    }
    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        Stage::run(self, ctx)
    }
}

/// `params` (an object) less each key of `later` that holds the given value: options
/// added after lock files were written, which leave the cache key alone while unset.
pub fn omit_unset(
    mut params: serde_json::Value,
    later: &[(&str, serde_json::Value)],
) -> serde_json::Value {
    if let Some(map) = params.as_object_mut() {
        for (key, unset) in later {
            if map.get(*key) == Some(unset) {
                map.remove(*key);
            }
        }
    }
    params
}

/// Builds a stage from its parameter table, or says everything wrong with it.
type Configure = fn(toml::Value, &CheckContext) -> Result<Box<dyn DynStage>, Vec<ParamIssue>>;

/// A registered stage kind.
pub struct Kind {
    pub name: &'static str,
    /// Whether a `sweep` table may expand it ([`Stage::SWEEPABLE`]).
    pub sweepable: bool,
    configure: Configure,
}

impl Kind {
    const fn of<S: Stage>() -> Self {
        Kind {
            name: S::KIND,
            sweepable: S::SWEEPABLE,
            configure: configure::<S>,
        }
    }

    /// Checks a stage table (without its `kind` key) and builds the stage.
    pub fn configure(
        &self,
        params: toml::Value,
        ctx: &CheckContext,
    ) -> Result<Box<dyn DynStage>, Vec<ParamIssue>> {
        (self.configure)(params, ctx)
    }
}

/// Every stage kind kpipe knows.
pub static KINDS: &[Kind] = &[
    Kind::of::<command::Command>(),
    Kind::of::<load::Load>(),
    Kind::of::<slice::Slice>(),
    Kind::of::<split::Split>(),
    Kind::of::<train::Train>(),
    Kind::of::<sweep::Sweep>(),
    Kind::of::<evaluate::Evaluate>(),
    Kind::of::<report::Report>(),
];

pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

fn configure<S: Stage>(
    params: toml::Value,
    ctx: &CheckContext,
) -> Result<Box<dyn DynStage>, Vec<ParamIssue>> {
    let (stage, mut issues) = crate::schema::parse_params::<S>(params);
    if let Some(stage) = &stage {
        issues.extend(stage.check(ctx));
    }
    match stage {
        Some(stage) if issues.is_empty() => Ok(Box::new(stage)),
        _ => Err(issues),
    }
}

#[cfg(test)]
mod tests {
    use super::StageRef;

    #[test]
    fn references_split_into_stage_and_output() {
        let r = |s: &str| StageRef(s.to_string());
        assert_eq!((r("split").stage(), r("split").port()), ("split", None));
        assert_eq!(
            (r("split.train").stage(), r("split.train").port()),
            ("split", Some("train"))
        );
        let arm = r("train[augment=0.5,lr=1e-3]");
        assert_eq!(
            (arm.stage(), arm.port()),
            ("train[augment=0.5,lr=1e-3]", None)
        );
        let best = r("train[x=0.5].best");
        assert_eq!((best.stage(), best.port()), ("train[x=0.5]", Some("best")));
    }
}
