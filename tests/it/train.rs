//! Training end to end on a tiny synthetic split: it learns, it is bit-reproducible on
//! CPU, and an interrupted run resumes to the same weights.

use crate::common::{self, Project, ran};

fn tiny() -> String {
    common::small_data_pipeline("tiny", 5)
        + &common::train_stage(
            "train",
            4,
            "epochs = 4\nbatch-size = 4\nlearning-rate = 3e-3\naugment = { flip-horizontal = 0.5 }\n",
        )
}

fn lock_output(p: &Project, node: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path().join("p.lock")).unwrap()).unwrap();
    v["nodes"][node]["output"].as_str().unwrap().to_string()
}

fn train_out(p: &Project) -> std::path::PathBuf {
    p.output_with("model.safetensors")
}

#[test]
fn training_lowers_the_loss_and_writes_weights_config_and_metrics() {
    let p = Project::new();
    p.write("p.toml", &tiny());
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
        p.write("p.toml", &tiny());
        let (code, _, err) = p.run(&["run", "p.toml"]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(lock_output(&a, "train"), lock_output(&b, "train"));
    let c = Project::new();
    c.write("p.toml", &tiny().replace("seed = 5", "seed = 6"));
    c.run(&["run", "p.toml"]);
    assert_ne!(lock_output(&a, "train"), lock_output(&c, "train"));
}

#[test]
fn a_killed_training_resumes_to_the_weights_of_an_uninterrupted_run() {
    let whole = Project::new();
    whole.write("p.toml", &tiny());
    assert_eq!(whole.run(&["run", "p.toml"]).0, 0);
    let p = Project::new();
    p.write("p.toml", &tiny());
    // a full run, then its training entry removed: the next run trains again with the
    // data stages cached, so the kill lands in training
    assert_eq!(p.run(&["run", "p.toml"]).0, 0);
    std::fs::remove_dir_all(train_out(&p).parent().unwrap()).unwrap();
    let mut child = p.spawn(&["run", "p.toml"]);
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
    let more = tiny() + &common::train_stage("more", 4, "epochs = 1\ninit-from = \"train\"\n");
    p.write("p.toml", &more);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(ran(&err).contains(&"more".to_string()));
    if cfg!(not(feature = "gpu")) {
        p.write(
            "p.toml",
            &tiny().replace("base = 4", "base = 4\nbackend = \"gpu\""),
        );
        let (code, _, err) = p.run(&["run", "p.toml"]);
        assert_eq!(code, 1);
        assert!(err.contains("built without GPU support"), "{err}");
    }
}

/// A VGG16-shaped safetensors file with torchvision's names (RGB input), widths
/// `base * [1, 2, 4, 8, 8]`, deterministic values.
fn write_vgg16(path: &std::path::Path, base: usize) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let widths = [base, base * 2, base * 4, base * 8, base * 8];
    let depths = [2, 2, 3, 3, 3];
    let (mut tensors, mut cin, mut index) = (Vec::new(), 3, 0);
    for (w, n) in widths.into_iter().zip(depths) {
        for _ in 0..n {
            let shape = vec![w, cin, 3, 3];
            let len = w * cin * 9;
            let weight = (0..len)
                .map(|i| ((i * 7919 + index) % 97) as f32 / 970.0 - 0.05)
                .collect();
            tensors.push((format!("features.{index}.weight"), weight, shape));
            tensors.push((
                format!("features.{index}.bias"),
                vec![0.01 * index as f32; w],
                vec![w],
            ));
            cin = w;
            index += 2;
        }
        index += 1; // the max-pool's index in torchvision's `features`
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, v, s)| {
            (
                n.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                s.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    tensors
}

fn read_tensor(path: &std::path::Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("no `{name}` in {:?}", file.names()));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn pretrained_vgg16_weights_load_adapted_to_grey_input_and_stay_frozen() {
    let p = Project::new();
    let vgg = write_vgg16(&p.path().join("vgg.safetensors"), 4);
    let fcn = tiny().replace(
        "base = 4\n",
        "base = 4\nmodel = \"fcn8s\"\npretrained = \"vgg.safetensors\"\n",
    );
    p.write("p.toml", &fcn);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let weights = train_out(&p).join("model.safetensors");
    // the first layer: ImageNet's RGB kernels summed for the one CT channel
    let first = read_tensor(&weights, "Fcn.encoder.0.0.conv.weight");
    let (_, rgb, _) = &vgg[0];
    let summed: Vec<f32> = (0..4)
        .flat_map(|o| (0..9).map(move |k| (o, k)))
        .map(|(o, k)| (0..3).map(|c| rgb[(o * 3 + c) * 9 + k]).sum())
        .collect();
    assert_eq!(first, summed);
    // a deeper layer (features.28, the last conv) and a bias, unchanged by training
    let (_, last, _) = &vgg[24];
    assert_eq!(&read_tensor(&weights, "Fcn.encoder.4.2.conv.weight"), last);
    assert_eq!(
        read_tensor(&weights, "Fcn.encoder.1.0.conv.bias"),
        vgg[5].1,
        "features.5.bias"
    );
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(train_out(&p).join("model.json")).unwrap())
            .unwrap();
    assert_eq!(model["model"]["freeze-encoder"], true);

    // new weights under the same name retrain; weights of another shape are an error
    write_vgg16(&p.path().join("vgg.safetensors"), 8);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("features.0.weight") && err.contains("[8, 1, 3, 3]"),
        "{err}"
    );
    // ... and U-Net has no VGG16 encoder
    p.write(
        "p.toml",
        &fcn.replace("model = \"fcn8s\"", "model = \"unet\""),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fit `fcn8s` and `fcn8s-v2` only"), "{err}");
}

#[test]
fn a_fold_sweep_trains_one_arm_per_cross_validation_fold() {
    let p = Project::new();
    let cv = tiny()
        .replace(
            "ratios = [0.6, 0.2, 0.2]",
            "ratios = [0.6, 0.2, 0.2]\nfolds = 2",
        )
        .replace("epochs = 4", "epochs = 1")
        + "\n[stages.train.sweep]\nfold = [0, 1]\n";
    p.write("p.toml", &cv);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let arms: Vec<String> = ran(&err)
        .into_iter()
        .filter(|id| id.starts_with("train["))
        .collect();
    assert_eq!(arms, ["train[fold=0]", "train[fold=1]"]);
    let split: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            p.entries()
                .into_iter()
                .map(|e| e.join("out/split.json"))
                .find(|f| f.exists())
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let folds = split["folds"].as_array().unwrap();
    assert_eq!(folds.len(), 2);
    assert_eq!(split["eval"].as_array().unwrap().len(), 1);
    // a fold past the split's count is a configuration error before anything runs,
    // pointing at the sweep and naming the count
    p.write("p.toml", &cv.replace("fold = [0, 1]", "fold = [0, 2]"));
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("p.toml:") && err.contains("fold = [0, 2]"),
        "{err}"
    );
    assert!(err.contains("`fold = 2`, but `split` has 2 folds"), "{err}");
}

#[test]
fn mixup_trains_and_changes_what_is_learned() {
    let p = Project::new();
    let plain = tiny().replace("epochs = 4", "epochs = 2");
    p.write("p.toml", &plain);
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    let without = lock_output(&p, "train");
    p.write(
        "p.toml",
        &plain.replace(
            "augment = { flip-horizontal = 0.5 }",
            "augment = { flip-horizontal = 0.5, mixup = { p = 1.0, alpha = 0.4 } }",
        ),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(lock_output(&p, "train"), without);
    let metrics = std::fs::read_to_string(train_out_of(&p, &lock_output(&p, "train"))).unwrap();
    assert!(
        metrics.lines().skip(1).all(|l| l
            .split(',')
            .nth(2)
            .unwrap()
            .parse::<f64>()
            .unwrap()
            .is_finite()),
        "{metrics}"
    );
    // a bad alpha is a configuration error
    p.write(
        "p.toml",
        &plain.replace("flip-horizontal = 0.5 }", "mixup = { alpha = 0.0 } }"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("must be a positive number"), "{err}");
}

/// The `metrics.csv` of the train entry whose output digest is `digest`.
fn train_out_of(p: &Project, digest: &str) -> std::path::PathBuf {
    p.entries()
        .into_iter()
        .find(|e| {
            std::fs::read_to_string(e.join("manifest.json")).is_ok_and(|m| m.contains(digest))
        })
        .expect("the entry")
        .join("out/metrics.csv")
}

#[test]
fn a_loss_that_is_not_finite_stops_the_training_and_says_where() {
    let p = Project::new();
    p.write(
        "p.toml",
        &tiny().replace("learning-rate = 3e-3", "learning-rate = 1e30"),
    );
    let (code, _, err) = p.run(&["run", "p.toml"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the training loss became"), "{err}");
    assert!(err.contains("at epoch 1, step 2"), "{err}");
    assert!(err.contains("hint: lower the learning rate"), "{err}");
    assert!(
        p.entries()
            .iter()
            .all(|e| !e.join("out/model.safetensors").exists()),
        "no model is cached"
    );
}
