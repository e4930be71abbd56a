//! Lock files that verify on any machine, and a cache that stays cheap to consult: the
//! same data in two folders gives the same keys and digests, `touch` re-runs nothing,
//! one changed voxel re-runs what it reaches (and `plan` names the file), a no-op run
//! reads no artifact but a stage never reads a corrupt one, `verify` refuses what it
//! cannot check, and the lock file reads back every parameter bit for bit.
//!
//! The portable-lock test runs on a KiTS19-layout folder of phantoms and, where
//! `../shared/kits19-sample` is present, the three real KiTS19 segmentations there
//! (uint8 with an sform, uint16 with only a qform, the 512x796 case), each paired with
//! imaging generated from its labels and written with its header's geometry.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::common::{self, Project, ran};
use kpipe::data::nifti::{Datatype, Geometry, NewVolume, Volume, write_volume_with};

/// The real KiTS19 samples, or `None` (said on stderr) when `../shared` is absent.
fn shared_samples() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/kits19-sample");
    if p.join("case_00061_segmentation.nii.gz").exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped the real KiTS19 cases: {} is absent (phantoms only)",
            p.display()
        );
        None
    }
}

const REAL: [&str; 3] = ["case_00015", "case_00061", "case_00160"];

/// Imaging for a real segmentation: HU by label with a little texture, int16, written
/// with the segmentation header's geometry (its qform or sform, codes and pixdim).
fn imaging_for(seg_path: &Path, out: &Path) {
    let seg = Volume::read(seg_path).unwrap();
    let (labels, _) = seg.to_labels().unwrap();
    let data: Vec<u8> = labels
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| {
            let base: i16 = match l {
                0 => -60,
                1 => 180,
                _ => 110,
            };
            (base + (i % 23) as i16 - 11).to_le_bytes()
        })
        .collect();
    let [d, h, w] = seg.shape3().unwrap();
    write_volume_with(
        out,
        &NewVolume {
            shape: [d, h, w],
            datatype: Datatype::I16,
            data: &data,
            spacing: [1.0; 3],
            affine: [[0.0; 4]; 3],
            description: "imaging generated from the labels",
        },
        &Geometry::of(&seg.header),
    )
    .unwrap();
}

/// A KiTS19-layout folder `kits/` in `p`: four phantoms and, where the samples are
/// present, the three real segmentations with generated imaging and their real
/// `kits.json` records beside the phantoms'.
fn real_layout_folder(p: &Project) -> PathBuf {
    let (code, _, err) = p.run(&[
        "synth", "--out", "kits", "--cases", "4", "--shape", "16,48,48", "--seed", "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let kits = p.path().join("kits");
    if let Some(shared) = shared_samples() {
        let json = |p: &Path| -> Vec<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let mut records = json(&kits.join("kits.json"));
        let real = json(&shared.join("kits.json"));
        for id in REAL {
            let dir = kits.join(id);
            std::fs::create_dir_all(&dir).unwrap();
            let seg = dir.join("segmentation.nii.gz");
            std::fs::copy(shared.join(format!("{id}_segmentation.nii.gz")), &seg).unwrap();
            make_writable(&seg);
            imaging_for(&seg, &dir.join("imaging.nii.gz"));
            records.push(
                real.iter()
                    .find(|r| r["case_id"] == id)
                    .unwrap_or_else(|| panic!("{id} in kits.json"))
                    .clone(),
            );
        }
        std::fs::write(
            kits.join("kits.json"),
            serde_json::to_string_pretty(&records).unwrap(),
        )
        .unwrap();
    }
    kits
}

fn make_writable(path: &Path) {
    let mut perm = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(path, perm).unwrap();
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Copies a tree; every copied file gets the modification time `mtime`.
fn copy_tree(from: &Path, to: &Path, mtime: SystemTime) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest, mtime);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
            make_writable(&dest);
            set_mtime(&dest, mtime);
        }
    }
}

/// Every file below `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// load -> slice -> split -> train on the folder `kits` (next to the pipeline file).
fn portable() -> String {
    r#"
[pipeline]
name = "portable"
seed = 11

[stages.load]
kind = "load"
path = "kits"

[stages.slice]
kind = "slice"
input = "load"
size = 32
keep-empty = 0.0

[stages.split]
kind = "split"
input = "load"
ratios = [0.6, 0.2, 0.2]
"#
    .to_string()
        + &common::train_stage(
            "train",
            4,
            "epochs = 1\nbatch-size = 8\nlearning-rate = 3e-3\n",
        )
}

/// `kpipe plan --format json` of `p` with `cache`: (id, key, status, reason) per node.
fn plan_keys(p: &Project, cache: &Path) -> Vec<(String, String, String, String)> {
    p.plan_nodes(&["--cache-dir", cache.to_str().unwrap(), "plan", "p.toml"])
        .iter()
        .map(|n| {
            let s = |k: &str| n[k].as_str().unwrap_or("").to_string();
            (s("id"), s("key"), s("status"), s("reason"))
        })
        .collect()
}

#[test]
fn a_lock_written_in_one_folder_verifies_in_a_copy_with_fresh_mtimes() {
    let a = Project::new();
    real_layout_folder(&a);
    a.write("p.toml", &portable());
    let (code, _, err) = a.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["load", "slice", "split", "train"]);
    let cases = kpipe::data::kits::CaseTable::read(&a.output_with("cases.json")).unwrap();
    let expected = if shared_samples().is_some() { 7 } else { 4 };
    assert_eq!(cases.cases.len(), expected);
    let table = std::fs::read_to_string(a.output_with("cases.json").join("cases.json")).unwrap();
    assert!(
        !table.contains(a.path().to_str().unwrap()),
        "cases.json names no absolute path: {table}"
    );
    assert_eq!(
        cases.cases[0].imaging,
        Path::new("case_00000/imaging.nii.gz")
    );

    // the project, committed lock file included, cloned elsewhere: every mtime is new
    let b = Project::new();
    let old = SystemTime::now() - Duration::from_secs(86_400 * 400);
    copy_tree(&a.path().join("kits"), &b.path().join("kits"), old);
    for f in ["p.toml", "p.lock"] {
        std::fs::copy(a.path().join(f), b.path().join(f)).unwrap();
    }
    // the same key for every node, and the copy finds all of them cached
    let (plan_a, plan_b) = (plan_keys(&a, &a.cache()), plan_keys(&b, &a.cache()));
    assert_eq!(plan_a.len(), 4);
    for (x, y) in plan_a.iter().zip(&plan_b) {
        assert_eq!((&x.0, &x.1), (&y.0, &y.1), "keys differ");
        assert_eq!(y.2, "cached", "{y:?}");
    }
    let lock_a = std::fs::read_to_string(a.path().join("p.lock")).unwrap();
    let (code, _, err) = b.run(&["--cache-dir", a.cache().to_str().unwrap(), "run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).is_empty(), "{err}");
    assert_eq!(
        std::fs::read_to_string(b.path().join("p.lock")).unwrap(),
        lock_a,
        "the copy records the same keys and digests"
    );

    // recomputed from scratch in the copy, every digest matches the committed lock
    let (code, out, err) = b.run(&["verify", "p.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("4 nodes: 4 match, 0 mismatch, 0 not in the lock file, 0 failed"),
        "{out}"
    );

    // `touch` on every file re-runs nothing
    let now = SystemTime::now();
    for f in files(&b.path().join("kits")) {
        set_mtime(&f, now);
    }
    let (code, _, err) = b.run(&["--cache-dir", a.cache().to_str().unwrap(), "run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).is_empty(), "touch re-ran {:?}", ran(&err));

    // one changed voxel (inside a kidney) re-runs load and what depends on it, and the
    // plan names the file
    let (img, seg) = (
        b.path().join("kits/case_00002/imaging.nii.gz"),
        b.path().join("kits/case_00002/segmentation.nii.gz"),
    );
    let labels = Volume::read(&seg)
        .unwrap()
        .to_labels()
        .unwrap()
        .0
        .into_owned();
    let voxel = labels.iter().position(|&l| l == 1).expect("a kidney voxel");
    change_voxel_f32(&img, voxel, -1000.0);
    let plan = plan_keys(&b, &a.cache());
    assert_eq!(plan[0].0, "load");
    assert_eq!(plan[0].2, "run");
    assert!(
        plan[0]
            .3
            .starts_with("changed dependencies: `case_00002/imaging.nii.gz` ("),
        "{plan:?}"
    );
    assert!(
        !plan[0].3.contains("segmentation") && !plan[0].3.contains("case_00001"),
        "only the changed file is named: {}",
        plan[0].3
    );
    let (code, _, err) = b.run(&["--cache-dir", a.cache().to_str().unwrap(), "run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["load", "slice", "split", "train"]);
}

/// Sets voxel `index` (file order) of a float32 `.nii.gz` to `value`, nothing else.
fn change_voxel_f32(path: &Path, index: usize, value: f32) {
    use std::io::{Read, Write};
    let mut raw = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let at = 352 + 4 * index;
    assert_ne!(raw[at..at + 4], value.to_le_bytes());
    raw[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&raw).unwrap();
    std::fs::write(path, e.finish().unwrap()).unwrap();
}

fn tiny() -> String {
    common::small_data_pipeline("tiny", 5)
        + &common::train_stage(
            "train",
            4,
            "epochs = 1\nbatch-size = 4\nlearning-rate = 3e-3\nepsilon = 1e-7\nbetas = [0.9, 0.999]\n",
        )
}

/// Flips one byte of `file` keeping its size; `restore_mode` puts the read-only mode back.
fn flip_byte(file: &Path, at: usize, restore_mode: bool) {
    let mut bytes = std::fs::read(file).unwrap();
    let mut perm = std::fs::metadata(file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(file, perm.clone()).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(file, bytes).unwrap();
    if restore_mode {
        perm.set_readonly(true);
        std::fs::set_permissions(file, perm).unwrap();
    }
}

#[test]
fn a_flipped_byte_in_a_slice_store_fails_the_stage_that_reads_it() {
    let p = Project::new();
    p.write("p.toml", &tiny());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let slices = p.output_with("slices.json");
    let entry = slices.parent().unwrap().to_path_buf();
    let image = slices.join("cases/case_00001/image.npy");
    flip_byte(&image, 4000, true);

    // a run with nothing to do checks sizes and modes only: it does not read the store
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).is_empty(), "{err}");

    // a stage that reads the store re-hashes it first: exit 3, naming entry and file
    let (code, _, err) = p.run(&["run", "p.toml", "--set", "stages.train.epochs=2"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(entry.to_str().unwrap()),
        "names the entry: {err}"
    );
    assert!(
        err.contains("`cases/case_00001/image.npy` has changed since it was written"),
        "names the file: {err}"
    );
    assert!(err.contains("kpipe gc --corrupt"), "{err}");
    assert!(ran(&err).is_empty(), "{err}");

    // `verify --cache` re-hashes every entry
    let (code, out, _) = p.run(&["verify", "--cache"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("4 entries, 1 corrupt"), "{out}");
    assert!(out.contains("case_00001/image.npy"), "{out}");

    // repaired, the same run goes through
    let (code, out, _) = p.run(&["gc", "--corrupt"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = p.run(&["run", "p.toml", "--set", "stages.train.epochs=2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["slice", "train"]);
}

#[test]
fn a_writable_cache_file_is_re_hashed_even_by_a_no_op_run() {
    let p = Project::new();
    p.write(
        "p.toml",
        "[pipeline]\nname = \"w\"\n[stages.a]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"seq 1 1000 > n.txt\"]\nouts = [\"n.txt\"]\n",
    );
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    let file = p.output_with("n.txt").join("n.txt");
    // same size, left writable: only reading it can tell
    flip_byte(&file, 10, false);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("`n.txt` has changed since it was written"),
        "{err}"
    );
    // a changed size needs no reading at all
    std::fs::write(&file, "1\n").unwrap();
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("`n.txt` is 2 bytes, but 3893 were written"),
        "{err}"
    );
}

#[test]
fn plan_names_only_the_parameter_that_changed() {
    let p = Project::new();
    p.write("p.toml", &tiny());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let plan = p.plan(&["p.toml", "--set", "stages.train.epochs=2"]);
    let train: Vec<_> = plan.iter().filter(|n| n.1 == "run").collect();
    assert_eq!(train.len(), 1, "{plan:?}");
    assert_eq!(train[0].0, "train");
    // f32 parameters (betas, epsilon) read back from the lock file bit for bit
    assert_eq!(train[0].2, "params changed: `epochs` (1 -> 2)");
}

#[test]
fn verify_refuses_nodes_the_lock_file_does_not_record_and_a_missing_lock() {
    let p = Project::new();
    let one = "[pipeline]\nname = \"v\"\n[stages.a]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"echo a > a.txt\"]\nouts = [\"a.txt\"]\n\
               [profiles.x.stages.a]\nouts = [\"a.txt\"]\n";
    p.write("p.toml", one);
    let (code, _, err) = p.run(&["verify", "p.toml", "--profile", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no lock file"), "{err}");
    assert!(
        err.contains("hint: run the pipeline first (`kpipe run p.toml --profile x`)"),
        "{err}"
    );
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    let (code, out, err) = p.run(&["verify", "p.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    // a node added since the lock file was written cannot be checked: a failure
    p.write(
        "p.toml",
        &format!("{one}[stages.b]\nkind = \"command\"\ncmd = [\"sh\", \"-c\", \"echo b > b.txt\"]\nouts = [\"b.txt\"]\n"),
    );
    let (code, out, err) = p.run(&["verify", "p.toml"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("NOT IN LOCK FILE"), "{out}");
    assert!(
        out.contains("2 nodes: 1 match, 0 mismatch, 1 not in the lock file, 0 failed"),
        "{out}"
    );
    assert!(err.contains("no record in"), "{err}");
}

/// Every float of `v`, with its path, as bits.
fn float_bits(v: &serde_json::Value, path: &str, out: &mut Vec<(String, u64)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                float_bits(x, &format!("{path}.{k}"), out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                float_bits(x, &format!("{path}.{i}"), out);
            }
        }
        serde_json::Value::Number(n) => {
            out.push((path.to_string(), n.as_f64().unwrap().to_bits()));
        }
        _ => {}
    }
}

#[test]
fn every_study_parameter_survives_the_lock_file_bit_for_bit() {
    use kpipe::cache::{LockFile, LockRecord};
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut pipelines: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    pipelines.sort();
    assert!(pipelines.len() >= 4, "{pipelines:?}");
    let mut floats = 0;
    for file in &pipelines {
        let doc: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
        let mut profiles: Vec<Option<String>> = vec![None];
        if let Some(toml::Value::Table(t)) = doc.get("profiles") {
            profiles.extend(t.keys().cloned().map(Some));
        }
        for profile in profiles {
            // the default profile reads a KiTS19 folder, which must exist to check
            let at = kpipe::config::Override(format!("stages.load.path={}", dir.path().display()));
            let spec = kpipe::config::load(file, profile.as_deref(), &[at])
                .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
            let mut lock = LockFile::default();
            for st in &spec.stages {
                lock.nodes.insert(
                    st.id.clone(),
                    LockRecord {
                        kind: st.stage.kind().into(),
                        key: "k".into(),
                        output: "o".into(),
                        params: st.stage.params(),
                        inputs: Default::default(),
                        extra: serde_json::Value::Null,
                    },
                );
            }
            let path = dir.path().join("x.lock");
            lock.write(&path).unwrap();
            let back = LockFile::read(&path).unwrap();
            for (id, r) in &lock.nodes {
                let what = format!("{} {profile:?} {id}", file.display());
                let (mut want, mut got) = (Vec::new(), Vec::new());
                float_bits(&r.params, "", &mut want);
                float_bits(&back.nodes[id].params, "", &mut got);
                assert_eq!(want, got, "{what}");
                assert_eq!(r.params, back.nodes[id].params, "{what}");
                floats += want.len();
            }
        }
    }
    assert!(floats > 100, "{floats} numbers checked");
}
