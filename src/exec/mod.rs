//! The executor: runs a [`Plan`] against a [`Cache`].
//!
//! Nodes whose inputs are ready run concurrently, up to `jobs` at a time; nodes that
//! train take one of `device_slots` too, so two trainings never share one device. Each
//! node's key is computed once its inputs' output digests are known; a node whose key is
//! in the cache is not run, and its entry is checked by sizes and modes only
//! ([`Cache::lookup`]): a run with nothing to do reads no artifact. A node that runs has
//! each of its inputs' entries re-hashed first ([`Cache::verify`]); a corrupt one fails
//! it with exit code 3. A failed node skips its dependents and lets independent nodes
//! finish (or, with `fail_fast`, stops starting new ones). Events go to a [`Reporter`];
//! nothing here draws on the terminal.

mod launch;
mod preview;

use std::collections::BTreeMap;
use std::sync::{Arc, mpsc};

pub use launch::{Done, Job, Launcher, Local, run_one};
pub use preview::{NodePreview, PreviewStatus, preview};

use crate::cache::{Cache, CacheError, Entry, KeyMaterial, LockFile, LockRecord};
use crate::graph::Plan;
use crate::hint::Hint;
use crate::stages::{CheckContext, Progress, StageError};

/// What happens to nodes, as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run starts with this many nodes.
    Planned {
        nodes: usize,
    },
    Cached {
        id: &'a str,
    },
    Started {
        id: &'a str,
    },
    Progress {
        id: &'a str,
        progress: &'a Progress,
    },
    Finished {
        id: &'a str,
        seconds: f64,
    },
    Failed {
        id: &'a str,
        error: &'a NodeError,
    },
    Skipped {
        id: &'a str,
        reason: &'a str,
    },
    /// Where a running node runs, when it is not simply this process: a Slurm job and
    /// its state.
    Placed {
        id: &'a str,
        place: &'a str,
    },
}

/// Receives [`Event`]s; the CLI draws them, tests record them.
pub trait Reporter: Sync {
    fn event(&self, event: Event<'_>);
}

/// A reporter that drops everything.
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: Event<'_>) {}
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Nodes running at once.
    pub jobs: usize,
    /// Nodes that need a device (training) running at once: one per GPU, one on CPU.
    pub device_slots: usize,
    pub fail_fast: bool,
    /// Write the pipeline's lock file afterwards (not when verifying into a scratch cache).
    pub record_lock: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: crate::backend::cores(),
            device_slots: 1,
            record_lock: true,
            fail_fast: false,
        }
    }
}

/// Why a node did not complete, with the causes the stage or the cache gave.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The stage failed, or its key could not be computed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The cache could not be read or written, or the node's own entry is corrupt.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// An input's entry is not what was written (re-hashed before the stage reads it).
    #[error("input `{id}`: {source}")]
    CorruptInput { id: String, source: CacheError },
    /// The launcher that runs nodes elsewhere (a Slurm job) failed, or the node did.
    #[error("{0}")]
    Launch(Box<dyn LaunchError>),
}

/// A [`Launcher`]'s error: any error that can give a hint.
pub trait LaunchError: std::error::Error + Hint + Send + Sync {}

impl<T: std::error::Error + Hint + Send + Sync> LaunchError for T {}

impl NodeError {
    /// A corrupt cache entry (exit code 3) rather than a failure while working.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            NodeError::Cache(CacheError::Corrupt { .. }) | NodeError::CorruptInput { .. }
        )
    }
}

impl Hint for NodeError {
    fn hint(&self) -> Option<String> {
        match self {
            NodeError::Stage(e) => e.hint(),
            _ if self.is_corrupt() => Some("remove it (`kpipe gc --corrupt`) and run again".into()),
            NodeError::Launch(e) => e.hint(),
            NodeError::Cache(_) | NodeError::CorruptInput { .. } => None,
        }
    }
}

/// How a node ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ran {
        key: String,
        output: String,
        seconds: f64,
    },
    Cached {
        key: String,
        output: String,
    },
    Failed {
        error: Arc<NodeError>,
    },
    /// Its cache entry, or an input's, failed verification.
    Corrupt {
        error: Arc<NodeError>,
    },
    Skipped {
        reason: String,
    },
}

/// The result of a run, one outcome per node in plan order.
#[derive(Debug)]
pub struct RunSummary {
    pub outcomes: Vec<(String, Outcome)>,
}

impl RunSummary {
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|(_, o)| f(o)).count()
    }

    /// 0 all done, 3 a corrupt cache entry, 1 a failed or skipped node.
    pub fn exit_code(&self) -> i32 {
        if self.count(|o| matches!(o, Outcome::Corrupt { .. })) > 0 {
            3
        } else if self.count(|o| matches!(o, Outcome::Failed { .. } | Outcome::Skipped { .. })) > 0
        {
            1
        } else {
            0
        }
    }
}

/// A node's key and what it was computed from.
#[derive(Debug, Clone)]
pub struct NodeKey {
    pub key: String,
    pub inputs: BTreeMap<String, String>,
    pub extra: serde_json::Value,
}

/// The key of node `i`, given the output digests known so far; `None` while an input's
/// digest is unknown.
pub(crate) fn node_key(
    plan: &Plan,
    cache: &Cache,
    i: usize,
    digests: &[Option<String>],
) -> Result<Option<NodeKey>, StageError> {
    let st = &plan.spec.stages[i];
    let mut inputs = BTreeMap::new();
    for d in plan.dependencies(i) {
        match &digests[d] {
            Some(digest) => inputs.insert(plan.spec.stages[d].id.clone(), digest.clone()),
            None => return Ok(None),
        };
    }
    let extra = st.stage.key_material(&CheckContext {
        pipeline_dir: &plan.spec.dir,
        stat_cache: Some(cache.stat_cache()),
    })?;
    let params = st.stage.key_params();
    let key = KeyMaterial {
        kind: st.stage.kind(),
        params: &params,
        seed: st.seed,
        inputs: &inputs,
        extra: &extra,
    }
    .key();
    Ok(Some(NodeKey { key, inputs, extra }))
}

enum State {
    Waiting,
    Running,
    Done { key: NodeKey, entry: Box<Entry> },
    Ended,
}

/// Runs every node that is not cached, then records the lock file.
pub fn run(
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    reporter: &dyn Reporter,
) -> Result<RunSummary, CacheError> {
    run_with(plan, cache, opts, reporter, &Local)
}

/// [`run`], with the nodes that must run handed to `launcher`.
pub fn run_with(
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    reporter: &dyn Reporter,
    launcher: &dyn Launcher,
) -> Result<RunSummary, CacheError> {
    let n = plan.len();
    let mut state: Vec<State> = (0..n).map(|_| State::Waiting).collect();
    let mut digests: Vec<Option<String>> = vec![None; n];
    let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
    reporter.event(Event::Planned { nodes: n });
    let (tx, rx) = mpsc::channel::<(usize, NodeKey, Result<Done, NodeError>)>();
    std::thread::scope(|scope| {
        let (mut running, mut stop) = (0usize, false);
        // which device each training node holds: one node per device at a time
        let mut devices: Vec<Option<usize>> = vec![None; opts.device_slots.max(1)];
        loop {
            for &i in plan.order() {
                if !matches!(state[i], State::Waiting) || stop {
                    continue;
                }
                let id = plan.spec.stages[i].id.as_str();
                let deps = plan.dependencies(i);
                if let Some(&bad) = deps.iter().find(|&&d| {
                    matches!(
                        outcomes[d],
                        Some(
                            Outcome::Failed { .. }
                                | Outcome::Corrupt { .. }
                                | Outcome::Skipped { .. }
                        )
                    )
                }) {
                    let reason = format!("input `{}` did not complete", plan.spec.stages[bad].id);
                    reporter.event(Event::Skipped {
                        id,
                        reason: &reason,
                    });
                    outcomes[i] = Some(Outcome::Skipped { reason });
                    state[i] = State::Ended;
                    continue;
                }
                if deps.iter().any(|&d| digests[d].is_none()) {
                    continue;
                }
                let key = match node_key(plan, cache, i, &digests) {
                    Ok(Some(k)) => k,
                    Ok(None) => continue,
                    Err(e) => {
                        let error = Arc::new(NodeError::from(e));
                        reporter.event(Event::Failed { id, error: &error });
                        outcomes[i] = Some(Outcome::Failed { error });
                        state[i] = State::Ended;
                        stop |= opts.fail_fast;
                        continue;
                    }
                };
                match cache.lookup(&key.key) {
                    Ok(Some(entry)) => {
                        reporter.event(Event::Cached { id });
                        digests[i] = Some(entry.manifest.output.clone());
                        outcomes[i] = Some(Outcome::Cached {
                            key: key.key.clone(),
                            output: entry.manifest.output.clone(),
                        });
                        state[i] = State::Done {
                            key,
                            entry: Box::new(entry),
                        };
                        continue;
                    }
                    Err(e) => {
                        let error = Arc::new(NodeError::from(e));
                        reporter.event(Event::Failed { id, error: &error });
                        outcomes[i] = Some(if error.is_corrupt() {
                            Outcome::Corrupt { error }
                        } else {
                            Outcome::Failed { error }
                        });
                        state[i] = State::Ended;
                        stop |= opts.fail_fast;
                        continue;
                    }
                    Ok(None) => {}
                }
                let free = devices.iter().position(Option::is_none);
                let uses_device = plan.spec.stages[i].stage.uses_device();
                if running >= opts.jobs.max(1) || (uses_device && free.is_none()) {
                    continue;
                }
                running += 1;
                let device = free.filter(|_| uses_device);
                if let Some(d) = device {
                    devices[d] = Some(i);
                }
                state[i] = State::Running;
                reporter.event(Event::Started { id });
                if let Some(d) = device.filter(|_| opts.device_slots > 1) {
                    reporter.event(Event::Placed {
                        id,
                        place: &format!("device {d}"),
                    });
                }
                let inputs: Vec<(String, Entry)> = deps
                    .iter()
                    .filter_map(|&d| match &state[d] {
                        State::Done { entry, .. } => {
                            Some((plan.spec.stages[d].id.clone(), (**entry).clone()))
                        }
                        _ => None,
                    })
                    .collect();
                // the cores, shared by the trainings that may run at once
                let threads = if uses_device {
                    (crate::backend::cores() / opts.device_slots.max(1)).max(1)
                } else {
                    crate::backend::cores()
                };
                let tx = tx.clone();
                scope.spawn(move || {
                    let job = Job {
                        plan,
                        cache,
                        index: i,
                        key: &key,
                        inputs: &inputs,
                        device: device.unwrap_or(0),
                        threads,
                        reporter,
                    };
                    let result = launcher.launch(&job);
                    let _ = tx.send((i, key, result));
                });
            }
            if running == 0 {
                break;
            }
            let Ok((i, key, result)) = rx.recv() else {
                break;
            };
            running -= 1;
            let id = plan.spec.stages[i].id.as_str();
            if let Some(d) = devices.iter().position(|&n| n == Some(i)) {
                devices[d] = None;
            }
            match result {
                Ok(done) => {
                    let entry = match done {
                        Done::Ran(entry, seconds) => {
                            reporter.event(Event::Finished { id, seconds });
                            outcomes[i] = Some(Outcome::Ran {
                                key: key.key.clone(),
                                output: entry.manifest.output.clone(),
                                seconds,
                            });
                            entry
                        }
                        Done::Found(entry) => {
                            reporter.event(Event::Cached { id });
                            outcomes[i] = Some(Outcome::Cached {
                                key: key.key.clone(),
                                output: entry.manifest.output.clone(),
                            });
                            entry
                        }
                    };
                    digests[i] = Some(entry.manifest.output.clone());
                    state[i] = State::Done {
                        key,
                        entry: Box::new(entry),
                    };
                }
                Err(error) => {
                    reporter.event(Event::Failed { id, error: &error });
                    let error = Arc::new(error);
                    outcomes[i] = Some(if error.is_corrupt() {
                        Outcome::Corrupt { error }
                    } else {
                        Outcome::Failed { error }
                    });
                    state[i] = State::Ended;
                    stop |= opts.fail_fast;
                }
            }
        }
    });
    if let Err(e) = cache.stat_cache().save() {
        tracing::warn!("cannot save the stat cache: {e}");
    }
    let summary = RunSummary {
        outcomes: plan
            .order()
            .iter()
            .map(|&i| {
                let outcome = outcomes[i].clone().unwrap_or(Outcome::Skipped {
                    reason: "not started after an earlier failure (--fail-fast)".into(),
                });
                (plan.spec.stages[i].id.clone(), outcome)
            })
            .collect(),
    };
    if opts.record_lock {
        record_lock(plan, cache, &state)?;
    }
    Ok(summary)
}

/// Writes the lock file: the new record of every completed node; nodes that did not
/// complete keep their previous record.
fn record_lock(plan: &Plan, cache: &Cache, state: &[State]) -> Result<(), CacheError> {
    let path = LockFile::path_for(&plan.spec.file, plan.spec.profile.as_deref());
    let old = LockFile::read(&path).unwrap_or_default();
    let mut lock = LockFile {
        version: 1,
        pipeline: plan.spec.name.clone(),
        profile: plan.spec.profile.clone(),
        nodes: BTreeMap::new(),
    };
    for (i, st) in plan.spec.stages.iter().enumerate() {
        let record = match &state[i] {
            State::Done { key, entry } => Some(LockRecord {
                kind: st.stage.kind().into(),
                key: key.key.clone(),
                output: entry.manifest.output.clone(),
                params: st.stage.key_params(),
                inputs: key.inputs.clone(),
                extra: key.extra.clone(),
            }),
            _ => old.nodes.get(&st.id).cloned(),
        };
        if let Some(r) = record {
            lock.nodes.insert(st.id.clone(), r);
        }
    }
    if lock.nodes.is_empty() && !path.exists() {
        return Ok(());
    }
    lock.write(&path)?;
    cache.register_lock(&path)
}
