//! The Slurm executor (`kpipe run FILE --executor slurm`): the driver, this process, holds
//! the graph, as Snakemake's and Nextflow's Slurm executors do. A node whose inputs are
//! complete and whose key is not in the cache becomes one `sbatch` job that runs
//! `kpipe node run` on the same pipeline: the job re-derives the plan, checks that its
//! key is the driver's, runs the stage and commits the entry into the cache, which must
//! be on a filesystem every node sees. The driver polls `squeue` (then `sacct`) and finds
//! the entry when the job ends; a job that ends without it fails its node with Slurm's
//! state and the tail of the job's log.
//!
//! Job names carry the key and the cache (`kpipe-<key, 16 hex digits>-<cache, 8>`: two
//! projects may compute the same key in caches of their own): a driver that is restarted
//! finds what finished in the cache and what is still queued or running in `squeue`,
//! attaches to those jobs and submits only the rest. SIGINT or SIGTERM cancels the jobs
//! this driver is waiting on (`scancel`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Resources;
use crate::exec::{Done, Event, Job, Launcher, NodeError};
use crate::hint::Hint;

/// What the driver needs to submit jobs.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// The kpipe binary the jobs run: this one, on a path every node sees.
    pub exe: PathBuf,
    /// The shared cache (absolute).
    pub cache_dir: PathBuf,
    /// The pipeline file (absolute), its profile and `--set` overrides, as the driver got
    /// them: the job derives the same plan.
    pub pipeline: PathBuf,
    pub profile: Option<String>,
    pub overrides: Vec<String>,
    /// More `sbatch` arguments for every job (`--slurm-arg`).
    pub extra: Vec<String>,
    /// How often the driver asks Slurm about its jobs.
    pub poll: Duration,
}

/// Why the Slurm executor could not start, or a job did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("cannot run `{program}`: {source}")]
    Missing {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("the Slurm controller does not answer: {0}")]
    Down(String),
    #[error("`sbatch` refused `{id}`: {stderr}")]
    Submit { id: String, stderr: String },
    #[error(
        "Slurm job {job} of `{id}` ended {state} without its result; the end of its log `{log}`:\n{tail}"
    )]
    Failed {
        id: String,
        job: String,
        state: String,
        log: PathBuf,
        tail: String,
    },
    #[error("interrupted: Slurm job {job} of `{id}` was cancelled")]
    Interrupted { id: String, job: String },
    #[error("interrupted: `{id}` was not submitted")]
    NotSubmitted { id: String },
}

impl Hint for SlurmError {
    fn hint(&self) -> Option<String> {
        match self {
            SlurmError::Missing { .. } | SlurmError::Down(_) => Some(
                "run where `sbatch`, `squeue` and `sacct` reach the cluster, or use the local executor".into(),
            ),
            SlurmError::Failed { .. } => {
                Some("run it again: the node is submitted anew, the rest is cached".into())
            }
            _ => None,
        }
    }
}

/// Submits nodes as Slurm jobs and waits for their entries.
pub struct Slurm {
    opts: SlurmOptions,
    interrupted: Arc<AtomicBool>,
}

impl Slurm {
    /// Checks that the Slurm commands are there and the controller answers, before
    /// anything is submitted.
    pub fn connect(opts: SlurmOptions) -> Result<Slurm, SlurmError> {
        for program in ["sbatch", "squeue", "scancel"] {
            Command::new(program)
                .arg("--version")
                .output()
                .map_err(|source| SlurmError::Missing { program, source })?;
        }
        let ping = Command::new("scontrol")
            .arg("ping")
            .output()
            .map_err(|source| SlurmError::Missing {
                program: "scontrol",
                source,
            })?;
        let text = String::from_utf8_lossy(&ping.stdout).to_string();
        if !ping.status.success() || !text.contains("UP") {
            let why = format!(
                "{}{}",
                text.trim(),
                String::from_utf8_lossy(&ping.stderr).trim()
            );
            return Err(SlurmError::Down(why));
        }
        let interrupted = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // without a handler, the signal's default action ends the driver at once
            let _ = signal_hook::flag::register(signal, interrupted.clone());
        }
        std::fs::create_dir_all(opts.cache_dir.join("slurm")).map_err(|source| {
            SlurmError::Missing {
                program: "the cache's slurm/ folder",
                source,
            }
        })?;
        Ok(Slurm { opts, interrupted })
    }

    /// The job name of a key in this cache: how a restarted driver finds its jobs.
    pub fn job_name(&self, key: &str) -> String {
        let cache = blake3::hash(self.opts.cache_dir.as_os_str().as_encoded_bytes());
        format!(
            "kpipe-{}-{}",
            &key[..key.len().min(16)],
            &cache.to_hex()[..8]
        )
    }

    /// The `sbatch` arguments of a node: its resources, a GPU for GPU training, the
    /// user's extra arguments.
    fn resources(&self, job: &Job<'_>) -> Vec<String> {
        let st = &job.plan.spec.stages[job.index];
        let r: &Resources = &st.resources;
        let gpu_node = st.stage.uses_device() && st.stage.params()["backend"] == "gpu";
        let mut args = Vec::new();
        if let Some(c) = r.cpus {
            args.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &r.mem {
            args.push(format!("--mem={m}"));
        }
        if let Some(t) = &r.time {
            args.push(format!("--time={t}"));
        }
        if let Some(p) = &r.partition {
            args.push(format!("--partition={p}"));
        }
        match r.gpus {
            Some(0) => {}
            Some(n) => args.push(format!("--gres=gpu:{n}")),
            None if gpu_node => args.push("--gres=gpu:1".into()),
            None => {}
        }
        args.extend(self.opts.extra.iter().cloned());
        args
    }

    /// The command line a job runs.
    fn node_command(&self, id: &str, key: &str) -> String {
        let o = &self.opts;
        let mut words: Vec<String> = vec![
            o.exe.display().to_string(),
            "--no-progress".into(),
            "--cache-dir".into(),
            o.cache_dir.display().to_string(),
            "node".into(),
            "run".into(),
            o.pipeline.display().to_string(),
        ];
        if let Some(p) = &o.profile {
            words.extend(["--profile".into(), p.clone()]);
        }
        for s in &o.overrides {
            words.extend(["--set".into(), s.clone()]);
        }
        words.extend(["--node".into(), id.into(), "--key".into(), key.into()]);
        let quoted: Vec<String> = words
            .iter()
            .map(|w| shlex::try_quote(w).map_or_else(|_| w.clone(), |q| q.into_owned()))
            .collect();
        format!("exec {}", quoted.join(" "))
    }

    fn log_path(&self, key: &str, job: &str) -> PathBuf {
        self.opts
            .cache_dir
            .join("slurm")
            .join(format!("{key}-{job}.log"))
    }

    /// A queued or running job of this key, left by an earlier driver.
    fn existing(&self, key: &str) -> Option<String> {
        let out = Command::new("squeue")
            .args(["-h", "-o", "%i", "-n", &self.job_name(key)])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    }

    fn submit(&self, job: &Job<'_>, log: &Path) -> Result<String, SlurmError> {
        let id = &job.plan.spec.stages[job.index].id;
        let out = Command::new("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name={}", self.job_name(&job.key.key)))
            .arg(format!("--output={}", log.display()))
            .arg(format!("--chdir={}", job.plan.spec.dir.display()))
            .args(self.resources(job))
            .arg(format!("--wrap={}", self.node_command(id, &job.key.key)))
            .output()
            .map_err(|source| SlurmError::Missing {
                program: "sbatch",
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let number = stdout
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if !out.status.success() || number.is_empty() {
            return Err(SlurmError::Submit {
                id: id.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(number)
    }

    /// The job's state while Slurm still lists it (`PENDING`, `RUNNING`, ...).
    fn queued_state(job: &str) -> Option<String> {
        let out = Command::new("squeue")
            .args(["-h", "-o", "%T", "-j", job])
            .output()
            .ok()?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !state.is_empty()).then_some(state)
    }

    /// How a job ended, from the accounting (`FAILED (exit 1:0)`), when there is one.
    fn final_state(job: &str) -> String {
        for _ in 0..20 {
            let out = Command::new("sacct")
                .args(["-n", "-P", "-X", "-o", "State,ExitCode", "-j", job])
                .output();
            if let Ok(out) = out {
                let text = String::from_utf8_lossy(&out.stdout);
                if let Some((state, code)) = text.lines().next().and_then(|l| l.split_once('|'))
                    && !matches!(state, "RUNNING" | "PENDING" | "COMPLETING" | "")
                {
                    return format!("{state} (exit {code})");
                }
            } else {
                break; // no accounting
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        "with no accounting record".into()
    }
}

/// The last lines of a job's log.
fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(cannot read it: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Launcher for Slurm {
    fn launch(&self, job: &Job<'_>) -> Result<Done, NodeError> {
        let id = &job.plan.spec.stages[job.index].id;
        let key = &job.key.key;
        let launch = |e: SlurmError| NodeError::Launch(Box::new(e));
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(launch(SlurmError::NotSubmitted { id: id.clone() }));
        }
        let start = Instant::now();
        let (number, log) = match self.existing(key) {
            Some(number) => {
                let log = self.log_path(key, &number);
                job.reporter.event(Event::Placed {
                    id,
                    place: &format!("Slurm job {number} (queued by an earlier driver)"),
                });
                (number, log)
            }
            None => {
                let pattern = self
                    .opts
                    .cache_dir
                    .join("slurm")
                    .join(format!("{key}-%j.log"));
                let number = self.submit(job, &pattern).map_err(launch)?;
                job.reporter.event(Event::Placed {
                    id,
                    place: &format!("Slurm job {number}"),
                });
                (number.clone(), self.log_path(key, &number))
            }
        };
        let mut last = String::new();
        while let Some(state) = Self::queued_state(&number) {
            if self.interrupted.load(Ordering::Relaxed) {
                let _ = Command::new("scancel").arg(&number).status();
                return Err(launch(SlurmError::Interrupted {
                    id: id.clone(),
                    job: number,
                }));
            }
            if state != last {
                job.reporter.event(Event::Placed {
                    id,
                    place: &format!("Slurm job {number} {state}"),
                });
                last = state;
            }
            std::thread::sleep(self.opts.poll);
        }
        match job.cache.lookup(key)? {
            Some(entry) => Ok(Done::Ran(entry, start.elapsed().as_secs_f64())),
            None => Err(launch(SlurmError::Failed {
                id: id.clone(),
                state: Self::final_state(&number),
                tail: tail(&log, 15),
                job: number,
                log,
            })),
        }
    }
}
