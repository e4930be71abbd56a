//! Is a downloaded file what it claims to be? A `.nii.gz` must be a single-file NIfTI-1
//! whose gzip stream is complete (every member's CRC and length checked) and holds at
//! least the voxel bytes its header promises; `kits.json` must be a JSON array of
//! records with a `case_id`. Checked by streaming, in constant memory: the real imaging
//! volumes inflate to gigabytes.

use std::io::{BufReader, Read};
use std::path::Path;

use crate::data::nifti::{Datatype, NiftiError, read_header, squeeze3};

/// What a valid volume's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NiftiCheck {
    /// (slices, rows, columns), as the load stage reads them.
    pub shape: [usize; 3],
    pub datatype: Datatype,
}

/// Checks that `path` is a complete, readable single-file NIfTI-1 volume (gzipped or
/// not) of three dimensions; the error says what is wrong.
pub fn check_nifti(path: &Path) -> Result<NiftiCheck, String> {
    let header = read_header(path).map_err(|e| match e {
        // The path is the caller's to say: these name a temporary file.
        NiftiError::NotNifti { why, .. } => format!("not a NIfTI-1 file: {why}"),
        NiftiError::Truncated { why, .. } => format!("truncated: {why}"),
        NiftiError::Nifti2 { .. } => "a NIfTI-2 file".into(),
        NiftiError::Datatype { code, .. } => format!("unsupported NIfTI datatype {code}"),
        NiftiError::Invalid { why, .. } => why,
        NiftiError::Io { source, .. } => format!("cannot read: {source}"),
        #[allow(unreachable_patterns)]
        other => other.to_string(),
    })?;
    if &header.header.magic != b"n+1\0" {
        return Err("a header-only NIfTI (`ni1`), not a single `.nii` file".into());
    }
    let shape = squeeze3(&header.shape)
        .ok_or_else(|| format!("not a 3-D volume: shape {:?}", header.shape))?;
    let voxel_bytes = header.shape.iter().product::<usize>() as u64 * header.datatype.size() as u64;
    let needed = header.header.vox_offset.max(0.0) as u64 + voxel_bytes;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 2];
    reader
        .read_exact(&mut magic)
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut rest = std::io::Cursor::new(magic).chain(reader);
    let length = if magic == [0x1f, 0x8b] {
        std::io::copy(
            &mut flate2::read::MultiGzDecoder::new(rest),
            &mut std::io::sink(),
        )
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "truncated: the gzip stream ends early".to_string()
            } else {
                format!("corrupt gzip data: {e}")
            }
        })?
    } else {
        std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| format!("cannot read: {e}"))?
    };
    if length < needed {
        return Err(format!(
            "truncated: {length} bytes of header and voxels, the header's shape {:?} of {} needs {needed}",
            header.shape,
            header.datatype.name()
        ));
    }
    Ok(NiftiCheck {
        shape,
        datatype: header.datatype,
    })
}

/// The case ids `kits.json` lists; an error unless it is an array of records that each
/// have a string `case_id`.
pub fn check_kits_json(path: &Path) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Record {
        case_id: String,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let records: Vec<Record> =
        serde_json::from_str(&text).map_err(|e| format!("not a KiTS19 `kits.json`: {e}"))?;
    Ok(records.into_iter().map(|r| r.case_id).collect())
}
