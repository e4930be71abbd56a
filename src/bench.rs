//! `kpipe bench`: throughput measurements, printed as medians over repeats. Speed is
//! measured here, never asserted in tests. The Python sides of the comparisons live in
//! `scripts/`.

use std::path::Path;
use std::time::Instant;

use crate::data::nifti::{NiftiError, ReadBuffers, Volume};
use crate::data::resample::Filter;
use crate::data::slices::{NonSquare, Normalization, prepare_case};

/// Median of a set of timings.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The slice stage's per-case work, without writing: read both volumes, window and
/// normalise, transpose to slices, resize images (area) and labels (nearest) to `size`.
/// Returns the number of slices. Memory is reused from `bufs`, as a slice stage worker
/// reuses it from one case to the next.
pub fn slice_case(
    imaging: &Path,
    segmentation: &Path,
    size: usize,
    bufs: &mut ReadBuffers,
) -> Result<usize, NiftiError> {
    let img = Volume::read_with(imaging, bufs)?;
    let seg = Volume::read_with(segmentation, bufs)?;
    let norm = Normalization::Unit {
        lo: -79.0,
        hi: 304.0,
    };
    let p = prepare_case(&img, Some(&seg), norm, size, Filter::Area, NonSquare::Pad)?;
    img.recycle(bufs);
    seg.recycle(bufs);
    Ok(p.depth)
}

/// Runs [`slice_case`] `repeat` times, as one worker's consecutive cases; (median
/// seconds, seconds of the first run, in fresh memory, slices).
pub fn bench_slicing(
    imaging: &Path,
    segmentation: &Path,
    size: usize,
    repeat: usize,
) -> Result<(f64, f64, usize), NiftiError> {
    let mut times = Vec::new();
    let mut slices = 0;
    let mut bufs = ReadBuffers::default();
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        slices = slice_case(imaging, segmentation, size, &mut bufs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let first = times[0];
    Ok((median(times), first, slices))
}

/// What a U-Net throughput measurement runs.
#[derive(Debug, Clone)]
pub struct NetBench {
    pub train: bool,
    pub size: usize,
    pub base: usize,
    pub batch_norm: bool,
    pub batch: usize,
    /// Timed steps, after `warmup` untimed ones (which also take autotuning on a GPU).
    pub steps: usize,
    pub warmup: usize,
    pub device: burn::tensor::Device,
}

/// Training or inference throughput of a U-Net (two 3x3 convs + BN + ReLU per level, the
/// PyTorch reference's network; without BN with `batch_norm` off) on random data: median slices per second over the timed
/// steps. Each step ends by reading its result back (the loss, or the labels), so the
/// device has finished the step's work before its timer stops.
pub fn bench_unet(b: &NetBench) -> f64 {
    use burn::optim::GradientsParams;
    use burn::tensor::{Distribution, Tensor};

    use crate::models::{ModelConfig, ModelKind};
    use crate::train::loss::{Loss, LossKind};

    let config = ModelConfig {
        kind: ModelKind::Unet,
        in_channels: 1,
        base: b.base,
        batch_norm: b.batch_norm,
        up_kernel: 2,
        freeze_encoder: false,
    };
    let loss = Loss {
        kind: LossKind::CrossEntropy,
        weights: [1.0, 1.0],
        class_weights: None,
    };
    let (n, size) = (b.batch, b.size);
    let labels: Vec<u8> = (0..n * size * size).map(|i| (i % 3) as u8).collect();
    let mut times = Vec::new();
    let timed = |i: usize, t: Instant, times: &mut Vec<f64>| {
        if i >= b.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    };
    if b.train {
        let device = b.device.clone().autodiff();
        device.seed(1);
        let mut model = config.init(&device);
        let mut optim = crate::train::adam([0.9, 0.999], 1e-7, 0.0).init();
        for i in 0..b.warmup + b.steps {
            let x = Tensor::<4>::random([n, 1, size, size], Distribution::Default, &device);
            let t = Instant::now();
            let l = loss.forward(model.forward(x), &labels);
            let grads = GradientsParams::from_grads(l.clone().backward(), &model);
            model = optim.step(1e-4, model, grads);
            let _ = l.into_scalar::<f32>();
            let _ = device.sync();
            timed(i, t, &mut times);
        }
    } else {
        let device = b.device.clone();
        device.seed(1);
        let model = config.init(&device);
        for i in 0..b.warmup + b.steps {
            let x = Tensor::<4>::random([n, 1, size, size], Distribution::Default, &device);
            let t = Instant::now();
            let _ = crate::train::predict_labels(model.forward(x));
            timed(i, t, &mut times);
        }
    }
    n as f64 / median(times)
}

/// What the training loader alone delivers: every slice of `store` for `epochs` shuffled
/// epochs, in batches of `batch`, drawn with `augment`, through [`prefetch`]'s thread
/// as training reads them (two batches ahead), nothing consuming them. Returns the
/// slices per second of each epoch and the slices per epoch.
///
/// [`prefetch`]: crate::data::loader::prefetch
pub fn bench_loader(
    store: &crate::data::slices::SliceStore,
    batch: usize,
    augment: &crate::data::augment::Augment,
    epochs: usize,
) -> Result<(Vec<f64>, usize), crate::data::slices::StoreError> {
    use crate::data::loader::{Sampling, Shuffle, epoch_order, prefetch};

    let all: Vec<_> = (0..store.meta.cases.len())
        .flat_map(|c| (0..store.meta.cases[c].rows).map(move |r| (c, r)))
        .collect();
    let mut rates = Vec::new();
    for epoch in 0..epochs {
        let order = epoch_order(&all, Shuffle::Full, 1, epoch);
        let sampling = Sampling {
            augment,
            patch: None,
            seed: 1,
            epoch,
            pool: &all,
        };
        let t = Instant::now();
        std::thread::scope(|scope| {
            for b in prefetch(scope, store, &order, batch, sampling, 2) {
                std::hint::black_box(b?);
            }
            Ok::<_, crate::data::slices::StoreError>(())
        })?;
        rates.push(all.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok((rates, all.len()))
}
