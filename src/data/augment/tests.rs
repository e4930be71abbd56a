//! The augmentations' tests: geometry keeps labels on their image, draws are seeded
//! and independent per part.

use super::*;

fn sample() -> Sample {
    let n = 4;
    Sample {
        image: (0..2 * n * n).map(|v| v as f32).collect(),
        labels: (0..n * n).map(|v| (v % 3) as u8).collect(),
        channels: 2,
        size: n,
    }
}

#[test]
fn geometry_moves_images_and_labels_together() {
    for aug in [
        Augment {
            flip_horizontal: 1.0,
            ..Default::default()
        },
        Augment {
            flip_vertical: 1.0,
            ..Default::default()
        },
        Augment {
            rot90: 1.0,
            ..Default::default()
        },
        Augment {
            crop: 1.0,
            ..Default::default()
        },
    ] {
        let mut s = sample();
        aug.apply(&mut s, &Draws::new(1, 0, 0), |_| None);
        // channel 0 held v, labels held v % 3: the pairing survives any geometry
        for (i, &l) in s.labels.iter().enumerate() {
            let v = s.image[i];
            if aug.crop == 0.0 {
                assert_eq!((v as usize % 3) as u8, l, "{aug:?}");
                assert_eq!(s.image[16 + i], v + 16.0, "channels move together: {aug:?}");
            }
        }
        assert_ne!(s, sample(), "{aug:?} changed nothing");
    }
}

/// A 16x16 sample whose image is its label map (a disc of kidney with a tumor).
fn disc() -> Sample {
    let n = 16;
    let labels: Vec<u8> = (0..n * n)
        .map(|i| {
            let (y, x) = ((i / n) as f64 - 7.0, (i % n) as f64 - 6.0);
            let r = (y * y + x * x).sqrt();
            if r < 2.0 {
                2
            } else if r < 5.0 {
                1
            } else {
                0
            }
        })
        .collect();
    Sample {
        image: labels.iter().map(|&l| f32::from(l)).collect(),
        labels,
        channels: 1,
        size: n,
    }
}

#[test]
fn an_integer_shift_moves_images_and_labels_exactly_together() {
    let mut s = disc();
    // a pure shift of (2, -3): bilinear sampling at whole pixels is exact
    warp(&mut s, |y, x| (y - 2.0, x + 3.0));
    let orig = disc();
    for y in 0..16 {
        for x in 0..16 {
            let l = s.labels[y * 16 + x];
            let (sy, sx) = (y as i64 - 2, x as i64 + 3);
            let want = if (0..16).contains(&sy) && (0..16).contains(&sx) {
                orig.labels[sy as usize * 16 + sx as usize]
            } else {
                0
            };
            assert_eq!(l, want, "({y}, {x})");
            if (0..16).contains(&sy) && (0..16).contains(&sx) {
                assert_eq!(s.image[y * 16 + x], f32::from(l), "({y}, {x})");
            }
        }
    }
}

#[test]
fn affine_and_elastic_warps_keep_labels_on_their_image() {
    for aug in [
        Augment {
            affine: Some(Affine {
                p: 1.0,
                rotate: 30.0,
                scale: 0.2,
                shift: 0.1,
            }),
            ..Default::default()
        },
        Augment {
            elastic: Some(Elastic {
                p: 1.0,
                sigma: 2.0,
                grid: 3,
            }),
            ..Default::default()
        },
    ] {
        let mut s = disc();
        aug.apply(&mut s, &Draws::new(4, 0, 1), |_| None);
        assert_ne!(s.labels, disc().labels, "{aug:?} moved nothing");
        // where the label is kidney or tumor, the (interpolated) image agrees to
        // within a label step; a misaligned map would put labels over background
        let agree = s
            .labels
            .iter()
            .zip(&s.image)
            .filter(|&(&l, &v)| (f32::from(l) - v).abs() < 1.0)
            .count();
        assert!(agree >= 16 * 16 * 9 / 10, "{agree} of 256 agree: {aug:?}");
        let kidney = s.labels.iter().filter(|&&l| l > 0).count();
        let before = disc().labels.iter().filter(|&&l| l > 0).count();
        assert!(
            kidney * 2 > before && kidney < before * 2,
            "{kidney} vs {before}"
        );
    }
}

#[test]
fn mixup_draws_are_seeded_and_mix_images_by_lambda() {
    let m = Mixup { p: 1.0, alpha: 0.4 };
    let (lambda, perm) = m.draw(3, 1, 2, 4).unwrap();
    assert_eq!(m.draw(3, 1, 2, 4), Some((lambda, perm.clone())));
    assert_ne!(
        m.draw(3, 1, 3, 4),
        Some((lambda, perm.clone())),
        "another batch, another draw"
    );
    assert!((0.0..=1.0).contains(&lambda));
    let mut sorted = perm.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2, 3]);
    // two samples of two values: sample 0 mixed with sample 1 and back
    let mixed = Mixup::mix(&[0.0, 1.0, 10.0, 20.0], 2, 0.25, &[1, 0]);
    assert_eq!(mixed, [7.5, 15.25, 2.5, 5.75]);
    assert_eq!(Mixup { p: 0.0, alpha: 0.4 }.draw(3, 1, 2, 4), None);
}

#[test]
fn a_flipped_label_map_is_the_flipped_original() {
    let mut s = sample();
    Augment {
        flip_horizontal: 1.0,
        ..Default::default()
    }
    .apply(&mut s, &Draws::new(3, 1, 2), |_| None);
    let orig = sample().labels;
    for y in 0..4 {
        for x in 0..4 {
            assert_eq!(s.labels[y * 4 + x], orig[y * 4 + (3 - x)]);
        }
    }
}

#[test]
fn the_same_seed_epoch_and_position_give_the_same_sample() {
    let aug = Augment {
        flip_horizontal: 0.5,
        rot90: 0.5,
        noise: 0.1,
        crop: 0.5,
        ..Default::default()
    };
    let run = |e, p| {
        let mut s = sample();
        aug.apply(&mut s, &Draws::new(9, e, p), |_| None);
        s
    };
    assert_eq!(run(1, 2), run(1, 2));
    assert_ne!(run(1, 2), run(2, 2));
}

#[test]
fn enabling_a_part_leaves_the_other_parts_draws_alone() {
    // On a constant image the geometric parts change nothing, so the outputs agree
    // exactly when the intensity and noise draws do.
    let base = Augment {
        flip_horizontal: 0.5,
        brightness: 0.3,
        gamma: 0.2,
        noise: 0.05,
        ..Default::default()
    };
    let more = Augment {
        rot90: 1.0,
        flip_vertical: 0.7,
        ..base.clone()
    };
    let flat = || {
        let mut s = sample();
        s.image.fill(0.25);
        s.labels.fill(0);
        s
    };
    let mut differ = 0;
    for p in 0..16 {
        let draws = Draws::new(5, 1, p);
        let (mut a, mut b) = (flat(), flat());
        base.apply(&mut a, &draws, |_| None);
        more.apply(&mut b, &draws, |_| None);
        assert_eq!(a.image, b.image, "position {p}");
        differ += usize::from(a.image != flat().image);
    }
    assert_eq!(differ, 16, "the intensity parts did change the images");
}
