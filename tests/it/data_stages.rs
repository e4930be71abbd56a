//! The imaging stages end to end: synthetic phantoms, load, slice, split, `kpipe synth`
//! and `kpipe inspect`, and broken datasets.

use std::path::Path;

use crate::common::{self, Project, ran};
use kpipe::data::nifti::{Datatype, NewVolume, Volume, write_volume};

fn study() -> String {
    common::data_pipeline("data", 11, 6, [24, 48, 48], 32, "", "")
}

#[test]
fn load_slice_split_run_on_synthetic_data() {
    let p = Project::new();
    p.write("p.toml", &study());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ran(&err), ["load", "slice", "split"]);
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output_with("cases.json").join("cases.json")).unwrap(),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for c in cases {
        assert_eq!(c["shape"], serde_json::json!([24, 48, 48]));
        let counts: Vec<u64> = c["label_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(counts.iter().sum::<u64>(), 24 * 48 * 48);
        assert!(counts[1] > 0, "every phantom has kidneys");
    }
    let slices = p.output_with("slices.json");
    let store = kpipe::data::slices::SliceStore::open(&slices).unwrap();
    assert_eq!(store.meta.cases.len(), 6);
    let mut rows = 0;
    for i in 0..6 {
        let (img, lab) = (store.images(i).unwrap().to_f32(), store.labels(i).unwrap());
        assert_eq!(
            img.shape(),
            [24, 1, 32, 32],
            "keep-empty = 1 keeps every slice"
        );
        assert!(
            img.iter().all(|v| (0.0..=1.0).contains(v)),
            "unit normalisation"
        );
        assert!(lab.iter().all(|&l| l <= 2));
        rows += img.shape()[0];
    }
    let index = std::fs::read_to_string(slices.join("index.csv")).unwrap();
    assert_eq!(index.lines().count(), rows + 1);
    let split = kpipe::stages::split::SplitFile::read(&p.output_with("split.json")).unwrap();
    assert_eq!(
        (split.train.len(), split.test.len(), split.eval.len()),
        (4, 1, 1)
    );
}

#[test]
fn float16_storage_halves_the_images_and_keeps_their_values() {
    let p = Project::new();
    p.write("p.toml", &study());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = p.run(&["run", "p.toml", "--set", "stages.slice.storage=float16"]);
    assert_eq!(code, 0, "{err}");
    let stores: Vec<_> = p
        .entries()
        .into_iter()
        .map(|e| e.join("out"))
        .filter(|o| o.join("slices.json").exists())
        .collect();
    assert_eq!(stores.len(), 2, "float16 is a new slice artifact");
    use kpipe::data::slices::{SliceStore, StorageType};
    let open = |d: &Path| SliceStore::open(d).unwrap();
    let (mut full_dir, mut half_dir) = (&stores[0], &stores[1]);
    if open(full_dir).meta.storage == StorageType::Float16 {
        (full_dir, half_dir) = (half_dir, full_dir);
    }
    let (full, half) = (open(full_dir), open(half_dir));
    assert_eq!(half.meta.storage, StorageType::Float16);
    for i in 0..full.meta.cases.len() {
        let (x, y) = (
            full.images(i).unwrap().to_f32(),
            half.images(i).unwrap().to_f32(),
        );
        assert_eq!(x.shape(), y.shape());
        let worst = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst > 0.0 && worst <= 2f32.powi(-11),
            "f16 rounding of [0, 1]: {worst}"
        );
        assert_eq!(full.labels(i).unwrap(), half.labels(i).unwrap());
        let id = &full.meta.cases[i].id;
        let bytes = |d: &Path| {
            std::fs::metadata(d.join("cases").join(id).join("image.npy"))
                .unwrap()
                .len()
        };
        let (bf, bh) = (bytes(full_dir), bytes(half_dir));
        assert!(bh * 2 - 128 <= bf && bf <= bh * 2 + 128, "{bf} vs {bh}");
    }
    // numpy reads the float16 store as it is
    let npy = half_dir
        .join("cases")
        .join(&half.meta.cases[0].id)
        .join("image.npy");
    let py = std::process::Command::new("python3")
        .args(["-c", "import sys, numpy as np; a = np.load(sys.argv[1], mmap_mode='r'); print(a.dtype, a.shape)"])
        .arg(&npy)
        .output();
    match py {
        Ok(o) if o.status.success() => {
            let s = String::from_utf8_lossy(&o.stdout);
            assert!(s.starts_with("float16 (24, 1, 32, 32)"), "{s}");
        }
        _ => eprintln!("numpy not available: skipping the numpy read of a float16 store"),
    }
}

#[test]
fn the_same_seed_gives_byte_identical_artifacts() {
    let (a, b) = (Project::new(), Project::new());
    for p in [&a, &b] {
        p.write("p.toml", &study());
        let (code, _, err) = p.run(&[
            "run",
            "p.toml",
            "-j",
            if std::ptr::eq(p, &a) { "1" } else { "3" },
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let lock = |p: &Project| std::fs::read_to_string(p.path().join("p.lock")).unwrap();
    assert_eq!(lock(&a), lock(&b));
    let c = Project::new();
    c.write("p.toml", &study().replace("seed = 11", "seed = 12"));
    c.run(&["run", "p.toml"]);
    let outputs = |p: &Project| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&lock(p)).unwrap();
        ["load", "slice"]
            .iter()
            .map(|n| v["nodes"][n]["output"].as_str().unwrap().to_string())
            .collect()
    };
    assert_ne!(
        outputs(&a)[0],
        outputs(&c)[0],
        "another seed, other phantoms"
    );
}

#[test]
fn keep_empty_and_context_shape_the_slices() {
    let p = Project::new();
    p.write(
        "p.toml",
        &study().replace("size = 32", "size = 32\nkeep-empty = 0.0\ncontext = 1"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let slices = p.output_with("slices.json");
    let store = kpipe::data::slices::SliceStore::open(&slices).unwrap();
    assert_eq!(store.meta.channels, 3);
    let index = std::fs::read_to_string(slices.join("index.csv")).unwrap();
    let lines: Vec<&str> = index.lines().skip(1).collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(",1,0") || l.ends_with(",1,1") || l.ends_with(",0,1")),
        "only foreground slices"
    );
    let total: usize = (0..6).map(|i| store.labels(i).unwrap().shape()[0]).sum();
    assert_eq!(total, lines.len());
    // a kidney fraction like real data: kept foreground slices are a minority of 6 * 24
    assert!(
        total < 6 * 24 * 3 / 5,
        "{total} of {} slices show kidney or tumor",
        6 * 24
    );
    assert!(
        total > 6 * 24 / 6,
        "{total} of {} slices show kidney or tumor",
        6 * 24
    );
}

#[test]
fn synth_writes_the_same_bytes_for_the_same_seed_and_inspect_reads_them() {
    let p = Project::new();
    for (dir, seed) in [("a", "5"), ("b", "5"), ("c", "6")] {
        let (code, out, err) = p.run(&[
            "synth", "--out", dir, "--cases", "3", "--shape", "16,32,32", "--seed", seed,
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("wrote 3 cases"), "{out}");
    }
    let read = |d: &str| std::fs::read(p.path().join(d).join("case_00001/imaging.nii.gz")).unwrap();
    assert_eq!(read("a"), read("b"));
    assert_ne!(read("a"), read("c"));
    assert!(p.path().join("a/kits.json").exists());
    let (code, out, _) = p.run(&["inspect", "a/case_00000/imaging.nii.gz", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "shape",
        "datatype",
        "endianness",
        "spacing",
        "affine",
        "scl_slope",
        "scl_inter",
        "min",
        "max",
        "sum",
        "nan_count",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {out}");
    }
    assert_eq!(v["shape"], serde_json::json!([16, 32, 32]));
    assert_eq!(v["datatype"], "float32");
    assert!(v["min"].as_f64().unwrap() < -900.0, "air around the body");
    assert!(v["max"].as_f64().unwrap() > 300.0, "bone and contrast");
    let (code, _, err) = p.run(&["inspect", "a/missing.nii.gz"]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.nii.gz"), "{err}");
}

/// A KiTS19 folder of `n` tiny phantom cases, to break.
fn kits_folder(p: &Project, n: usize) -> std::path::PathBuf {
    let (code, _, err) = p.run(&[
        "synth",
        "--out",
        "kits",
        "--cases",
        &n.to_string(),
        "--shape",
        "12,24,24",
        "--seed",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    p.path().join("kits")
}

fn write_labels(path: &Path, shape: [usize; 3], labels: &[u8]) {
    let affine = kpipe::data::phantom::kits_affine([2.0, 1.0, 1.0]);
    write_volume(
        path,
        &NewVolume {
            shape,
            datatype: Datatype::U8,
            data: labels,
            spacing: [2.0, 1.0, 1.0],
            affine,
            description: "",
        },
    )
    .unwrap();
}

const LOAD: &str = "[pipeline]\nname = \"real\"\n[stages.load]\nkind = \"load\"\npath = \"kits\"\n";

#[test]
fn unexpected_labels_fail_naming_the_case_and_cache_nothing() {
    let p = Project::new();
    let kits = kits_folder(&p, 3);
    let seg = kits.join("case_00001/segmentation.nii.gz");
    let mut labels = Volume::read(&seg)
        .unwrap()
        .to_labels()
        .unwrap()
        .0
        .into_owned();
    labels[0] = 3;
    labels[1] = 3;
    labels[2] = 7;
    write_labels(&seg, [12, 24, 24], &labels);
    p.write("p.toml", LOAD);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("case_00001") && err.contains("3 (2 voxels)") && err.contains("7 (1 voxels)"),
        "{err}"
    );
    assert!(err.contains("label-policy"), "hint: {err}");
    assert!(p.entries().is_empty());
    p.write("p.toml", &format!("{LOAD}label-policy = \"background\"\n"));
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let table = kpipe::data::kits::CaseTable::read(&p.output_with("cases.json")).unwrap();
    assert_eq!(table.cases[1].relabelled, 3);
}

#[test]
fn shape_mismatches_missing_files_and_orphan_records_are_named() {
    let p = Project::new();
    let kits = kits_folder(&p, 4);
    write_labels(
        &kits.join("case_00000/segmentation.nii.gz"),
        [12, 24, 20],
        &vec![0u8; 12 * 24 * 20],
    );
    std::fs::remove_file(kits.join("case_00002/imaging.nii.gz")).unwrap();
    std::fs::remove_dir_all(kits.join("case_00003")).unwrap();
    p.write("p.toml", LOAD);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("3 cases are broken"), "{err}");
    assert!(
        err.contains(
            "case_00000: imaging shape [12, 24, 24] and segmentation shape [12, 24, 20] differ"
        ),
        "{err}"
    );
    assert!(err.contains("case_00002: missing"), "{err}");
    assert!(err.contains("case_00003: listed in"), "{err}");
    assert!(p.entries().is_empty());
}

#[test]
fn editing_a_volume_of_a_folder_reruns_load() {
    let p = Project::new();
    let kits = kits_folder(&p, 3);
    p.write("p.toml", LOAD);
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let seg = kits.join("case_00000/segmentation.nii.gz");
    let labels = Volume::read(&seg)
        .unwrap()
        .to_labels()
        .unwrap()
        .0
        .into_owned();
    write_labels(&seg, [12, 24, 24], &labels);
    let plan = p.plan(&["p.toml"]);
    assert_eq!(plan[0].1, "run", "{plan:?}");
    assert!(
        plan[0].2.contains("case_00000/segmentation.nii.gz"),
        "{plan:?}"
    );
}

#[test]
fn non_square_slices_are_padded_to_square() {
    let p = Project::new();
    let dir = p.path().join("wide/case_00000");
    std::fs::create_dir_all(&dir).unwrap();
    let shape = [4, 8, 16];
    let img: Vec<u8> = (0..4 * 8 * 16).flat_map(|_| 200f32.to_le_bytes()).collect();
    let affine = kpipe::data::phantom::kits_affine([2.0, 1.0, 1.0]);
    write_volume(
        &dir.join("imaging.nii.gz"),
        &NewVolume {
            shape,
            datatype: Datatype::F32,
            data: &img,
            spacing: [2.0, 1.0, 1.0],
            affine,
            description: "",
        },
    )
    .unwrap();
    write_labels(
        &dir.join("segmentation.nii.gz"),
        shape,
        &vec![1u8; 4 * 8 * 16],
    );
    p.write("p.toml", "[pipeline]\nname = \"w\"\n[stages.load]\nkind = \"load\"\npath = \"wide\"\n[stages.slice]\nkind = \"slice\"\ninput = \"load\"\nsize = 16\n");
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let store = kpipe::data::slices::SliceStore::open(&p.output_with("slices.json")).unwrap();
    let lab = store.labels(0).unwrap();
    // 8 rows of 16 padded to 16x16: rows 4..12 are kidney, the rest padding
    let row = |r: usize| lab.slice(ndarray::s![0, r, ..]).to_vec();
    assert_eq!(row(0), vec![0u8; 16]);
    assert_eq!(row(4), vec![1u8; 16]);
    assert_eq!(row(11), vec![1u8; 16]);
    assert_eq!(row(12), vec![0u8; 16]);
    let img = store.images(0).unwrap().to_f32();
    assert_eq!(img[[0, 0, 0, 0]], 0.0, "padding is the window's low end");
    assert!((img[[0, 0, 8, 8]] - (200.0 + 79.0) / 383.0).abs() < 1e-6);
}

#[test]
fn z_score_statistics_come_from_the_training_cases_only() {
    let p = Project::new();
    let pipe = |slice_extra: &str| {
        common::data_pipeline(
            "zscore",
            5,
            6,
            [16, 32, 32],
            32,
            slice_extra,
            "ratios = [0.5, 0.3, 0.2]\n",
        )
    };
    // without the cases to fit on, or fitted on a held-out part: configuration errors
    p.write("bad.toml", &pipe("normalize = \"z-score\"\n"));
    let (code, _, err) = p.run(&["plan", "bad.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fit-on = \"split.train\""), "{err}");
    p.write(
        "leak.toml",
        &pipe("normalize = \"z-score\"\nfit-on = \"split.eval\"\n"),
    );
    let (code, _, err) = p.run(&["plan", "leak.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("leak"), "{err}");

    p.write(
        "p.toml",
        &pipe("normalize = \"z-score\"\nfit-on = \"split.train\"\n"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let split: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p.output_with("split.json").join("split.json")).unwrap(),
    )
    .unwrap();
    let data = p.output_with("cases.json").join("data");
    let (lo, hi) = (-79.0, 304.0);
    let stats = |cases: &[serde_json::Value]| {
        let (mut n, mut s, mut s2) = (0.0, 0.0, 0.0);
        for c in cases {
            let dir = data.join(c.as_str().unwrap());
            let img = Volume::read(&dir.join("imaging.nii.gz"))
                .unwrap()
                .to_f64()
                .unwrap();
            let seg = Volume::read(&dir.join("segmentation.nii.gz"))
                .unwrap()
                .to_f64()
                .unwrap();
            for (v, l) in img.iter().zip(&seg) {
                if *l > 0.0 {
                    let v = v.clamp(lo, hi);
                    n += 1.0;
                    s += v;
                    s2 += v * v;
                }
            }
        }
        let mean = s / n;
        (mean, (s2 / n - mean * mean).sqrt())
    };
    let (mean, std) = stats(split["train"].as_array().unwrap());
    let all: Vec<serde_json::Value> = ["train", "test", "eval"]
        .iter()
        .flat_map(|k| split[k].as_array().unwrap().clone())
        .collect();
    let (all_mean, _) = stats(&all);
    let store = kpipe::data::slices::SliceStore::open(&p.output_with("slices.json")).unwrap();
    let kpipe::data::slices::Normalization::ZScore {
        mean: m, std: sd, ..
    } = store.meta.normalization
    else {
        panic!("{:?}", store.meta.normalization)
    };
    assert!(
        (m - mean).abs() < 1e-6 && (sd - std).abs() < 1e-6,
        "{m} {sd} vs {mean} {std}"
    );
    assert!(
        (m - all_mean).abs() > 1e-6,
        "differs from all cases' statistics"
    );
}

#[test]
fn the_loader_bench_reads_every_slice_of_a_slice_node() {
    let p = Project::new();
    p.write("p.toml", &study());
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    // Every slice of the store, from the node of the latest run: 6 phantoms of 24 slices.
    let store = kpipe::data::slices::SliceStore::open(
        &p.entries()
            .into_iter()
            .map(|e| e.join("out"))
            .find(|o| o.join(kpipe::data::slices::SliceMeta::FILE).exists())
            .unwrap(),
    )
    .unwrap();
    let slices: usize = store.meta.cases.iter().map(|c| c.rows).sum();
    let (code, out, err) = p.run(&[
        "bench",
        "loader",
        "--slices",
        "p.toml:slice",
        "--epochs",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("kpipe loader: ")
            && out.contains(&format!("median of 2 epochs of {slices} slices of 32x32"))
            && out.contains("random flips"),
        "{out}"
    );
    // A node that is not there: a usage error naming the slice nodes that are.
    let (code, _, err) = p.run(&["bench", "loader", "--slices", "p.toml:slcie"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no node `slcie`") && err.contains("slice stores there: slice"),
        "{err}"
    );
}
