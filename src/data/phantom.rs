//! Synthetic abdominal CT phantoms in the KiTS19 layout, written as real NIfTI files.
//!
//! Each case is an arterial-phase-like volume in Hounsfield units: air around a body
//! ellipse with a subcutaneous fat layer, a muscle wall, soft-tissue viscera, a liver, a
//! spine with a spinal canal, the aorta, and two kidneys with enhancing cortex and a
//! darker medulla (10 to 14 cm long); every case carries a heterogeneous, enhancing tumor
//! of 2 to 10 cm in or on one kidney (endophytic or exophytic), as every KiTS19 case
//! has one. Sizes, positions, spacing and contrast vary per case; noise is Gaussian.
//! Labels follow KiTS19: 0 background, 1 kidney, 2 tumor. The kidneys span roughly a
//! third of the slices, as in real data (36% of slices show kidney or tumor).
//!
//! Layout and conventions match KiTS19: `case_XXXXX/imaging.nii.gz` (float32 HU) and
//! `segmentation.nii.gz` (uint8), NIfTI dims (slices, rows, columns) with the slice axis
//! first, pixdim (slice thickness, pixel, pixel), the KiTS19 sform, and a `kits.json`.
//! Case `i` draws from its own generator seeded by (seed, i): the same seed gives the
//! same bytes, whatever the thread count.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;
use rayon::prelude::*;

use super::nifti::{Datatype, NewVolume, NiftiError, write_volume};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct PhantomSpec {
    pub cases: usize,
    /// (slices, rows, columns).
    pub shape: [usize; 3],
    pub seed: u64,
}

/// A generated case.
#[derive(Debug, Clone)]
pub struct PhantomCase {
    pub id: String,
    /// (slice thickness, row, column) in mm.
    pub spacing: [f32; 3],
    pub has_tumor: bool,
}

struct Ellipsoid {
    c: [f64; 3],
    r: [f64; 3],
}

impl Ellipsoid {
    /// Squared normalised radius of a point: < 1 inside.
    fn q(&self, p: [f64; 3]) -> f64 {
        (0..3)
            .map(|i| ((p[i] - self.c[i]) / self.r[i]).powi(2))
            .sum()
    }
}

struct Anatomy {
    spacing: [f64; 3],
    body: (f64, f64),
    fat: f64,
    muscle: f64,
    spine_y: f64,
    aorta: (f64, f64),
    liver: Ellipsoid,
    kidneys: [Ellipsoid; 2],
    tumor: Option<(Ellipsoid, f64)>,
    hu: Hu,
}

struct Hu {
    fat: f64,
    muscle: f64,
    viscera: f64,
    liver: f64,
    cortex: f64,
    medulla: f64,
    aorta: f64,
    bone: f64,
    tumor: f64,
    noise: f64,
}

/// The generator's version: part of a synthetic load stage's key, so that phantoms made
/// by another version are never served from the cache.
pub const VERSION: u32 = 1;

fn case_rng(seed: u64, case: usize) -> Pcg64 {
    let mut h = blake3::Hasher::new_derive_key("kpipe phantom case v1");
    h.update(&seed.to_le_bytes());
    h.update(&(case as u64).to_le_bytes());
    Pcg64::from_seed(*h.finalize().as_bytes())
}

fn anatomy(rng: &mut Pcg64, [d, h, w]: [usize; 3]) -> Anatomy {
    let fov = rng.random_range(340.0..420.0);
    let pixel = fov / w.max(h) as f64;
    let z_extent = rng.random_range(260.0..340.0);
    let st = z_extent / d as f64;
    let body = (
        rng.random_range(0.36..0.44) * fov,
        rng.random_range(0.26..0.32) * fov,
    );
    let (bx, by) = body;
    let zc = z_extent / 2.0 + rng.random_range(-0.08..0.08) * z_extent;
    // kidneys 10 to 14 cm long, 5 to 6.5 cm wide
    let kidney = |side: f64, rng: &mut Pcg64| Ellipsoid {
        c: [
            zc + rng.random_range(-15.0..15.0),
            by * rng.random_range(0.25..0.4),
            side * bx * rng.random_range(0.36..0.48),
        ],
        r: [
            rng.random_range(50.0..70.0),
            rng.random_range(25.0..32.0),
            rng.random_range(22.0..30.0),
        ],
    };
    let kidneys = [kidney(-1.0, rng), kidney(1.0, rng)];
    // Every case has a tumor, as every KiTS19 case does: 2 to 10 cm across
    // (log-uniform: median 4.5 cm, as KiTS19's), in one kidney, endophytic (centre inside)
    // or exophytic (centre beyond the surface, bulging out of it).
    let tumor = {
        let k = &kidneys[rng.random_range(0..2)];
        let dir: [f64; 3] = {
            let v = [
                rng.random_range(-1.0..1.0),
                rng.random_range(-1.0..1.0),
                rng.random_range(-1.0f64..1.0),
            ];
            let n = (v.iter().map(|x| x * x).sum::<f64>()).sqrt().max(1e-6);
            v.map(|x| x / n)
        };
        let depth = rng.random_range(0.2..1.3);
        let c = [0, 1, 2].map(|i| k.c[i] + dir[i] * k.r[i] * depth);
        let r = (rng.random_range(20.0f64.ln()..100.0f64.ln())).exp() / 2.0;
        Some((
            Ellipsoid {
                c,
                r: [
                    r * rng.random_range(0.8..1.2),
                    r,
                    r * rng.random_range(0.8..1.2),
                ],
            },
            rng.random_range(0.0..1.0),
        ))
    };
    Anatomy {
        spacing: [st, pixel, pixel],
        body,
        fat: rng.random_range(8.0..25.0),
        muscle: rng.random_range(8.0..15.0),
        spine_y: by * 0.62,
        aorta: (by * 0.25, bx * rng.random_range(-0.12..0.02)),
        liver: Ellipsoid {
            c: [zc + z_extent * 0.25, -by * 0.1, -bx * 0.45],
            r: [rng.random_range(60.0..90.0), by * 0.6, bx * 0.45],
        },
        kidneys,
        tumor,
        hu: Hu {
            fat: rng.random_range(-120.0..-80.0),
            muscle: rng.random_range(40.0..60.0),
            viscera: rng.random_range(20.0..50.0),
            liver: rng.random_range(60.0..90.0),
            cortex: rng.random_range(150.0..250.0),
            medulla: rng.random_range(110.0..150.0),
            aorta: rng.random_range(200.0..350.0),
            bone: rng.random_range(350.0..700.0),
            tumor: rng.random_range(40.0..100.0),
            noise: rng.random_range(8.0..20.0),
        },
    }
}

/// HU and label of one voxel (before noise); `p` is (z, y, x) in mm, y and x centred.
fn voxel(a: &Anatomy, p: [f64; 3], texture: f64) -> (f64, u8) {
    let [_, y, x] = p;
    let (bx, by) = a.body;
    let r_body = ((x / bx).powi(2) + (y / by).powi(2)).sqrt();
    if r_body >= 1.0 {
        return (-1000.0, 0);
    }
    // distance-like depth from the skin, in mm
    let depth = (1.0 - r_body) * bx.min(by);
    if depth < a.fat {
        return (a.hu.fat, 0);
    }
    if depth < a.fat + a.muscle {
        return (a.hu.muscle, 0);
    }
    if let Some((t, necrosis)) = &a.tumor {
        let q = t.q(p);
        if q < 1.0 {
            let core = if q < 0.25 * necrosis { -40.0 } else { 0.0 };
            return (a.hu.tumor + core + 25.0 * texture, 2);
        }
    }
    for k in &a.kidneys {
        let q = k.q(p);
        if q < 1.0 {
            let hu = if q > 0.55 {
                a.hu.cortex
            } else if q > 0.12 {
                a.hu.medulla
            } else {
                15.0
            };
            return (hu, 1);
        }
    }
    let sy = y - a.spine_y;
    let spine_r = (x * x + sy * sy).sqrt();
    if spine_r < 20.0 {
        return if spine_r < 7.0 {
            (20.0, 0)
        } else if spine_r > 17.0 {
            (a.hu.bone + 300.0, 0)
        } else {
            (a.hu.bone, 0)
        };
    }
    let (ay, ax) = a.aorta;
    if ((x - ax).powi(2) + (y - ay).powi(2)).sqrt() < 11.0 {
        return (a.hu.aorta, 0);
    }
    if a.liver.q(p) < 1.0 {
        return (a.hu.liver, 0);
    }
    (a.hu.viscera, 0)
}

/// Generates case `index`: imaging (HU, f32) and labels, both in NIfTI (Fortran) order.
pub fn generate_case(spec: &PhantomSpec, index: usize) -> (PhantomCase, Vec<f32>, Vec<u8>) {
    let mut rng = case_rng(spec.seed, index);
    let [d, h, w] = spec.shape;
    let a = anatomy(&mut rng, spec.shape);
    let noise = Normal::new(0.0, a.hu.noise).expect("finite sigma");
    let texture = Normal::new(0.0, 1.0).expect("unit normal");
    let mut img = vec![0.0f32; d * h * w];
    let mut seg = vec![0u8; d * h * w];
    let [st, px, _] = a.spacing;
    for l in 0..w {
        let x = (l as f64 + 0.5 - w as f64 / 2.0) * px;
        for j in 0..h {
            let y = (j as f64 + 0.5 - h as f64 / 2.0) * px;
            for k in 0..d {
                let z = (k as f64 + 0.5) * st;
                let (hu, label) = voxel(&a, [z, y, x], texture.sample(&mut rng));
                let i = k + d * (j + h * l);
                img[i] = (hu + noise.sample(&mut rng)).round() as f32;
                seg[i] = label;
            }
        }
    }
    let case = PhantomCase {
        id: format!("case_{index:05}"),
        spacing: a.spacing.map(|s| s as f32),
        has_tumor: seg.contains(&2),
    };
    (case, img, seg)
}

/// The KiTS19 sform: slice axis to -z, rows to -y, columns to -x.
pub fn kits_affine([st, py, px]: [f32; 3]) -> [[f32; 4]; 3] {
    [
        [0.0, 0.0, -px, 0.0],
        [0.0, -py, 0.0, 0.0],
        [-st, 0.0, 0.0, 0.0],
    ]
}

/// Writes `spec.cases` cases and a `kits.json` under `dir`, in parallel.
pub fn write_dataset(
    dir: &Path,
    spec: &PhantomSpec,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<PhantomCase>, NiftiError> {
    write_dataset_shaped(dir, spec, &|_| spec.shape, progress)
}

/// [`write_dataset`] with case `i` of shape `shape_of(i)` instead of `spec.shape`.
pub fn write_dataset_shaped(
    dir: &Path,
    spec: &PhantomSpec,
    shape_of: &(dyn Fn(usize) -> [usize; 3] + Sync),
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Vec<PhantomCase>, NiftiError> {
    let done = std::sync::atomic::AtomicUsize::new(0);
    let cases: Vec<PhantomCase> = (0..spec.cases)
        .into_par_iter()
        .map(|i| {
            let spec = &PhantomSpec {
                shape: shape_of(i),
                ..*spec
            };
            let (case, img, seg) = generate_case(spec, i);
            let case_dir = dir.join(&case.id);
            std::fs::create_dir_all(&case_dir).map_err(|source| NiftiError::Io {
                path: case_dir.clone(),
                source,
            })?;
            let img_bytes: Vec<u8> = img.iter().flat_map(|v| v.to_le_bytes()).collect();
            let affine = kits_affine(case.spacing);
            for (name, datatype, data, description) in [
                (
                    "imaging.nii.gz",
                    Datatype::F32,
                    &img_bytes[..],
                    "kpipe synthetic CT phantom",
                ),
                (
                    "segmentation.nii.gz",
                    Datatype::U8,
                    &seg[..],
                    "kpipe synthetic labels",
                ),
            ] {
                let volume = NewVolume {
                    shape: spec.shape,
                    datatype,
                    data,
                    spacing: case.spacing,
                    affine,
                    description,
                };
                write_volume(&case_dir.join(name), &volume)?;
            }
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            Ok(case)
        })
        .collect::<Result<_, NiftiError>>()?;
    let records: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "case_id": c.id,
                "voxel_spacing": {"x_spacing": c.spacing[2], "y_spacing": c.spacing[1], "z_spacing": c.spacing[0]},
                "synthetic": true,
            })
        })
        .collect();
    let path = dir.join("kits.json");
    let text = serde_json::to_string_pretty(&records).unwrap_or_default();
    crate::files::write_atomic(&path, text.as_bytes())
        .map_err(|source| NiftiError::Io { path, source })?;
    Ok(cases)
}

/// A slice count for case `case` like KiTS19's (29 to 1059 per case, 45,424 over 210
/// cases: 216 on average, a few hundred for the thin-slice scans): log-normal with
/// median 163 and sigma 0.75, clamped to 29..=1059. Seeded like the cases.
pub fn kits19_slices(seed: u64, case: usize) -> usize {
    let mut h = blake3::Hasher::new_derive_key("kpipe phantom slice count v1");
    h.update(&seed.to_le_bytes());
    h.update(&(case as u64).to_le_bytes());
    let mut rng = Pcg64::from_seed(*h.finalize().as_bytes());
    let z: f64 = Normal::new(0.0, 1.0).expect("unit normal").sample(&mut rng);
    ((163.0 * (0.75 * z).exp()).round() as usize).clamp(29, 1059)
}
