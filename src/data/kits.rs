//! The KiTS19 dataset layout: `case_XXXXX/imaging.nii.gz` and `segmentation.nii.gz`
//! under one folder, with an optional `kits.json` of per-case records.
//!
//! Facts of the real data this honours: volumes are (slices, rows, columns) with the
//! slice axis first (NIfTI dim[1]); 9 segmentations are uint16, the rest uint8; one case
//! is 512x796; spacing is `pixdim[1..=3]` = (slice thickness, row, column) and
//! `kits.json` repeats it as `voxel_spacing` (`z_spacing`, `y_spacing`, `x_spacing`).
//! Folders without a segmentation that `kits.json` does not list (the KiTS19 test set,
//! cases 210-299) are skipped with a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::nifti::{NiftiError, Volume, nibabel_pixdim, read_header, squeeze3};
use crate::cache::file_digest;

/// What to do with labels outside {0, 1, 2}.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LabelPolicy {
    /// Fail, naming the case, the values and their counts.
    #[default]
    Error,
    /// Count them as background (and warn).
    Background,
}

/// One case of a case table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    pub id: String,
    /// Paths relative to the table's data root ([`CaseTable::data_dir`]).
    pub imaging: PathBuf,
    pub segmentation: PathBuf,
    /// (slices, rows, columns).
    pub shape: [usize; 3],
    /// (slice thickness, row, column) in mm.
    pub spacing: [f64; 3],
    pub imaging_datatype: String,
    pub segmentation_datatype: String,
    /// Voxels labelled background, kidney, tumor (after the label policy).
    pub label_counts: [u64; 3],
    /// Voxels with labels outside {0, 1, 2} that the policy turned into background.
    pub relabelled: u64,
    pub imaging_digest: String,
    pub segmentation_digest: String,
}

impl CaseRecord {
    pub fn has_tumor(&self) -> bool {
        self.label_counts[2] > 0
    }
}

/// The load stage's output: `cases.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseTable {
    pub source: String,
    /// Where the cases' paths start: a folder inside the artifact holding the table
    /// (synthetic phantoms), or `None`: the KiTS19 folder the load stage read, outside
    /// the cache, which is not recorded (the executor hands it to the reading stage).
    pub root: Option<PathBuf>,
    pub cases: Vec<CaseRecord>,
    pub label_policy: LabelPolicy,
}

impl CaseTable {
    pub const FILE: &'static str = "cases.json";

    pub fn read(artifact: &Path) -> Result<CaseTable, KitsError> {
        let path = artifact.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| KitsError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| KitsError::Invalid {
            path,
            why: e.to_string(),
        })
    }

    /// The folder the cases' paths are relative to: `root` inside `artifact`, else the
    /// data folder outside the cache (`external`, the load stage's `path`).
    pub fn data_dir(&self, artifact: &Path, external: Option<&Path>) -> Result<PathBuf, KitsError> {
        match (&self.root, external) {
            (Some(root), _) => Ok(artifact.join(root)),
            (None, Some(dir)) => Ok(dir.to_path_buf()),
            (None, None) => Err(KitsError::Invalid {
                path: artifact.join(Self::FILE),
                why: "the cases live in a data folder outside the cache, and no folder was given"
                    .into(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KitsError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{case}: {why}")]
    Case { case: String, why: String },
    #[error("{case}: segmentation has labels outside {{0, 1, 2}}: {list}")]
    Labels { case: String, list: String },
    #[error("{case}: {source}")]
    Nifti { case: String, source: NiftiError },
    #[error("{} cases are broken:\n  {}", .0.len(), .0.iter().map(|e| e.to_string().replace('\n', "\n    ")).collect::<Vec<_>>().join("\n  "))]
    Many(Vec<KitsError>),
}

impl crate::hint::Hint for KitsError {
    fn hint(&self) -> Option<String> {
        match self {
            KitsError::Labels { .. } => {
                Some("`label-policy = \"background\"` counts them as background".into())
            }
            KitsError::Nifti { source, .. } => source.hint(),
            KitsError::Many(all) => {
                let mut hints: Vec<String> = all.iter().filter_map(|e| e.hint()).collect();
                hints.dedup();
                (!hints.is_empty()).then(|| hints.join("\n"))
            }
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct KitsJsonRecord {
    case_id: String,
    #[serde(default)]
    voxel_spacing: Option<VoxelSpacing>,
}

#[derive(Deserialize)]
struct VoxelSpacing {
    x_spacing: f64,
    y_spacing: f64,
    z_spacing: f64,
}

/// The `case_XXXXX` folders of a KiTS19 folder, sorted.
pub fn case_folders(root: &Path) -> std::io::Result<Vec<String>> {
    let mut folders: Vec<String> = std::fs::read_dir(root)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| {
            n.len() == 10 && n.starts_with("case_") && n[5..].bytes().all(|b| b.is_ascii_digit())
        })
        .collect();
    folders.sort();
    Ok(folders)
}

/// Scans a KiTS19 folder and checks every case. `warn` receives non-fatal findings.
/// Volume paths are under `root`; digests are read from the files.
pub fn scan(
    root: &Path,
    policy: LabelPolicy,
    warn: &(dyn Fn(String) + Sync),
) -> Result<Vec<CaseRecord>, KitsError> {
    scan_with(root, policy, warn, &file_digest)
}

/// [`scan`], with the volumes' content digests from `digest` (a stat cache).
pub fn scan_with(
    root: &Path,
    policy: LabelPolicy,
    warn: &(dyn Fn(String) + Sync),
    digest: &(dyn Fn(&Path) -> std::io::Result<String> + Sync),
) -> Result<Vec<CaseRecord>, KitsError> {
    let folders = case_folders(root).map_err(|source| KitsError::Io {
        path: root.into(),
        source,
    })?;
    let kits_json = root.join("kits.json");
    let records: BTreeMap<String, Option<[f64; 3]>> = if kits_json.exists() {
        let text = std::fs::read_to_string(&kits_json).map_err(|source| KitsError::Io {
            path: kits_json.clone(),
            source,
        })?;
        let recs: Vec<KitsJsonRecord> =
            serde_json::from_str(&text).map_err(|e| KitsError::Invalid {
                path: kits_json.clone(),
                why: e.to_string(),
            })?;
        recs.into_iter()
            .map(|r| {
                (
                    r.case_id,
                    r.voxel_spacing
                        .map(|v| [v.z_spacing, v.y_spacing, v.x_spacing]),
                )
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut errors = Vec::new();
    for id in records.keys() {
        if !folders.contains(id) {
            errors.push(KitsError::Case {
                case: id.clone(),
                why: format!(
                    "listed in `{}` but has no folder in `{}`",
                    kits_json.display(),
                    root.display()
                ),
            });
        }
    }
    let cases: Vec<&String> = folders
        .iter()
        .filter(|id| {
            let has_seg = root.join(id).join("segmentation.nii.gz").exists();
            if !has_seg && !records.is_empty() && !records.contains_key(*id) {
                warn(format!(
                    "{id}: no segmentation and not in kits.json (a KiTS19 test case): skipped"
                ));
                return false;
            }
            true
        })
        .collect();
    if cases.is_empty() && errors.is_empty() {
        return Err(KitsError::Invalid {
            path: root.into(),
            why: "no `case_XXXXX` folders with a segmentation".into(),
        });
    }
    let results: Vec<Result<CaseRecord, KitsError>> = cases
        .par_iter()
        .map(|id| {
            check_case(
                root,
                id,
                records.get(*id).copied().flatten(),
                policy,
                warn,
                digest,
            )
        })
        .collect();
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(c) => out.push(c),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(out),
        1 => Err(errors.remove(0)),
        _ => Err(KitsError::Many(errors)),
    }
}

fn check_case(
    root: &Path,
    id: &str,
    json_spacing: Option<[f64; 3]>,
    policy: LabelPolicy,
    warn: &(dyn Fn(String) + Sync),
    digest: &(dyn Fn(&Path) -> std::io::Result<String> + Sync),
) -> Result<CaseRecord, KitsError> {
    let dir = root.join(id);
    let case = || id.to_string();
    let (img_path, seg_path) = (dir.join("imaging.nii.gz"), dir.join("segmentation.nii.gz"));
    for p in [&img_path, &seg_path] {
        if !p.exists() {
            return Err(KitsError::Case {
                case: case(),
                why: format!("missing `{}`", p.display()),
            });
        }
    }
    let img = read_header(&img_path).map_err(|source| KitsError::Nifti {
        case: case(),
        source,
    })?;
    let seg = Volume::read(&seg_path).map_err(|source| KitsError::Nifti {
        case: case(),
        source,
    })?;
    let img_shape = squeeze3(&img.shape).ok_or_else(|| KitsError::Case {
        case: case(),
        why: format!("imaging is not 3-D: shape {:?}", img.shape),
    })?;
    let seg_shape = seg.shape3().map_err(|source| KitsError::Nifti {
        case: case(),
        source,
    })?;
    if img_shape != seg_shape {
        return Err(KitsError::Case {
            case: case(),
            why: format!("imaging shape {img_shape:?} and segmentation shape {seg_shape:?} differ"),
        });
    }
    let (labels, bad) = seg.to_labels().map_err(|source| KitsError::Nifti {
        case: case(),
        source,
    })?;
    let mut counts = [0u64; 3];
    let mut outside: Vec<(f64, u64)> = bad;
    let mut extra = BTreeMap::<u8, u64>::new();
    for &l in labels.iter() {
        match l {
            0..=2 => counts[usize::from(l)] += 1,
            other => *extra.entry(other).or_default() += 1,
        }
    }
    outside.extend(extra.into_iter().map(|(v, n)| (f64::from(v), n)));
    let relabelled: u64 = outside.iter().map(|(_, n)| n).sum();
    if relabelled > 0 {
        let list = outside
            .iter()
            .map(|(v, n)| format!("{v} ({n} voxels)"))
            .collect::<Vec<_>>()
            .join(", ");
        match policy {
            LabelPolicy::Error => {
                return Err(KitsError::Labels { case: case(), list });
            }
            LabelPolicy::Background => {
                counts[0] += relabelled;
                warn(format!(
                    "{id}: labels outside {{0, 1, 2}} counted as background: {list}"
                ));
            }
        }
    }
    let pixdim = nibabel_pixdim(&img.header);
    let spacing = [1, 2, 3].map(|i| f64::from(pixdim[i]));
    if let Some(js) = json_spacing
        && (0..3).any(|i| (js[i] - spacing[i]).abs() > 1e-4 * spacing[i].abs().max(1.0))
    {
        warn(format!(
            "{id}: kits.json voxel_spacing {js:?} differs from the header's pixdim {spacing:?}; using the header"
        ));
    }
    let digest = |p: &Path| {
        digest(p).map_err(|source| KitsError::Io {
            path: p.into(),
            source,
        })
    };
    Ok(CaseRecord {
        id: case(),
        imaging_digest: digest(&img_path)?,
        segmentation_digest: digest(&seg_path)?,
        imaging: img_path,
        segmentation: seg_path,
        shape: img_shape,
        spacing,
        imaging_datatype: img.datatype.name().into(),
        segmentation_datatype: seg.datatype.name().into(),
        label_counts: counts,
        relabelled,
    })
}
