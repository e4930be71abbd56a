//! Augmentation applied in the training loader, per sample, deterministic from
//! (seed, epoch, sample position). Geometry moves image channels and labels together.
//!
//! ```toml
//! augment = { flip-horizontal = 0.5, flip-vertical = 0.5 }   # the study's flips
//! # also: rot90, crop (foreground-aware: crops around kidney/tumor, then resizes back),
//! # crop-scale = [0.5, 0.9], brightness, contrast, gamma, noise (intensity, in the
//! # normalised units), sample-pairing (probability; SamplePairing averages with another
//! # training image and keeps this one's labels)
//! ```

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use super::resample::{Filter, resize, resize_nearest};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Augment {
    pub flip_horizontal: f64,
    pub flip_vertical: f64,
    pub rot90: f64,
    pub crop: f64,
    pub crop_scale: [f64; 2],
    pub brightness: f64,
    pub contrast: f64,
    pub gamma: f64,
    pub noise: f64,
    pub sample_pairing: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip_horizontal: 0.0,
            flip_vertical: 0.0,
            rot90: 0.0,
            crop: 0.0,
            crop_scale: [0.5, 0.9],
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
            noise: 0.0,
            sample_pairing: 0.0,
        }
    }
}

/// One training sample: `channels` image planes and a label plane, `size` x `size`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Vec<f32>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub size: usize,
}

impl Sample {
    fn planes_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        let n = self.size * self.size;
        self.image.chunks_mut(n)
    }
}

/// The generator of one sample's augmentation.
pub fn sample_rng(seed: u64, epoch: usize, position: usize) -> Pcg64 {
    let mut h = blake3::Hasher::new_derive_key("kpipe augment v1");
    for v in [seed, epoch as u64, position as u64] {
        h.update(&v.to_le_bytes());
    }
    Pcg64::from_seed(*h.finalize().as_bytes())
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        *self
            == Augment {
                crop_scale: self.crop_scale,
                ..Augment::default()
            }
    }

    pub fn check(&self) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        for (k, p) in [
            ("flip-horizontal", self.flip_horizontal),
            ("flip-vertical", self.flip_vertical),
            ("rot90", self.rot90),
            ("crop", self.crop),
            ("sample-pairing", self.sample_pairing),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bad.push((k.to_string(), "a probability must be in [0, 1]".to_string()));
            }
        }
        let [a, b] = self.crop_scale;
        if !(0.05..=1.0).contains(&a) || !(a..=1.0).contains(&b) {
            bad.push((
                "crop-scale".into(),
                "must be [low, high] with 0.05 <= low <= high <= 1".into(),
            ));
        }
        for (k, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("gamma", self.gamma),
            ("noise", self.noise),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bad.push((k.to_string(), "must be a non-negative number".into()));
            }
        }
        bad
    }

    /// Applies the augmentation to `s` in place; `pair` supplies another training image
    /// for SamplePairing.
    pub fn apply(
        &self,
        s: &mut Sample,
        rng: &mut Pcg64,
        pair: impl FnOnce(&mut Pcg64) -> Option<Vec<f32>>,
    ) {
        let n = s.size;
        if rng.random_bool(self.flip_horizontal) {
            for plane in s.planes_mut() {
                flip_h(plane, n);
            }
            flip_h(&mut s.labels, n);
        }
        if rng.random_bool(self.flip_vertical) {
            for plane in s.planes_mut() {
                flip_v(plane, n);
            }
            flip_v(&mut s.labels, n);
        }
        if rng.random_bool(self.rot90) {
            let k = rng.random_range(1..4);
            for plane in s.planes_mut() {
                rot90(plane, n, k);
            }
            rot90(&mut s.labels, n, k);
        }
        if rng.random_bool(self.crop) {
            self.foreground_crop(s, rng);
        }
        if self.brightness > 0.0 || self.contrast > 0.0 || self.gamma > 0.0 {
            let shift = rng.random_range(-1.0..=1.0) * self.brightness;
            let scale = 1.0 + rng.random_range(-1.0..=1.0) * self.contrast;
            let gamma = (rng.random_range(-1.0..=1.0) * self.gamma).exp();
            for v in &mut s.image {
                let g = if gamma != 1.0 {
                    v.max(0.0).powf(gamma as f32)
                } else {
                    *v
                };
                *v = g * scale as f32 + shift as f32;
            }
        }
        if self.noise > 0.0 {
            let normal = Normal::new(0.0, self.noise).expect("finite sigma");
            for v in &mut s.image {
                *v += normal.sample(rng) as f32;
            }
        }
        if rng.random_bool(self.sample_pairing)
            && let Some(other) = pair(rng)
        {
            for (v, o) in s.image.iter_mut().zip(other) {
                *v = 0.5 * (*v + o);
            }
        }
    }

    /// Crops a window around the kidney/tumor (or anywhere, on an empty slice) and resizes
    /// it back: unlike a plain random crop, it keeps the small foreground in view.
    fn foreground_crop(&self, s: &mut Sample, rng: &mut Pcg64) {
        let n = s.size;
        let side = ((rng.random_range(self.crop_scale[0]..=self.crop_scale[1]) * n as f64).round()
            as usize)
            .clamp(1, n);
        let fg: Vec<usize> = s
            .labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > 0)
            .map(|(i, _)| i)
            .collect();
        let (cy, cx) = if fg.is_empty() {
            (rng.random_range(0..n), rng.random_range(0..n))
        } else {
            let i = fg[rng.random_range(0..fg.len())];
            (i / n, i % n)
        };
        let top = cy.saturating_sub(side / 2).min(n - side);
        let left = cx.saturating_sub(side / 2).min(n - side);
        let crop = |plane: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(side * side);
            for y in top..top + side {
                out.extend_from_slice(&plane[y * n + left..y * n + left + side]);
            }
            resize(&out, (side, side), (n, n), Filter::Bilinear)
        };
        let planes: Vec<Vec<f32>> = s.image.chunks(n * n).map(crop).collect();
        s.image = planes.concat();
        let mut lab = Vec::with_capacity(side * side);
        for y in top..top + side {
            lab.extend_from_slice(&s.labels[y * n + left..y * n + left + side]);
        }
        s.labels = resize_nearest(&lab, (side, side), (n, n));
    }
}

fn flip_h<T>(p: &mut [T], n: usize) {
    for row in p.chunks_mut(n) {
        row.reverse();
    }
}

fn flip_v<T: Copy>(p: &mut [T], n: usize) {
    for y in 0..n / 2 {
        let (a, b) = p.split_at_mut((n - 1 - y) * n);
        a[y * n..(y + 1) * n].swap_with_slice(&mut b[..n]);
    }
}

/// Rotates a square plane by k quarter turns counter-clockwise.
fn rot90<T: Copy>(p: &mut [T], n: usize, k: usize) {
    for _ in 0..k % 4 {
        let src = p.to_vec();
        for y in 0..n {
            for x in 0..n {
                // (y, x) <- (x, n - 1 - y)
                p[y * n + x] = src[x * n + (n - 1 - y)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
            aug.apply(&mut s, &mut sample_rng(1, 0, 0), |_| None);
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

    #[test]
    fn a_flipped_label_map_is_the_flipped_original() {
        let mut s = sample();
        Augment {
            flip_horizontal: 1.0,
            ..Default::default()
        }
        .apply(&mut s, &mut sample_rng(3, 1, 2), |_| None);
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
            aug.apply(&mut s, &mut sample_rng(9, e, p), |_| None);
            s
        };
        assert_eq!(run(1, 2), run(1, 2));
        assert_ne!(run(1, 2), run(2, 2));
    }
}
