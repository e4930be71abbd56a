//! The training loader: which slices make each batch of an epoch, and the batches
//! themselves (gathered from the memory-mapped slice store, augmented).

use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

use super::augment::{Augment, Draws, Sample};
use super::slices::{SliceStore, StoreError};

/// A slice of the store: (case index, row).
pub type SliceId = (usize, usize);

/// Every slice of the given cases, in store order.
pub fn slices_of(store: &SliceStore, case_ids: &[String]) -> Result<Vec<SliceId>, String> {
    let mut out = Vec::new();
    for id in case_ids {
        let i = store
            .case_index(id)
            .ok_or_else(|| format!("case `{id}` of the split is not in the slice store"))?;
        out.extend((0..store.meta.cases[i].rows).map(|r| (i, r)));
    }
    Ok(out)
}

/// How an epoch orders the training slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shuffle {
    /// A full permutation per epoch.
    Full,
    /// A `tf.data`-style shuffle buffer of this size over the store order (the study: 200).
    Buffer(usize),
}

/// The order of an epoch, seeded by (seed, epoch).
pub fn epoch_order(slices: &[SliceId], shuffle: Shuffle, seed: u64, epoch: usize) -> Vec<SliceId> {
    let mut rng = Pcg64::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    match shuffle {
        Shuffle::Full => {
            let mut v = slices.to_vec();
            v.shuffle(&mut rng);
            v
        }
        Shuffle::Buffer(n) => {
            let mut buffer: Vec<SliceId> = Vec::with_capacity(n);
            let mut out = Vec::with_capacity(slices.len());
            for &s in slices {
                if buffer.len() == n.max(1) {
                    let i = rng.random_range(0..buffer.len());
                    out.push(buffer.swap_remove(i));
                }
                buffer.push(s);
            }
            while !buffer.is_empty() {
                let i = rng.random_range(0..buffer.len());
                out.push(buffer.swap_remove(i));
            }
            out
        }
    }
}

/// Training on patches of the slices (`patch = { size = 64, foreground = 0.33 }`), as
/// nnU-Net does: each sample is a `size` x `size` window of its (augmented) slice, placed
/// at random, or, with probability `foreground`, centred on a pixel of a foreground class
/// the slice shows (the class drawn first, then the pixel), so small structures are seen
/// often. The networks are fully convolutional: validation and inference see whole slices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Patch {
    pub size: usize,
    #[serde(default = "default_foreground")]
    pub foreground: f64,
}

fn default_foreground() -> f64 {
    1.0 / 3.0
}

impl Patch {
    /// The window of `sample` this draw picks.
    pub fn crop(&self, sample: Sample, draws: &Draws) -> Sample {
        let (s, p) = (sample.size, self.size.min(sample.size));
        let mut rng = draws.stream("patch");
        let mut origin = [rng.random_range(0..=s - p), rng.random_range(0..=s - p)];
        if rng.random_bool(self.foreground.clamp(0.0, 1.0)) {
            let classes: Vec<u8> = [1u8, 2]
                .into_iter()
                .filter(|c| sample.labels.contains(c))
                .collect();
            if !classes.is_empty() {
                let class = classes[rng.random_range(0..classes.len())];
                let n = sample.labels.iter().filter(|&&l| l == class).count();
                let k = rng.random_range(0..n);
                let at = sample
                    .labels
                    .iter()
                    .enumerate()
                    .filter(|&(_, &l)| l == class)
                    .nth(k)
                    .map_or(0, |(i, _)| i);
                origin = [at / s, at % s].map(|c| c.saturating_sub(p / 2).min(s - p));
            }
        }
        let [r0, c0] = origin;
        let window = |plane: &[f32]| -> Vec<f32> {
            (r0..r0 + p)
                .flat_map(|r| plane[r * s + c0..r * s + c0 + p].iter().copied())
                .collect()
        };
        Sample {
            image: sample.image.chunks(s * s).flat_map(window).collect(),
            labels: (r0..r0 + p)
                .flat_map(|r| sample.labels[r * s + c0..r * s + c0 + p].iter().copied())
                .collect(),
            channels: sample.channels,
            size: p,
        }
    }

    pub fn check(&self) -> Option<String> {
        (!(0.0..=1.0).contains(&self.foreground))
            .then(|| "`foreground` is a probability: from 0 to 1".into())
    }
}

/// How the training loader draws each sample of an epoch: augmentation and patches,
/// seeded by (seed, epoch, position in the epoch); `pool` is what SamplePairing mixes in.
#[derive(Clone, Copy)]
pub struct Sampling<'a> {
    pub augment: &'a Augment,
    pub patch: Option<Patch>,
    pub seed: u64,
    pub epoch: usize,
    pub pool: &'a [SliceId],
}

/// A batch as flat arrays: images `[n, channels, size, size]`, labels `[n, size, size]`.
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub len: usize,
    /// The side of each image (the slice size, or the patch size).
    pub size: usize,
}

/// Gathers the slices `ids`, drawn as `sampling` says (none: as stored); `first` is the
/// position of `ids[0]` in the epoch, so every sample's draws are seeded by its position.
pub fn batch(
    store: &SliceStore,
    ids: &[SliceId],
    sampling: Option<(Sampling<'_>, usize)>,
) -> Result<Batch, StoreError> {
    let c = store.meta.channels;
    let s = match sampling.and_then(|(d, _)| d.patch) {
        Some(p) => p.size.min(store.meta.size),
        None => store.meta.size,
    };
    let mut images = Vec::with_capacity(ids.len() * c * s * s);
    let mut labels = Vec::with_capacity(ids.len() * s * s);
    let read = |(case, row): SliceId| -> Result<Sample, StoreError> {
        let img = store.images(case)?;
        let lab = store.labels(case)?;
        Ok(Sample {
            image: img.row(row),
            labels: lab
                .slice(ndarray::s![row, .., ..])
                .iter()
                .copied()
                .collect(),
            channels: c,
            size: store.meta.size,
        })
    };
    for (k, &id) in ids.iter().enumerate() {
        let mut sample = read(id)?;
        if let Some((d, first)) = sampling {
            let draws = Draws::new(d.seed, d.epoch, first + k);
            if !d.augment.is_identity() {
                d.augment.apply(&mut sample, &draws, |rng| {
                    let other = d.pool[rng.random_range(0..d.pool.len())];
                    read(other).ok().map(|o| o.image)
                });
            }
            if let Some(p) = d.patch {
                sample = p.crop(sample, &draws);
            }
        }
        images.extend_from_slice(&sample.image);
        labels.extend_from_slice(&sample.labels);
    }
    Ok(Batch {
        images,
        labels,
        len: ids.len(),
        size: s,
    })
}

/// The batches of an epoch (`order` in chunks of `batch_size`, drawn as `sampling` says),
/// in order, assembled by a thread of `scope` up to `ahead` batches before they are
/// needed, so that reading, augmenting and cropping overlap the training step. They are
/// the batches [`batch`] gives in line: each sample's draws depend only on the seed, the
/// epoch and its position. The thread stops after an error, or when the receiver goes.
pub fn prefetch<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    store: &'env SliceStore,
    order: &'env [SliceId],
    batch_size: usize,
    sampling: Sampling<'env>,
    ahead: usize,
) -> std::sync::mpsc::Receiver<Result<Batch, StoreError>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(ahead.max(1));
    let batch_size = batch_size.max(1);
    scope.spawn(move || {
        for (b, ids) in order.chunks(batch_size).enumerate() {
            let next = batch(store, ids, Some((sampling, b * batch_size)));
            let failed = next.is_err();
            if tx.send(next).is_err() || failed {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_windows_of_the_slice_and_find_the_foreground() {
        let s = 32;
        // channel 0 holds each pixel's index, channel 1 its negative; one tumor pixel
        let image: Vec<f32> = (0..2 * s * s)
            .map(|i| {
                if i < s * s {
                    i as f32
                } else {
                    -((i - s * s) as f32)
                }
            })
            .collect();
        let mut labels = vec![0u8; s * s];
        labels[3 * s + 29] = 2;
        let sample = || Sample {
            image: image.clone(),
            labels: labels.clone(),
            channels: 2,
            size: s,
        };
        let always = Patch {
            size: 16,
            foreground: 1.0,
        };
        let mut origins = std::collections::BTreeSet::new();
        for position in 0..40 {
            let p = always.crop(sample(), &Draws::new(1, 0, position));
            assert_eq!((p.size, p.image.len(), p.labels.len()), (16, 2 * 256, 256));
            // a window: rows of consecutive indices, `s` apart, the same in both channels
            let (r0, c0) = ((p.image[0] as usize) / s, (p.image[0] as usize) % s);
            for r in 0..16 {
                for c in 0..16 {
                    let i = (r0 + r) * s + c0 + c;
                    assert_eq!(p.image[r * 16 + c], i as f32);
                    assert_eq!(p.image[256 + r * 16 + c], -(i as f32));
                    assert_eq!(p.labels[r * 16 + c], labels[i]);
                }
            }
            // centred on the tumor pixel, clamped into the slice
            assert_eq!((r0, c0), (0, 16));
            assert_eq!(p.labels.iter().filter(|&&l| l == 2).count(), 1);
            let q = Patch {
                size: 16,
                foreground: 0.0,
            }
            .crop(sample(), &Draws::new(1, 0, position));
            origins.insert(q.image[0] as usize);
            // the same draw, the same window
            assert_eq!(
                q.image,
                Patch {
                    size: 16,
                    foreground: 0.0
                }
                .crop(sample(), &Draws::new(1, 0, position))
                .image
            );
        }
        assert!(
            origins.len() > 20,
            "random windows spread over the slice: {origins:?}"
        );
    }

    #[test]
    fn epoch_orders_are_permutations_seeded_by_epoch() {
        let slices: Vec<SliceId> = (0..50).map(|i| (i / 10, i % 10)).collect();
        for shuffle in [Shuffle::Full, Shuffle::Buffer(8)] {
            let a = epoch_order(&slices, shuffle, 1, 0);
            let mut sorted = a.clone();
            sorted.sort();
            assert_eq!(sorted, slices);
            assert_eq!(a, epoch_order(&slices, shuffle, 1, 0));
            assert_ne!(a, epoch_order(&slices, shuffle, 1, 1));
            assert_ne!(a, slices);
        }
        // a small buffer keeps slices near their store position
        let b = epoch_order(&slices, Shuffle::Buffer(4), 1, 0);
        assert!(b.iter().take(4).all(|s| s.0 == 0));
    }
}
