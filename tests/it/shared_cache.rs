//! Many processes on one cache (a cluster's shared filesystem, two drivers): racing on a
//! key, the first complete entry wins, the others wait for it, nobody fails or reads a
//! half-written entry.

use crate::common::{self, Project};

const RACE: &str = r#"
[pipeline]
name = "race"
seed = 1

[stages.slow]
kind = "command"
# each run of the stage leaves a line outside the cache (impure, to count the runs)
cmd = ["sh", "-c", "echo run >> \"$KPIPE_PIPELINE_DIR/runs.txt\"; sleep 1; seq 1 1000 > out.txt"]
outs = ["out.txt"]

[stages.after]
kind = "command"
cmd = ["sh", "-c", "wc -l < in/slow/out.txt > count.txt"]
inputs = ["slow"]
outs = ["count.txt"]
"#;

#[test]
fn processes_racing_on_one_key_compute_it_once_and_all_succeed() {
    let p = Project::new();
    p.write("race.toml", RACE);
    let racers: Vec<_> = (0..4)
        .map(|_| p.spawn_piped(&["--no-progress", "run", "race.toml"]))
        .collect();
    let mut ran = 0;
    for child in racers {
        let (code, _, err) = common::outcome(child.wait_with_output().unwrap());
        assert_eq!(code, 0, "{err}");
        ran += common::ran(&err).len();
    }
    // the slow stage ran once; the other three found its entry after waiting
    let runs = std::fs::read_to_string(p.path().join("runs.txt")).unwrap();
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert_eq!(ran, 2, "one run of each of the two stages in all");
    assert_eq!(p.entries().len(), 2);
    let count = std::fs::read_to_string(p.output_with("count.txt").join("count.txt")).unwrap();
    assert_eq!(count.trim(), "1000");
    // nothing half-written is left behind
    let tmp: Vec<_> = std::fs::read_dir(p.cache().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}

#[test]
fn a_temporary_entry_is_stale_only_when_nobody_holds_its_claim() {
    // A writer on another machine: its pid means nothing here, its claim (a lock on the
    // shared filesystem) is what says it is alive.
    let p = Project::new();
    let (code, _, err) = p.run(&["status"]);
    assert_eq!(code, 0, "{err}");
    let key = "f".repeat(64);
    let tmp = p.cache().join("tmp").join(format!("{key}.999999999.0"));
    std::fs::create_dir_all(tmp.join("out")).unwrap();
    let claim = std::fs::File::create(p.cache().join("claims").join(&key)).unwrap();
    claim.lock().unwrap();
    let (code, _, err) = p.run(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(tmp.exists(), "a claimed key's temporary entry was removed");
    claim.unlock().unwrap();
    let (code, _, err) = p.run(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(!tmp.exists(), "an unclaimed temporary entry is stale");
}
