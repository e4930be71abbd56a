//! Every error fixture under `tests/fixtures/pipelines/err/` fails with exit code 2 and a
//! message that matches its snapshot; every fixture under `ok/` plans cleanly.

use crate::common;

use assert_cmd::Command;

fn plan(path: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::cargo_bin("kpipe")
        .unwrap()
        .current_dir(path.parent().unwrap())
        .env(
            "KPIPE_CACHE_DIR",
            std::env::temp_dir().join("kpipe-fixture-cache"),
        )
        .env("NO_COLOR", "1")
        .arg("plan")
        .arg(path.file_name().unwrap())
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn error_fixtures_match_their_snapshots() {
    insta::glob!("../fixtures/pipelines/err", "*.toml", |path| {
        let extra: &[&str] = if path.ends_with("profile_unknown_stage.toml") {
            &["--profile", "small"]
        } else {
            &[]
        };
        let out = plan(path, extra);
        assert_eq!(out.status.code(), Some(2), "{}", path.display());
        assert!(out.stdout.is_empty());
        insta::assert_snapshot!(String::from_utf8_lossy(&out.stderr));
    });
}

#[test]
fn ok_fixtures_plan_cleanly() {
    insta::glob!("../fixtures/pipelines/ok", "*.toml", |path| {
        let out = plan(path, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[test]
fn override_errors_point_into_the_override() {
    let p = common::Project::new();
    p.write(
        "p.toml",
        "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"command\"\ncmd = [\"true\"]\n",
    );
    let (code, _, err) = p.run(&[
        "plan",
        "p.toml",
        "--set",
        "stages.a.cmd=3",
        "--set",
        "stages.b.cmd=[]",
        "--set",
        "novalue",
    ]);
    assert_eq!(code, 2);
    insta::assert_snapshot!(err);
}

#[test]
fn an_unknown_profile_lists_the_known_ones() {
    let p = common::Project::new();
    p.write("p.toml", "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"command\"\ncmd = [\"true\"]\n[profiles.small]\n[profiles.ci]\n");
    let (code, _, err) = p.run(&["plan", "p.toml", "--profile", "big"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown profile `big`") && err.contains("available profiles: `ci`, `small`"),
        "{err}"
    );
}

#[test]
fn a_missing_pipeline_file_is_named() {
    let p = common::Project::new();
    let (code, _, err) = p.run(&["run", "nowhere.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read pipeline file `nowhere.toml`"),
        "{err}"
    );
}

#[test]
fn shipped_pipelines_plan_with_their_synthetic_profile() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = plan(&path, &["--profile", "synthetic", "--format", "json"]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(
                v["nodes"].as_array().unwrap().len() >= 3,
                "{}",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 3, "the study's pipelines are there");
}
