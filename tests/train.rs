//! Training end to end on a tiny synthetic split: it learns, it is bit-reproducible on
//! CPU, and an interrupted run resumes to the same weights.

mod common;

use common::{Project, ran};

const TINY: &str = r#"
[pipeline]
name = "tiny"
seed = 5

[stages.load]
kind = "load"
source = "synthetic"
cases = 5
shape = [16, 32, 32]

[stages.slice]
kind = "slice"
input = "load"
size = 32
keep-empty = 0.3

[stages.split]
kind = "split"
input = "load"
ratios = [0.6, 0.2, 0.2]

[stages.train]
kind = "train"
slices = "slice"
train = "split.train"
validate = "split.test"
base = 4
epochs = 4
batch-size = 4
learning-rate = 3e-3
augment = { flip-horizontal = 0.5 }
"#;

fn lock_output(p: &Project, node: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path().join("p.lock")).unwrap()).unwrap();
    v["nodes"][node]["output"].as_str().unwrap().to_string()
}

fn train_out(p: &Project) -> std::path::PathBuf {
    p.entries()
        .into_iter()
        .map(|e| e.join("out"))
        .find(|o| o.join("model.safetensors").exists())
        .expect("a train entry")
}

#[test]
fn training_lowers_the_loss_and_writes_weights_config_and_metrics() {
    let p = Project::new();
    p.write("p.toml", TINY);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let out = train_out(&p);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 4);
    assert!(rows[3][2] < rows[0][2] * 0.8, "train loss fell: {csv}");
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(model["model"]["kind"], "unet");
    assert_eq!(model["slices"]["size"], 32);
}

#[test]
fn cpu_training_is_bit_reproducible() {
    let (a, b) = (Project::new(), Project::new());
    for p in [&a, &b] {
        p.write("p.toml", TINY);
        let (code, _, err) = p.run(&["run", "p.toml"]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(lock_output(&a, "train"), lock_output(&b, "train"));
    let c = Project::new();
    c.write("p.toml", &TINY.replace("seed = 5", "seed = 6"));
    c.run(&["run", "p.toml"]);
    assert_ne!(lock_output(&a, "train"), lock_output(&c, "train"));
}

#[test]
fn a_killed_training_resumes_to_the_weights_of_an_uninterrupted_run() {
    let whole = Project::new();
    whole.write("p.toml", TINY);
    assert_eq!(whole.run(&["run", "p.toml"]).0, 0);
    let p = Project::new();
    p.write("p.toml", TINY);
    // a full run, then its training entry removed: the next run trains again with the
    // data stages cached, so the kill lands in training
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    std::fs::remove_dir_all(train_out(&p).parent().unwrap()).unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("kpipe"))
        .current_dir(p.path())
        .env("KPIPE_CACHE_DIR", p.cache())
        .args(["run", "p.toml"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let resume = p.cache().join("resume");
    let t = std::time::Instant::now();
    let checkpoint = loop {
        let found = std::fs::read_dir(&resume).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path().join("checkpoint.json"))
                .find(|c| c.exists())
        });
        if let Some(c) = found {
            break c;
        }
        assert!(t.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let ck: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
    let done = ck["epochs_done"].as_u64().unwrap();
    assert!((1..4).contains(&done), "killed after epoch {done}");
    let (code, _, err) = p.run(&["run", "p.toml", "-v"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["train"]);
    assert!(err.contains("resumed from checkpoint"), "{err}");
    assert_eq!(
        lock_output(&p, "train"),
        lock_output(&whole, "train"),
        "resumed weights equal uninterrupted ones"
    );
    assert!(
        !checkpoint.exists(),
        "checkpoints are removed once the stage succeeds"
    );
}

#[test]
fn init_from_continues_from_another_stage_and_gpu_without_the_feature_says_so() {
    let p = Project::new();
    let more = format!(
        "{TINY}\n[stages.more]\nkind = \"train\"\nslices = \"slice\"\ntrain = \"split.train\"\nvalidate = \"split.test\"\n\
         base = 4\nepochs = 1\ninit-from = \"train\"\n"
    );
    p.write("p.toml", &more);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).contains(&"more".to_string()));
    if cfg!(not(feature = "gpu")) {
        p.write(
            "p.toml",
            &TINY.replace("base = 4", "base = 4\nbackend = \"gpu\""),
        );
        let (code, _, err) = p.run(&["run", "p.toml"]);
        assert_eq!(code, 1);
        assert!(err.contains("built without GPU support"), "{err}");
    }
}
