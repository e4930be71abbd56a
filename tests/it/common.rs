//! Shared helpers of the integration tests: a temporary project directory and the real
//! `kpipe` binary run inside it.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// `kpipe ARGS` in the project directory, with its own cache.
    pub fn kpipe(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("kpipe").unwrap();
        c.current_dir(self.path())
            .env("KPIPE_CACHE_DIR", self.cache())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .args(args);
        c
    }

    /// Runs `kpipe ARGS`, returns (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        outcome(self.kpipe(args).output().unwrap())
    }

    /// Starts `kpipe ARGS` in the project directory, with its own cache and stderr
    /// discarded, and returns at once (for tests that interrupt a run).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("kpipe"))
            .current_dir(self.path())
            .env("KPIPE_CACHE_DIR", self.cache())
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `kpipe ARGS` in the background, its stdout and stderr kept for `wait_with_output`.
    pub fn spawn_piped(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("kpipe"))
            .current_dir(self.path())
            .env("KPIPE_CACHE_DIR", self.cache())
            .env("NO_COLOR", "1")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The `out/` folder of the (first) cache entry holding `file`.
    pub fn output_with(&self, file: &str) -> PathBuf {
        self.entries()
            .into_iter()
            .map(|e| e.join("out"))
            .find(|o| o.join(file).exists())
            .unwrap_or_else(|| panic!("no entry with {file}"))
    }

    /// Complete cache entries.
    pub fn entries(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.cache().join("entries"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `kpipe plan FILE --format json` as (id, status, reason) triples.
    pub fn plan(&self, args: &[&str]) -> Vec<(String, String, String)> {
        let mut full = vec!["plan"];
        full.extend_from_slice(args);
        self.plan_nodes(&full)
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["status"].as_str().unwrap().to_string(),
                    n["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// The nodes of `kpipe ARGS --format json`, where ARGS hold `plan` and its file (and
    /// global options before `plan`); the command must succeed.
    pub fn plan_nodes(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend_from_slice(&["--format", "json"]);
        let (code, out, err) = self.run(&full);
        assert_eq!(code, 0, "plan failed: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["nodes"].as_array().unwrap().clone()
    }
}

/// A finished command's (exit code, stdout, stderr), -1 for a command a signal ended.
pub fn outcome(out: std::process::Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ids a run's stderr reports as run (`ran  <id>`).
pub fn ran(stderr: &str) -> Vec<String> {
    let mut v: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("ran  "))
        .map(|l| l.split(" (").next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// The data half of a test pipeline: `[pipeline]`, a synthetic `load` of `cases` phantoms
/// of `shape`, a `slice` to `size` (with extra `slice` lines) and a `split` (with extra
/// lines); tests append their own stages.
pub fn data_pipeline(
    name: &str,
    seed: u64,
    cases: usize,
    shape: [usize; 3],
    size: usize,
    slice_extra: &str,
    split_extra: &str,
) -> String {
    let [d, h, w] = shape;
    format!(
        "\n[pipeline]\nname = \"{name}\"\nseed = {seed}\n\n\
         [stages.load]\nkind = \"load\"\nsource = \"synthetic\"\ncases = {cases}\nshape = [{d}, {h}, {w}]\n\n\
         [stages.slice]\nkind = \"slice\"\ninput = \"load\"\nsize = {size}\n{slice_extra}\n\
         [stages.split]\nkind = \"split\"\ninput = \"load\"\n{split_extra}\n"
    )
}

/// The small data pipeline most training tests share ([`data_pipeline`]): 5 phantoms of
/// 16x32x32, 32-pixel slices keeping 30% of the empty ones, a 60/20/20 split.
pub fn small_data_pipeline(name: &str, seed: u64) -> String {
    data_pipeline(
        name,
        seed,
        5,
        [16, 32, 32],
        32,
        "keep-empty = 0.3\n",
        "ratios = [0.6, 0.2, 0.2]\n",
    )
}

/// A `train` stage `id` on the data pipeline's stages (slices from `slice`, training on
/// `split.train`, validating on `split.test`) with `base`, then the `extra` lines (each
/// ending in a newline): epochs, batch size, learning rate and the like.
pub fn train_stage(id: &str, base: usize, extra: &str) -> String {
    format!(
        "\n[stages.{id}]\nkind = \"train\"\nslices = \"slice\"\ntrain = \"split.train\"\n\
         validate = \"split.test\"\nbase = {base}\n{extra}"
    )
}
