//! The runner end to end, on `command` stages: caching, re-runs, concurrency, failures,
//! interruption and tampering.

use crate::common::{Project, ran};

const THREE: &str = r#"
[pipeline]
name = "three"
seed = 1

[stages.a]
kind = "command"
cmd = ["sh", "-c", "echo hello > a.txt"]
outs = ["a.txt"]

[stages.b]
kind = "command"
cmd = ["sh", "-c", "tr a-z A-Z < in/a/a.txt > b.txt"]
inputs = ["a"]
outs = ["b.txt"]

[stages.c]
kind = "command"
cmd = ["sh", "-c", "cat in/a/a.txt in/b/b.txt > c.txt"]
inputs = ["a", "b"]
outs = ["c.txt"]

[stages.lone]
kind = "command"
cmd = ["sh", "-c", "echo alone > l.txt"]
outs = ["l.txt"]
"#;

/// `stage_file` of the entries the lock file `p.lock` records (the latest run), else of
/// any entry (an edited stage leaves its old entry beside the new one).
fn out_of(p: &Project, stage_file: &str) -> String {
    let locked: Vec<std::path::PathBuf> = std::fs::read_to_string(p.path().join("p.lock"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v["nodes"].as_object().map(|nodes| {
                nodes
                    .values()
                    .filter_map(|r| r["key"].as_str())
                    .map(|k| p.cache().join("entries").join(k))
                    .collect()
            })
        })
        .unwrap_or_default();
    for e in locked.into_iter().chain(p.entries()) {
        let f = e.join("out").join(stage_file);
        if f.exists() {
            return std::fs::read_to_string(f).unwrap();
        }
    }
    panic!("no entry holds {stage_file}");
}

#[test]
fn cached_rerun_runs_nothing() {
    let p = Project::new();
    p.write("p.toml", THREE);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["a", "b", "c", "lone"]);
    assert_eq!(out_of(&p, "c.txt"), "hello\nHELLO\n");
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0);
    assert!(ran(&err).is_empty(), "{err}");
    assert!(err.contains("4 nodes: 0 ran, 4 cached"), "{err}");
    assert!(p.plan(&["p.toml"]).iter().all(|(_, s, _)| s == "cached"));
}

#[test]
fn editing_one_stage_reruns_it_and_its_descendants_only() {
    let p = Project::new();
    p.write("p.toml", THREE);
    p.run(&["run", "p.toml"]);
    p.write(
        "p.toml",
        &THREE.replace("tr a-z A-Z < in/a/a.txt", "rev < in/a/a.txt | tr a-z A-Z"),
    );
    let plan = p.plan(&["p.toml"]);
    let status: Vec<(&str, &str)> = plan
        .iter()
        .map(|(i, s, _)| (i.as_str(), s.as_str()))
        .collect();
    assert!(
        status.contains(&("a", "cached")) && status.contains(&("lone", "cached")),
        "{plan:?}"
    );
    assert!(
        status.contains(&("b", "run")) && status.contains(&("c", "run")),
        "{plan:?}"
    );
    let b = plan.iter().find(|(i, _, _)| i == "b").unwrap();
    assert!(b.2.starts_with("params changed: `cmd`"), "{}", b.2);
    let c = plan.iter().find(|(i, _, _)| i == "c").unwrap();
    assert_eq!(c.2, "input `b` will run");
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0);
    assert_eq!(ran(&err), ["b", "c"]);
    assert_eq!(out_of(&p, "b.txt"), "OLLEH\n");
}

#[test]
fn a_rerun_with_identical_output_stops_at_that_node() {
    // b changes its command but not its output: c stays cached (keys use output digests).
    let p = Project::new();
    p.write("p.toml", THREE);
    p.run(&["run", "p.toml"]);
    p.write(
        "p.toml",
        &THREE.replace("tr a-z A-Z < in/a/a.txt", "cat in/a/a.txt | tr a-z A-Z"),
    );
    let (_, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(ran(&err), ["b"]);
}

#[test]
fn reordering_keys_and_whitespace_reruns_nothing() {
    let p = Project::new();
    p.write("p.toml", THREE);
    p.run(&["run", "p.toml"]);
    let reordered = r#"
[stages.lone]
outs   = [ "l.txt" ]
cmd    = [ "sh", "-c", "echo alone > l.txt" ]
kind   = "command"
[stages.c]
outs = ["c.txt"]
inputs = ["a", "b"]
cmd = ["sh", "-c", "cat in/a/a.txt in/b/b.txt > c.txt"]
kind = "command"
[stages.b]
outs = ["b.txt"]
inputs = ["a"]
kind = "command"
cmd = ["sh", "-c", "tr a-z A-Z < in/a/a.txt > b.txt"]

[stages.a]
outs = ["a.txt"]
cmd = ["sh", "-c", "echo hello > a.txt"]
kind = "command"
[pipeline]
seed = 1
name = "three"
"#;
    p.write("p.toml", reordered);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).is_empty(), "{err}");
}

#[test]
fn the_seed_reaches_commands_and_enters_keys() {
    let p = Project::new();
    let text = THREE.replace("echo alone > l.txt", "echo $KPIPE_SEED > l.txt");
    p.write("p.toml", &text);
    p.run(&["run", "p.toml"]);
    let first = out_of(&p, "l.txt");
    assert!(first.trim().parse::<u64>().is_ok(), "{first}");
    p.write("p.toml", &text.replace("seed = 1", "seed = 2"));
    let (_, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(ran(&err), ["a", "b", "c", "lone"]);
}

#[test]
fn independent_nodes_overlap_in_time() {
    // Each node waits for the other's marker: they pass only if they run at once.
    let p = Project::new();
    let sync = p.path().join("sync");
    std::fs::create_dir_all(&sync).unwrap();
    let wait = |me: &str, other: &str| {
        format!(
            "touch {s}/{me}; i=0; while [ ! -f {s}/{other} ]; do i=$((i+1)); [ $i -gt 200 ] && exit 9; sleep 0.05; done; echo ok > {me}.txt",
            s = sync.display()
        )
    };
    p.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"par\"\n[stages.x]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"{}\"]\nouts = [\"x.txt\"]\n\
             [stages.y]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"{}\"]\nouts = [\"y.txt\"]\n",
            wait("x", "y"),
            wait("y", "x")
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml", "-j", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["x", "y"]);
}

#[test]
fn a_failing_node_caches_nothing_and_skips_its_dependents() {
    let p = Project::new();
    p.write(
        "p.toml",
        &THREE.replace("tr a-z A-Z < in/a/a.txt > b.txt", "echo boom >&2; exit 4"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(ran(&err), ["a", "lone"]);
    assert!(err.contains("failed  b"), "{err}");
    assert!(err.contains("boom"), "the command's output is shown: {err}");
    assert!(
        err.contains("skipped  c: input `b` did not complete"),
        "{err}"
    );
    assert_eq!(p.entries().len(), 2);
    assert_eq!(std::fs::read_dir(p.cache().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_missing_declared_out_fails_the_node() {
    let p = Project::new();
    p.write(
        "p.toml",
        &THREE.replace("outs = [\"l.txt\"]", "outs = [\"l.txt\", \"missing.txt\"]"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("did not create its declared out `missing.txt`"),
        "{err}"
    );
    assert_eq!(p.entries().len(), 3);
}

#[test]
fn fail_fast_starts_nothing_after_a_failure() {
    let p = Project::new();
    p.write("p.toml", &THREE.replace("echo hello > a.txt", "exit 1"));
    let (code, _, err) = p.run(&["run", "p.toml", "-j", "1", "--fail-fast"]);
    assert_eq!(code, 1);
    // `a` sorts first and fails: `lone`, independent of it, is never started.
    assert!(ran(&err).is_empty(), "{err}");
    let (code, _, err) = p.run(&["run", "p.toml", "-j", "1"]);
    assert_eq!(code, 1);
    assert_eq!(ran(&err), ["lone"], "{err}");
}

#[test]
fn a_killed_run_leaves_nothing_the_next_run_accepts() {
    let p = Project::new();
    let marker = p.path().join("started");
    p.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"kill\"\n[stages.slow]\nkind = \"command\"\n\
             cmd = [\"sh\", \"-c\", \"echo partial > s.txt; touch {}; sleep 0.5; echo done >> s.txt\"]\nouts = [\"s.txt\"]\n",
            marker.display()
        ),
    );
    let mut child = p.spawn(&["run", "p.toml"]);
    let t = std::time::Instant::now();
    while !marker.exists() {
        assert!(t.elapsed().as_secs() < 30, "stage never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(p.entries().is_empty(), "a killed stage left an entry");
    assert!(
        std::fs::read_dir(p.cache().join("tmp")).unwrap().count() > 0,
        "the partial work was in tmp/"
    );
    std::thread::sleep(std::time::Duration::from_millis(700)); // the orphaned command finishes
    let plan = p.plan(&["p.toml"]);
    assert_eq!(plan[0].1, "run");
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["slow"]);
    assert_eq!(out_of(&p, "s.txt"), "partial\ndone\n");
    assert_eq!(
        std::fs::read_dir(p.cache().join("tmp")).unwrap().count(),
        0,
        "stale tmp was cleaned"
    );
}

#[test]
fn a_tampered_entry_is_detected() {
    let p = Project::new();
    p.write("p.toml", THREE);
    p.run(&["run", "p.toml"]);
    let entry = p
        .entries()
        .into_iter()
        .find(|e| e.join("out/a.txt").exists())
        .unwrap();
    let f = entry.join("out/a.txt");
    let mut perm = std::fs::metadata(&f).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&f, perm).unwrap();
    std::fs::write(&f, "tampered\n").unwrap();
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is corrupt"), "{err}");
    assert!(err.contains("kpipe gc --corrupt"), "{err}");
    // the repair the hint names works
    let (code, out, _) = p.run(&["gc", "--corrupt"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 entries"), "{out}");
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["a"]);
}

#[test]
fn changing_a_declared_dependency_reruns_its_stage() {
    let p = Project::new();
    p.write("script.sh", "echo one > o.txt\n");
    p.write(
        "p.toml",
        "[pipeline]\nname = \"deps\"\n[stages.s]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"sh $KPIPE_PIPELINE_DIR/script.sh\"]\n\
         deps = [\"script.sh\"]\nouts = [\"o.txt\"]\n",
    );
    p.run(&["run", "p.toml"]);
    assert_eq!(out_of(&p, "o.txt"), "one\n");
    p.write("script.sh", "echo two > o.txt\n");
    let plan = p.plan(&["p.toml"]);
    assert_eq!(plan[0].1, "run");
    assert!(
        plan[0].2.contains("changed dependencies: `script.sh`"),
        "{}",
        plan[0].2
    );
    let (_, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(ran(&err), ["s"]);
}

#[test]
fn profiles_keep_their_own_lock_files_and_gc_keeps_what_locks_reference() {
    let p = Project::new();
    let text = format!(
        "{THREE}\n[profiles.loud.stages.a]\ncmd = [\"sh\", \"-c\", \"echo HEY > a.txt\"]\n"
    );
    p.write("p.toml", &text);
    p.run(&["run", "p.toml"]);
    let (_, _, err) = p.run(&["run", "p.toml", "--profile", "loud"]);
    assert_eq!(ran(&err), ["a", "b", "c"]);
    assert!(p.path().join("p.lock").is_file() && p.path().join("p.loud.lock").is_file());
    let (_, _, err) = p.run(&["run", "p.toml"]);
    assert!(
        ran(&err).is_empty(),
        "the default profile's entries survived: {err}"
    );
    // an override run replaces the default lock's record of `c`: its old entry is garbage
    p.run(&[
        "run",
        "p.toml",
        "--set",
        "stages.c.cmd=[\"sh\", \"-c\", \"echo other > c.txt\"]",
    ]);
    let before = p.entries().len();
    let (code, out, _) = p.run(&["gc", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("would remove") && out.contains(" c\n"),
        "{out}"
    );
    assert_eq!(p.entries().len(), before);
    let (_, out, _) = p.run(&["gc"]);
    assert!(out.contains("1 entries"), "{out}");
    assert_eq!(p.entries().len(), before - 1);
    let (_, _, err) = p.run(&["run", "p.toml", "--profile", "loud"]);
    assert!(ran(&err).is_empty(), "{err}");
}

#[test]
fn status_lists_entries_and_their_lock_files() {
    let p = Project::new();
    p.write("p.toml", THREE);
    p.run(&["run", "p.toml"]);
    let (code, out, _) = p.run(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains(": 4 entries"), "{out}");
    assert_eq!(out.matches("p.lock").count(), 4, "{out}");
}

#[test]
fn graph_prints_dot_and_json() {
    let p = Project::new();
    p.write("p.toml", THREE);
    let (code, out, _) = p.run(&["graph", "p.toml"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("digraph \"three\""), "{out}");
    assert!(
        out.contains("\"a\" -> \"b\";") && out.contains("\"b\" -> \"c\";"),
        "{out}"
    );
    let (_, out, _) = p.run(&["graph", "p.toml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["edges"].as_array().unwrap().len(), 3);
    let ids: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let pos = |id: &str| ids.iter().position(|i| *i == id).unwrap();
    assert!(
        pos("a") < pos("b") && pos("b") < pos("c"),
        "topological: {ids:?}"
    );
}
