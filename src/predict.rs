//! `kpipe predict`: segment NIfTI volumes with a trained model. Each volume is sliced
//! with the model's own slice settings (window, normalisation, size, padding, context),
//! inferred in batches, resized back to its slices' original size (nearest), stacked,
//! and written as a uint8 label NIfTI with the input's shape and the input header's
//! geometry fields unchanged (qform, sform, their codes, pixdim, units): whatever a
//! reader makes of the input's geometry, it makes of the prediction's.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::data::nifti::{Datatype, Geometry, NewVolume, Volume, write_volume_with};
use crate::data::resample::resize_nearest;
use crate::data::slices::{NonSquare, prepare_case};
use crate::models::ModelFile;
use crate::models::Network;
use crate::train::{images_tensor_sized, predict_labels};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Nifti(#[from] crate::data::nifti::NiftiError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error("{0}")]
    Input(String),
}

/// (input volume, output file) pairs: files map to `OUT/<name>` (or `OUT` itself for one
/// file whose `-o` ends in `.nii` or `.nii.gz`); a KiTS19 folder maps each
/// `case_XXXXX/imaging.nii.gz` to `OUT/prediction_XXXXX.nii.gz`.
pub fn plan_outputs(
    inputs: &[PathBuf],
    out: &Path,
) -> Result<Vec<(PathBuf, PathBuf)>, PredictError> {
    let out_is_file =
        inputs.len() == 1 && inputs[0].is_file() && out.to_string_lossy().contains(".nii");
    let mut pairs = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut cases: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| {
                    PredictError::Input(format!("cannot read `{}`: {e}", input.display()))
                })?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("imaging.nii.gz").exists())
                .collect();
            cases.sort();
            for c in cases {
                let name = c
                    .file_name()
                    .map(|n| n.to_string_lossy().replace("case_", "prediction_"))
                    .unwrap_or_default();
                pairs.push((c.join("imaging.nii.gz"), out.join(format!("{name}.nii.gz"))));
            }
        } else if out_is_file {
            pairs.push((input.clone(), out.to_path_buf()));
        } else {
            let name = input
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            pairs.push((input.clone(), out.join(name)));
        }
    }
    if pairs.is_empty() {
        return Err(PredictError::Input("no volumes to segment".into()));
    }
    Ok(pairs)
}

/// Segments one volume and writes the labels.
pub fn predict_volume(
    net: &Network,
    file: &ModelFile,
    device: &Device,
    input: &Path,
    output: &Path,
    batch: usize,
) -> Result<(), PredictError> {
    let img = Volume::read(input)?;
    let volume = segment(net, file, device, &img, batch)?;
    write_labels(&img, &volume, output)
}

/// The labels of every axial slice of `img`, at its original size, in NIfTI (first
/// index fastest) order: each slice prepared as the model's slice store was, inferred
/// in batches of `batch`, argmaxed, and brought back to the slice's own size (nearest;
/// padding cropped, or the stretch undone). `kpipe predict` and the evaluate stage both
/// use it, so their labels are the same bytes.
pub fn segment(
    net: &Network,
    file: &ModelFile,
    device: &Device,
    img: &Volume,
    batch: usize,
) -> Result<Vec<u8>, PredictError> {
    let [d, h, w] = img.shape3()?;
    let m = &file.slices;
    let p = prepare_case(img, None, m.normalization, m.size, m.filter, m.non_square)?;
    let (s, c) = (m.size, m.channels);
    let plane = s * s;
    let mut pred = Vec::with_capacity(d * plane);
    for chunk in (0..d).collect::<Vec<_>>().chunks(batch.max(1)) {
        let mut x = Vec::with_capacity(chunk.len() * c * plane);
        for &k in chunk {
            for off in 0..c {
                let kk = (k + off).saturating_sub(m.context).min(d - 1);
                x.extend_from_slice(&p.images[kk * plane..(kk + 1) * plane]);
            }
        }
        pred.extend(predict_labels(net.forward(images_tensor_sized(
            &x,
            chunk.len(),
            c,
            s,
            device,
        )))?);
    }
    // back to each slice's own size, then into NIfTI (Fortran) order
    let mut volume = vec![0u8; d * h * w];
    for k in 0..d {
        let slice = &pred[k * plane..(k + 1) * plane];
        let full: Vec<u8> = if h == w || m.non_square == NonSquare::Stretch {
            resize_nearest(slice, (s, s), (h, w))
        } else {
            let n = h.max(w);
            let (top, left) = ((n - h) / 2, (n - w) / 2);
            let sq = resize_nearest(slice, (s, s), (n, n));
            (0..h)
                .flat_map(|j| sq[(j + top) * n + left..(j + top) * n + left + w].to_vec())
                .collect()
        };
        for j in 0..h {
            for l in 0..w {
                volume[k + d * (j + h * l)] = full[j * w + l];
            }
        }
    }
    Ok(volume)
}

/// Writes labels in NIfTI order as a uint8 volume with `img`'s shape and geometry.
pub fn write_labels(img: &Volume, volume: &[u8], output: &Path) -> Result<(), PredictError> {
    let [d, h, w] = img.shape3()?;
    let a = img.affine();
    let affine = [0, 1, 2].map(|r| a[r].map(|v| v as f32));
    let sp = img.spacing().map(|v| v as f32);
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            PredictError::Input(format!("cannot create `{}`: {e}", parent.display()))
        })?;
    }
    write_volume_with(
        output,
        &NewVolume {
            shape: [d, h, w],
            datatype: Datatype::U8,
            data: volume,
            spacing: sp,
            affine,
            description: "kpipe prediction",
        },
        &Geometry::of(&img.header),
    )?;
    Ok(())
}
