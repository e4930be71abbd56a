//! The study's networks: output shapes at two input sizes and parameter counts.

use burn::tensor::{Device, Distribution, Tensor};
use kpipe::models::{ModelConfig, ModelKind, param_counts};

fn config(kind: ModelKind, base: usize) -> ModelConfig {
    ModelConfig {
        kind,
        in_channels: 1,
        base,
        batch_norm: false,
        up_kernel: 2,
        freeze_encoder: true,
    }
}

#[test]
fn every_model_maps_images_to_class_logits_at_two_sizes() {
    let device = Device::flex();
    for kind in ModelKind::ALL {
        let mut c = config(kind, 8);
        c.in_channels = 3;
        let net = c.init(&device);
        for size in [32, 64] {
            let x = Tensor::<4>::random([2, 3, size, size], Distribution::Default, &device);
            assert_eq!(
                net.forward(x).dims(),
                [2, 3, size, size],
                "{kind:?} at {size}"
            );
        }
    }
}

#[test]
fn parameter_counts_match_the_study() {
    let device = Device::flex();
    let within = |kind: ModelKind, got: usize, tolerance: f64| {
        let want = kind.study_params().unwrap() as f64;
        let off = (got as f64 - want).abs() / want;
        assert!(
            off <= tolerance,
            "{kind:?}: {got} trainable vs the study's {want} ({:.3}%)",
            off * 100.0
        );
    };
    let unet = config(ModelKind::Unet, 64).init(&device);
    let (trainable, frozen) = param_counts(&unet, true);
    assert_eq!((trainable, frozen), (31_030_723, 0));
    within(ModelKind::Unet, trainable, 0.01);
    let mut three = config(ModelKind::Unet, 64);
    three.up_kernel = 3;
    let (t3, _) = param_counts(&three.init(&device), true);
    assert!(
        (t3 as f64 / 31_031_857.0 - 1.11).abs() < 0.01,
        "3x3 up-convs give +11%: {t3}"
    );
    let fcn = config(ModelKind::Fcn8s, 64).init(&device);
    let (trainable, frozen) = param_counts(&fcn, true);
    assert_eq!(trainable, 6_198_019, "FCN V1 with a frozen VGG16 encoder");
    // VGG16's 13 convolutions hold 14,714,688 parameters on RGB input; on one CT channel
    // the first convolution is 2 * 64 * 9 smaller
    assert_eq!(frozen, 14_714_688 - 2 * 64 * 9);
}

#[test]
fn the_models_command_lists_every_network_with_its_counts() {
    let out = assert_cmd::Command::cargo_bin("kpipe")
        .unwrap()
        .args(["models", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["model"], "unet");
    assert_eq!(rows[0]["trainable"], 31_030_723);
    assert_eq!(rows[1]["trainable"], 6_198_019);
}
