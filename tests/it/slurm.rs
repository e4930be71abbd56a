//! `kpipe run --executor slurm` against a real Slurm (`scripts/slurm-localhost.sh up`, as
//! `.ci/run` does). Without `sbatch` the tests say so and skip, unless
//! `KPIPE_REQUIRE_SLURM=1` (CI), which makes a missing Slurm a failure.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, Project};

/// Whether a Slurm cluster answers here; `false` (with a visible note) when the tests
/// must skip.
fn slurm() -> bool {
    let up = std::process::Command::new("scontrol")
        .arg("ping")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("UP"));
    if !up {
        assert!(
            std::env::var("KPIPE_REQUIRE_SLURM").as_deref() != Ok("1"),
            "KPIPE_REQUIRE_SLURM=1 but no Slurm controller answers `scontrol ping`"
        );
        eprintln!(
            "skipped: no Slurm controller answers (`scripts/slurm-localhost.sh up` starts one)"
        );
    }
    up
}

const SLURM: &[&str] = &["--executor", "slurm", "--slurm-poll", "0.2"];

fn run_slurm(p: &Project, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--no-progress", "run"];
    all.extend_from_slice(args);
    all.extend_from_slice(SLURM);
    p.run(&all)
}

#[test]
fn the_ci_study_through_slurm_writes_the_local_lock() {
    if !slurm() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (local, cluster) = (Project::new(), Project::new());
    for p in [&local, &cluster] {
        std::fs::copy(
            root.join("pipelines/unet_lr_sweep.toml"),
            p.path().join("study.toml"),
        )
        .unwrap();
    }
    let (code, _, err) = local.run(&["--no-progress", "run", "study.toml", "--profile", "ci"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run_slurm(&cluster, &["study.toml", "--profile", "ci"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(": Slurm job "), "{err}");
    assert_eq!(common::ran(&err).len(), 10, "{err}");
    let lock = |p: &Project| std::fs::read_to_string(p.path().join("study.ci.lock")).unwrap();
    assert_eq!(lock(&local), lock(&cluster), "the lock files differ");
    // nothing left to do, and nothing submitted
    let (code, _, err) = run_slurm(&cluster, &["study.toml", "--profile", "ci"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("0 ran, 10 cached") && !err.contains("Slurm job"),
        "{err}"
    );
}

const FAILING: &str = r#"
[pipeline]
name = "failing"
seed = 1

[stages.ok]
kind = "command"
cmd = ["sh", "-c", "echo fine > ok.txt"]
outs = ["ok.txt"]

[stages.bad]
kind = "command"
cmd = ["sh", "-c", "echo about to fail >&2; exit 3"]
inputs = ["ok"]
outs = ["never.txt"]

[stages.after]
kind = "command"
cmd = ["sh", "-c", "cp in/bad/never.txt x.txt"]
inputs = ["bad"]
outs = ["x.txt"]
"#;

#[test]
fn a_failed_job_fails_its_node_shows_its_log_and_skips_dependents() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    p.write("failing.toml", FAILING);
    let (code, _, err) = run_slurm(&p, &["failing.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("  failed  bad"), "{err}");
    assert!(err.contains("ended FAILED"), "Slurm's state: {err}");
    assert!(
        err.contains("| ") && err.contains("about to fail"),
        "the log's tail: {err}"
    );
    assert!(
        err.contains(" skipped  after: input `bad` did not complete"),
        "{err}"
    );
    assert_eq!(common::ran(&err), ["ok"]);
    assert_eq!(p.entries().len(), 1, "nothing cached for the failed node");
}

#[test]
fn without_a_controller_nothing_is_submitted_and_the_exit_code_is_2() {
    let p = Project::new();
    p.write("failing.toml", FAILING);
    let out = p
        .kpipe(&[
            "--no-progress",
            "run",
            "failing.toml",
            "--executor",
            "slurm",
        ])
        .env("PATH", p.path().join("no-such-bin"))
        .output()
        .unwrap();
    let (code, _, err) = common::outcome(out);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot run `sbatch`") && err.contains("hint:"),
        "{err}"
    );
    assert!(p.entries().is_empty());
}

const SLOW: &str = r#"
[pipeline]
name = "slow"
seed = 1

[stages.slow]
kind = "command"
# a line outside the cache for each run (impure, to count the runs)
cmd = ["sh", "-c", "echo run >> \"$KPIPE_PIPELINE_DIR/runs.txt\"; sleep 4; echo done > out.txt"]
outs = ["out.txt"]
"#;

/// A driver of the slow pipeline in the background, once its job has started.
fn slow_driver(p: &Project) -> std::process::Child {
    p.write("slow.toml", SLOW);
    let mut args = vec!["--no-progress", "run", "slow.toml"];
    args.extend_from_slice(SLURM);
    let driver = p.spawn_piped(&args);
    wait_for_runs(p);
    driver
}

/// Waits until the slow stage's job has started.
fn wait_for_runs(p: &Project) {
    let started = Instant::now();
    while !p.path().join("runs.txt").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_driver_attaches_to_the_jobs_still_running() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    let mut first = slow_driver(&p);
    first.kill().unwrap(); // the driver dies; its job runs on
    let _ = first.wait();
    let (code, _, err) = run_slurm(&p, &["slow.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("(queued by an earlier driver)"), "{err}");
    let runs = std::fs::read_to_string(p.path().join("runs.txt")).unwrap();
    assert_eq!(runs.lines().count(), 1, "the stage ran once: {runs}");
}

#[test]
fn an_interrupted_driver_cancels_its_jobs() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    let driver = slow_driver(&p);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &driver.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (code, _, err) = common::outcome(driver.wait_with_output().unwrap());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was cancelled"), "{err}");
    // the cancelled job's result never arrives
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        p.entries().is_empty(),
        "a cancelled job committed its entry"
    );
}

#[test]
fn a_job_that_slurm_kills_fails_its_node_with_slurms_reason_and_a_rerun_resubmits_it() {
    if !slurm() {
        return;
    }
    let p = Project::new();
    let driver = slow_driver(&p);
    // Slurm ends the job (as a time limit, preemption or node failure would): find it
    // by its working directory, the pipeline's
    let listed = std::process::Command::new("squeue")
        .args(["-h", "-o", "%i|%Z"])
        .output()
        .unwrap();
    let here = p.path().canonicalize().unwrap();
    let job = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .find_map(|l| {
            let (id, dir) = l.split_once('|')?;
            (Path::new(dir) == here).then(|| id.to_string())
        })
        .expect("the job is listed");
    assert!(
        std::process::Command::new("scancel")
            .arg(&job)
            .status()
            .unwrap()
            .success()
    );
    let (code, _, err) = common::outcome(driver.wait_with_output().unwrap());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("Slurm job {job} of `slow` ended CANCELLED")),
        "{err}"
    );
    assert!(p.entries().is_empty(), "nothing cached for the killed job");
    let (code, _, err) = run_slurm(&p, &["slow.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(common::ran(&err), ["slow"]);
}
