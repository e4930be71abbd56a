//! The training loader: which slices make each batch of an epoch, and the batches
//! themselves (gathered from the memory-mapped slice store, augmented).

use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_pcg::Pcg64;

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

/// A batch as flat arrays: images `[n, channels, size, size]`, labels `[n, size, size]`.
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub len: usize,
}

/// Gathers (and, with `augment`, augments) the slices `ids`; `first` is the position of
/// `ids[0]` in the epoch, so every sample's augmentation is seeded by its position.
pub fn batch(
    store: &SliceStore,
    ids: &[SliceId],
    augment: Option<(&Augment, u64, usize, usize, &[SliceId])>,
) -> Result<Batch, StoreError> {
    let (c, s) = (store.meta.channels, store.meta.size);
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
            size: s,
        })
    };
    for (k, &id) in ids.iter().enumerate() {
        let mut sample = read(id)?;
        if let Some((aug, seed, epoch, first, pool)) = augment {
            aug.apply(&mut sample, &Draws::new(seed, epoch, first + k), |rng| {
                let other = pool[rng.random_range(0..pool.len())];
                read(other).ok().map(|o| o.image)
            });
        }
        images.extend_from_slice(&sample.image);
        labels.extend_from_slice(&sample.labels);
    }
    Ok(Batch {
        images,
        labels,
        len: ids.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
