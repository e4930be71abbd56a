//! Reading NIfTI-1 files: single files and `.hdr`/`.img` pairs, gzip recognised by its
//! magic bytes and inflated whole-buffer with libdeflate (a streaming decoder for
//! multi-member gzip), into reusable buffers.

use std::io::Read;
use std::path::{Path, PathBuf};

use nifti::NiftiHeader;

use super::header::parse_header;
use super::{Datatype, Header, NiftiError, Volume};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Memory for reading volumes one after another (a worker's cases): warm buffers skip
/// the page faults and zeroing of fresh allocations, a tenth of the time of reading a
/// KiTS-sized case. Give a volume back with [`Volume::recycle`].
#[derive(Default)]
pub struct ReadBuffers {
    file: Vec<u8>,
    spare: Vec<Vec<u8>>,
}

impl ReadBuffers {
    /// A buffer of `len` bytes holding whatever it held before (the caller overwrites
    /// them all): a reused buffer is neither cleared nor zeroed.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = (0..self.spare.len()).max_by_key(|&i| self.spare[i].capacity());
        let mut v = best.map(|i| self.spare.swap_remove(i)).unwrap_or_default();
        v.resize(len, 0);
        v
    }
}

impl Volume {
    /// Reads a `.nii`, `.nii.gz` or `.hdr`/`.img` pair (either possibly gzipped).
    pub fn read(path: &Path) -> Result<Volume, NiftiError> {
        Volume::read_with(path, &mut ReadBuffers::default())
    }

    /// [`Volume::read`] into reused memory.
    pub fn read_with(path: &Path, bufs: &mut ReadBuffers) -> Result<Volume, NiftiError> {
        Volume::read_checked(path, bufs, None)
    }

    /// [`Volume::read_with`], and the file's bytes as read must have the BLAKE3 digest
    /// `blake3` (hex), when given: a file changed since it was recorded is an error.
    pub fn read_checked(
        path: &Path,
        bufs: &mut ReadBuffers,
        blake3: Option<&str>,
    ) -> Result<Volume, NiftiError> {
        let bytes = read_maybe_gz(path, None, blake3, bufs)?;
        let Header {
            header,
            datatype,
            shape,
        } = parse_header(path, &bytes)?;
        let nbytes = shape.iter().product::<usize>() * datatype.size();
        let big_endian = header.endianness == nifti::Endianness::Big;
        let (data, offset, data_path) = match &header.magic {
            b"n+1\0" => {
                let offset = header.vox_offset.max(0.0) as usize;
                if offset > bytes.len() {
                    return Err(NiftiError::Invalid {
                        path: path.into(),
                        why: format!(
                            "vox_offset {} is past the end of the data ({} bytes)",
                            header.vox_offset,
                            bytes.len()
                        ),
                    });
                }
                (bytes, offset, path.to_path_buf())
            }
            _ => {
                let img = pair_image(path).ok_or_else(|| NiftiError::Invalid {
                    path: path.into(),
                    why: "a header-only (`ni1`) file whose name does not end in `.hdr`".into(),
                })?;
                if !img.exists() {
                    return Err(NiftiError::Invalid {
                        path: path.into(),
                        why: format!(
                            "the image file `{}` of this header is missing",
                            img.display()
                        ),
                    });
                }
                let offset = header.vox_offset.max(0.0) as usize;
                let data = read_maybe_gz(&img, Some(offset + nbytes), None, bufs)?;
                bufs.spare.push(bytes); // the header file's
                (data, offset, img)
            }
        };
        if data.len() < offset + nbytes {
            return Err(NiftiError::Truncated {
                path: data_path,
                why: format!(
                    "{} bytes of voxel data after offset {offset}, the header's shape {shape:?} of {} needs {nbytes}",
                    data.len().saturating_sub(offset),
                    datatype.name()
                ),
            });
        }
        let raw = data;
        Ok(Volume {
            start: offset,
            path: path.into(),
            header,
            datatype,
            shape,
            big_endian,
            raw,
        })
    }

    /// Hands the volume's memory back for the next read.
    pub fn recycle(self, bufs: &mut ReadBuffers) {
        bufs.spare.push(self.raw);
    }
}

/// Reads only the header of a volume (inflating just its first bytes).
pub fn read_header(path: &Path) -> Result<Header, NiftiError> {
    let file = std::fs::File::open(path).map_err(|source| NiftiError::Io {
        path: path.into(),
        source,
    })?;
    let mut magic = [0u8; 2];
    let mut prefix = Vec::with_capacity(348);
    let mut reader = std::io::BufReader::new(file);
    let io = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let n = (&mut reader).take(2).read(&mut magic).map_err(io)?;
    let chained = std::io::Cursor::new(magic[..n].to_vec()).chain(reader);
    if magic == GZIP_MAGIC {
        flate2::read::MultiGzDecoder::new(chained)
            .take(348)
            .read_to_end(&mut prefix)
    } else {
        chained.take(348).read_to_end(&mut prefix)
    }
    .map_err(|e| NiftiError::NotNifti {
        path: path.into(),
        why: format!("unreadable data: {e}"),
    })?;
    parse_header(path, &prefix)
}

/// `x.hdr` -> `x.img`, `x.hdr.gz` -> `x.img.gz`.
fn pair_image(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let img = if let Some(stem) = name.strip_suffix(".hdr") {
        format!("{stem}.img")
    } else {
        format!("{}.img.gz", name.strip_suffix(".hdr.gz")?)
    };
    Some(path.with_file_name(img))
}

/// Reads a file, inflating it if it starts with the gzip magic bytes. `size` is how many
/// bytes are needed, when known; otherwise the NIfTI header at the start tells. With
/// `blake3`, the bytes read must have that digest.
fn read_maybe_gz(
    path: &Path,
    size: Option<usize>,
    blake3: Option<&str>,
    bufs: &mut ReadBuffers,
) -> Result<Vec<u8>, NiftiError> {
    let io = |source| NiftiError::Io {
        path: path.into(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut compressed = std::mem::take(&mut bufs.file);
    compressed.clear();
    file.read_to_end(&mut compressed).map_err(io)?;
    if let Some(recorded) = blake3 {
        let actual = blake3::Hasher::new()
            .update_rayon(&compressed)
            .finalize()
            .to_hex()
            .to_string();
        if actual != recorded {
            bufs.file = compressed;
            return Err(NiftiError::Changed {
                path: path.into(),
                actual: actual[..12].into(),
                recorded: recorded[..recorded.len().min(12)].into(),
            });
        }
    }
    if !compressed.starts_with(&GZIP_MAGIC) {
        return Ok(compressed);
    }
    let out = inflate(path, size, &compressed, bufs);
    bufs.file = compressed;
    out
}

/// Inflates gzip `bytes` (one member or several) of the file at `path`.
fn inflate(
    path: &Path,
    size: Option<usize>,
    bytes: &[u8],
    bufs: &mut ReadBuffers,
) -> Result<Vec<u8>, NiftiError> {
    let needed = size.or_else(|| {
        let mut prefix = Vec::with_capacity(348);
        flate2::read::GzDecoder::new(bytes)
            .take(348)
            .read_to_end(&mut prefix)
            .ok()?;
        needed_bytes(&prefix)
    });
    // Fast path: one whole-buffer inflate into exactly the bytes needed. libdeflate
    // inflates the first gzip member only; a short result (more members, or damage) or
    // a first member larger than needed takes the streaming path.
    if let Some(needed) = needed {
        let mut out = bufs.take(needed);
        if let Ok(n) = libdeflater::Decompressor::new().gzip_decompress(bytes, &mut out)
            && n == needed
        {
            return Ok(out);
        }
        bufs.spare.push(out);
    }
    let mut out = Vec::with_capacity(needed.unwrap_or(bytes.len() * 4));
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                NiftiError::Truncated {
                    path: path.into(),
                    why: format!("the gzip stream ends early ({} bytes inflated)", out.len()),
                }
            } else {
                NiftiError::NotNifti {
                    path: path.into(),
                    why: format!("corrupt gzip data: {e}"),
                }
            }
        })?;
    Ok(out)
}

/// Header plus voxel bytes of a single-file NIfTI-1, from its first 348 bytes.
fn needed_bytes(prefix: &[u8]) -> Option<usize> {
    let h = NiftiHeader::from_reader(prefix).ok()?;
    if &h.magic != b"n+1\0" {
        return None;
    }
    let ndim = usize::from(h.dim[0]).clamp(1, 7);
    let voxels: usize = h.dim[1..=ndim].iter().map(|&d| usize::from(d)).product();
    Some(h.vox_offset.max(0.0) as usize + voxels * Datatype::from_code(h.datatype)?.size())
}
