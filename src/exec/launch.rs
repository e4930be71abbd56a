//! Where a node runs: the [`Launcher`] that the executor hands each node that must run
//! ([`Local`]: a thread of this process), the run of one node itself, and [`run_one`],
//! one node alone, as a job of a cluster runs it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use super::{Event, NodeError, NodeKey, Reporter, node_key};
use crate::cache::{CACHE_FORMAT, Cache, Entry, Manifest};
use crate::graph::Plan;
use crate::stages::{CheckContext, Progress, RunContext};

/// A node to run, as a [`Launcher`] gets it: its inputs are complete and its key is not
/// in the cache.
pub struct Job<'a> {
    pub plan: &'a Plan,
    pub cache: &'a Cache,
    /// The node's index in the plan.
    pub index: usize,
    pub key: &'a NodeKey,
    /// The entries of the node's inputs, by stage id.
    pub inputs: &'a [(String, Entry)],
    /// The device (GPU adapter index) a training node runs on; 0 otherwise.
    pub device: usize,
    /// CPU threads the node's kernels run on ([`crate::backend::on_pool`]).
    pub threads: usize,
    pub reporter: &'a dyn Reporter,
}

/// Where nodes run: in this process ([`Local`]), or elsewhere (a cluster's jobs) with the
/// entry committed into the shared cache, which the launcher then finds.
pub trait Launcher: Sync {
    fn launch(&self, job: &Job<'_>) -> Result<Done, NodeError>;
}

/// Runs nodes in this process, one thread each.
pub struct Local;

impl Launcher for Local {
    fn launch(&self, job: &Job<'_>) -> Result<Done, NodeError> {
        run_node(job)
    }
}

/// Runs node `index` alone, as a job that a driver submitted runs it: every input must be
/// in the cache, and the node's key here must be `expected`, the driver's (else the
/// pipeline, its data or kpipe differ between the machines). A node that is cached by
/// now is found, not run again.
pub fn run_one(
    plan: &Plan,
    cache: &Cache,
    index: usize,
    expected: &str,
    reporter: &dyn Reporter,
) -> Result<Done, NodeError> {
    let mut digests: Vec<Option<String>> = vec![None; plan.len()];
    let mut entries: BTreeMap<usize, Entry> = BTreeMap::new();
    let needed = plan.dependencies(index);
    for &j in plan.order() {
        if j == index {
            break;
        }
        if let Some(k) = node_key(plan, cache, j, &digests)?
            && let Some(entry) = cache.lookup(&k.key)?
        {
            digests[j] = Some(entry.manifest.output.clone());
            entries.insert(j, entry);
        }
    }
    let id = &plan.spec.stages[index].id;
    let message = |text: String, hint: &str| {
        NodeError::Launch(Box::new(crate::hint::Message::new(text).with_hint(hint)))
    };
    if let Some(&d) = needed.iter().find(|d| digests[**d].is_none()) {
        return Err(message(
            format!(
                "input `{}` of `{id}` is not in the cache",
                plan.spec.stages[d].id
            ),
            "the cache must be the driver's: a path that every machine sees",
        ));
    }
    let key = node_key(plan, cache, index, &digests)?.expect("every input is known");
    if key.key != expected {
        return Err(message(
            format!(
                "`{id}` has key {} here, but the driver submitted {}",
                &key.key[..12],
                &expected[..expected.len().min(12)]
            ),
            "the pipeline file, its data or the kpipe binary differ between the driver and this machine",
        ));
    }
    // run_node finds an entry that is in place by now (after taking the key's claim)
    let inputs: Vec<(String, Entry)> = needed
        .iter()
        .map(|d| (plan.spec.stages[*d].id.clone(), entries[d].clone()))
        .collect();
    run_node(&Job {
        plan,
        cache,
        index,
        key: &key,
        inputs: &inputs,
        device: 0,
        threads: crate::backend::cores(),
        reporter,
    })
}

/// How a node that did not fail ended.
pub enum Done {
    /// It ran, taking this many seconds.
    Ran(Entry, f64),
    /// Another process computed its key while this one waited for the key's claim.
    Found(Entry),
}

fn run_node(job: &Job<'_>) -> Result<Done, NodeError> {
    let &Job {
        plan,
        cache,
        index: i,
        key,
        inputs: input_entries,
        device,
        threads,
        reporter,
    } = job;
    let st = &plan.spec.stages[i];
    let span = tracing::info_span!("stage", id = %st.id, kind = st.stage.kind());
    let _guard = span.enter();
    // one process computes a key at a time; whoever waited finds the entry
    let claim = cache.claim(&key.key, || {
        reporter.event(Event::Progress {
            id: &st.id,
            progress: &Progress {
                done: 0,
                total: 0,
                message: "waiting: another run is computing this key".into(),
            },
        });
    })?;
    if let Some(entry) = cache.lookup(&key.key)? {
        return Ok(Done::Found(entry));
    }
    let start = Instant::now();
    // what the stage is about to read must be what was written
    for (id, entry) in input_entries {
        cache
            .verify(entry)
            .map_err(|source| NodeError::CorruptInput {
                id: id.clone(),
                source,
            })?;
    }
    let inputs: BTreeMap<String, PathBuf> = input_entries
        .iter()
        .map(|(id, entry)| (id.clone(), entry.out()))
        .collect();
    let check = CheckContext {
        pipeline_dir: &plan.spec.dir,
        stat_cache: Some(cache.stat_cache()),
    };
    let data_roots: BTreeMap<String, PathBuf> = plan
        .dependencies(i)
        .into_iter()
        .filter_map(|d| {
            let dep = &plan.spec.stages[d];
            dep.stage.data_root(&check).map(|r| (dep.id.clone(), r))
        })
        .collect();
    let writer = cache.begin(&claim)?;
    let (out, scratch) = (writer.out(), writer.scratch());
    let resume = cache.resume_dir(&key.key);
    let progress = |p: Progress| {
        reporter.event(Event::Progress {
            id: &st.id,
            progress: &p,
        });
    };
    let ctx = RunContext {
        id: &st.id,
        seed: st.seed,
        out: &out,
        scratch: &scratch,
        resume: &resume,
        pipeline_dir: &plan.spec.dir,
        inputs: &inputs,
        data_roots: &data_roots,
        stat_cache: cache.stat_cache(),
        device,
        progress: &progress,
    };
    tracing::info!("running");
    crate::backend::on_pool(threads, || st.stage.run(&ctx))?;
    let seconds = start.elapsed().as_secs_f64();
    let manifest = Manifest {
        format: CACHE_FORMAT,
        kpipe_version: env!("CARGO_PKG_VERSION").into(),
        key: key.key.clone(),
        stage: st.id.clone(),
        kind: st.stage.kind().into(),
        params: st.stage.key_params(),
        seed: st.seed,
        inputs: key.inputs.clone(),
        extra: key.extra.clone(),
        output: String::new(),
        files: 0,
        bytes: 0,
        duration_s: seconds,
        listing: vec![],
    };
    let entry = writer.commit(manifest)?;
    let _ = std::fs::remove_dir_all(&resume);
    tracing::info!(seconds, "finished");
    Ok(Done::Ran(entry, seconds))
}
