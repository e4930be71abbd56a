//! Augmentation applied in the training loader, per sample, deterministic from
//! (seed, epoch, sample position). Geometry moves image channels and labels together.
//!
//! ```toml
//! augment = { flip-horizontal = 0.5, flip-vertical = 0.5 }   # the study's flips
//! # also: rot90, crop (foreground-aware: crops around kidney/tumor, then resizes back),
//! # crop-scale = [0.5, 0.9], brightness, contrast, gamma, noise (intensity, in the
//! # normalised units), sample-pairing (probability; SamplePairing averages with another
//! # training image and keeps this one's labels)
//! augment = { affine = { p = 0.5, rotate = 15.0, scale = 0.1, shift = 0.05 } }
//! augment = { elastic = { p = 0.5, sigma = 10.0, grid = 3 } }   # the U-Net paper's
//! augment = { mixup = { p = 0.5, alpha = 0.2 } }                # per batch
//! ```
//!
//! Warps sample images bilinearly (edges clamped) and labels at the nearest pixel
//! (background outside), through the same map, so they stay aligned. Each part draws from
//! its own stream ([`Draws::stream`], seeded by the sample and the part's name), and a
//! disabled part draws nothing: enabling one leaves every other part's draws alone.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use super::resample::{Filter, resize, resize_nearest};

mod geometry;
use geometry::{flip_h, flip_v, rot90, warp};

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
    /// Random rotation, zoom and shift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affine: Option<Affine>,
    /// Random elastic deformation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elastic: Option<Elastic>,
    /// mixup, per batch (see [`Mixup`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixup: Option<Mixup>,
}

/// `mixup = { p = 0.5, alpha = 0.2 }` (Zhang et al. 2018), per batch: with probability
/// `p`, λ ~ Beta(α, α) and a seeded permutation of the batch; images become
/// λ·x + (1 − λ)·x[perm] and the loss λ·L(y) + (1 − λ)·L(y[perm]), which for
/// cross-entropy is the loss of the mixed soft targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Mixup {
    pub p: f64,
    pub alpha: f64,
}

impl Default for Mixup {
    fn default() -> Self {
        Mixup { p: 0.5, alpha: 0.2 }
    }
}

impl Mixup {
    /// (λ, permutation) for batch `batch` of `epoch`, or `None` when this batch is not
    /// mixed; deterministic from (seed, epoch, batch).
    pub fn draw(
        &self,
        seed: u64,
        epoch: usize,
        batch: usize,
        n: usize,
    ) -> Option<(f32, Vec<usize>)> {
        let mut rng = Draws::new(seed, epoch, batch).happens("mixup", self.p)?;
        let beta = rand_distr::Beta::new(self.alpha, self.alpha).ok()?;
        let lambda = beta.sample(&mut rng) as f32;
        let mut perm: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), &mut rng);
        Some((lambda, perm))
    }

    /// λ·images + (1 − λ)·images[perm], `per` values a sample.
    pub fn mix(images: &[f32], per: usize, lambda: f32, perm: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(images.len());
        for (i, &j) in perm.iter().enumerate() {
            let (a, b) = (&images[i * per..][..per], &images[j * per..][..per]);
            out.extend(
                a.iter()
                    .zip(b)
                    .map(|(x, y)| lambda * x + (1.0 - lambda) * y),
            );
        }
        out
    }
}

/// `affine = { p = 0.5, rotate = 15.0, scale = 0.1, shift = 0.05 }`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Affine {
    /// Probability per sample.
    pub p: f64,
    /// Largest rotation, degrees either way.
    pub rotate: f64,
    /// Largest relative zoom either way.
    pub scale: f64,
    /// Largest shift, as a fraction of the size, each axis either way.
    pub shift: f64,
}

impl Default for Affine {
    fn default() -> Self {
        Affine {
            p: 0.5,
            rotate: 15.0,
            scale: 0.1,
            shift: 0.05,
        }
    }
}

/// `elastic = { p = 0.5, sigma = 10.0, grid = 3 }`: displacements drawn with standard
/// deviation `sigma` pixels on a `grid` x `grid` grid (the U-Net paper's), interpolated
/// bilinearly to every pixel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Elastic {
    pub p: f64,
    pub sigma: f64,
    pub grid: usize,
}

impl Default for Elastic {
    fn default() -> Self {
        Elastic {
            p: 0.5,
            sigma: 10.0,
            grid: 3,
        }
    }
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
            affine: None,
            elastic: None,
            mixup: None,
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

/// The random draws of one sample's augmentation: one stream per part.
#[derive(Debug, Clone, Copy)]
pub struct Draws {
    seed: u64,
    epoch: usize,
    position: usize,
}

impl Draws {
    /// The draws of the sample at `position` of `epoch`.
    pub fn new(seed: u64, epoch: usize, position: usize) -> Draws {
        Draws {
            seed,
            epoch,
            position,
        }
    }

    /// The generator of one part (`"rot90"`, `"affine"`, ...) of this sample.
    pub fn stream(&self, part: &str) -> Pcg64 {
        let mut h = blake3::Hasher::new_derive_key("kpipe augment stream v2");
        for v in [self.seed, self.epoch as u64, self.position as u64] {
            h.update(&v.to_le_bytes());
        }
        h.update(part.as_bytes());
        Pcg64::from_seed(*h.finalize().as_bytes())
    }

    /// Whether a part enabled with probability `p` applies: no draw when `p` is 0.
    fn happens(&self, part: &str, p: f64) -> Option<Pcg64> {
        if p <= 0.0 {
            return None;
        }
        let mut rng = self.stream(part);
        rng.random_bool(p.min(1.0)).then_some(rng)
    }
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
        if let Some(a) = &self.affine {
            if !(0.0..=1.0).contains(&a.p) {
                bad.push(("affine.p".into(), "a probability must be in [0, 1]".into()));
            }
            if !(0.0..=180.0).contains(&a.rotate) {
                bad.push(("affine.rotate".into(), "must be in [0, 180] degrees".into()));
            }
            if !(0.0..0.9).contains(&a.scale) {
                bad.push(("affine.scale".into(), "must be in [0, 0.9)".into()));
            }
            if !(0.0..=0.5).contains(&a.shift) {
                bad.push(("affine.shift".into(), "must be in [0, 0.5]".into()));
            }
        }
        if let Some(m) = &self.mixup {
            if !(0.0..=1.0).contains(&m.p) {
                bad.push(("mixup.p".into(), "a probability must be in [0, 1]".into()));
            }
            if !(m.alpha > 0.0 && m.alpha.is_finite()) {
                bad.push(("mixup.alpha".into(), "must be a positive number".into()));
            }
        }
        if let Some(e) = &self.elastic {
            if !(0.0..=1.0).contains(&e.p) {
                bad.push(("elastic.p".into(), "a probability must be in [0, 1]".into()));
            }
            if !(e.sigma >= 0.0 && e.sigma.is_finite()) {
                bad.push((
                    "elastic.sigma".into(),
                    "must be a non-negative number".into(),
                ));
            }
            if !(2..=64).contains(&e.grid) {
                bad.push(("elastic.grid".into(), "must be in 2..=64".into()));
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
        draws: &Draws,
        pair: impl FnOnce(&mut Pcg64) -> Option<Vec<f32>>,
    ) {
        let n = s.size;
        if draws
            .happens("flip-horizontal", self.flip_horizontal)
            .is_some()
        {
            for plane in s.planes_mut() {
                flip_h(plane, n);
            }
            flip_h(&mut s.labels, n);
        }
        if draws.happens("flip-vertical", self.flip_vertical).is_some() {
            for plane in s.planes_mut() {
                flip_v(plane, n);
            }
            flip_v(&mut s.labels, n);
        }
        if let Some(mut rng) = draws.happens("rot90", self.rot90) {
            let k = rng.random_range(1..4);
            for plane in s.planes_mut() {
                rot90(plane, n, k);
            }
            rot90(&mut s.labels, n, k);
        }
        if let Some(mut rng) = draws.happens("crop", self.crop) {
            self.foreground_crop(s, &mut rng);
        }
        if let Some((a, mut rng)) =
            (self.affine.as_ref()).and_then(|a| Some((a, draws.happens("affine", a.p)?)))
        {
            let c = (n as f64 - 1.0) / 2.0;
            let angle = rng.random_range(-1.0..=1.0) * a.rotate.to_radians();
            let zoom = 1.0 + rng.random_range(-1.0..=1.0) * a.scale;
            let shift = a.shift * n as f64;
            let (ty, tx) = (
                rng.random_range(-1.0..=1.0) * shift,
                rng.random_range(-1.0..=1.0) * shift,
            );
            let (sin, cos) = angle.sin_cos();
            // output (y, x) <- the inverse transform: un-shift, un-rotate, un-zoom
            warp(s, |y, x| {
                let (dy, dx) = (y - c - ty, x - c - tx);
                (
                    c + (cos * dy - sin * dx) / zoom,
                    c + (sin * dy + cos * dx) / zoom,
                )
            });
        }
        if let Some((e, mut rng)) =
            (self.elastic.as_ref()).and_then(|e| Some((e, draws.happens("elastic", e.p)?)))
        {
            let g = e.grid;
            let normal = Normal::new(0.0, e.sigma).expect("finite sigma");
            let field: Vec<(f64, f64)> = (0..g * g)
                .map(|_| (normal.sample(&mut rng), normal.sample(&mut rng)))
                .collect();
            let step = (n as f64 - 1.0) / (g as f64 - 1.0);
            warp(s, |y, x| {
                let (gy, gx) = (y / step, x / step);
                let (y0, x0) = ((gy as usize).min(g - 2), (gx as usize).min(g - 2));
                let (fy, fx) = (gy - y0 as f64, gx - x0 as f64);
                let at = |i: usize, j: usize| field[i * g + j];
                let lerp = |a: (f64, f64), b: (f64, f64), t: f64| {
                    (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t)
                };
                let top = lerp(at(y0, x0), at(y0, x0 + 1), fx);
                let bottom = lerp(at(y0 + 1, x0), at(y0 + 1, x0 + 1), fx);
                let (dy, dx) = lerp(top, bottom, fy);
                (y + dy, x + dx)
            });
        }
        if self.brightness > 0.0 || self.contrast > 0.0 || self.gamma > 0.0 {
            // one part: the three draws of an intensity change stay together
            let mut rng = draws.stream("intensity");
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
            let mut rng = draws.stream("noise");
            for v in &mut s.image {
                *v += normal.sample(&mut rng) as f32;
            }
        }
        if let Some(mut rng) = draws.happens("sample-pairing", self.sample_pairing)
            && let Some(other) = pair(&mut rng)
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

#[cfg(test)]
mod tests;
