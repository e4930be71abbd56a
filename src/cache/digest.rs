//! Content digests (BLAKE3) of files and directory trees.

use std::io;
use std::path::Path;

use rayon::prelude::*;
use walkdir::WalkDir;

/// The digest of a tree and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// Lower-case hex BLAKE3 over every entry's relative path, type, size and content.
    pub hex: String,
    pub files: u64,
    pub bytes: u64,
}

/// An artifact's `volatile/` folder holds measurements no rerun reproduces (wall times):
/// digests skip it, so it never makes two equal results differ.
pub const VOLATILE: &str = "volatile";

/// Digest of one file's content, in hex.
pub fn file_digest(path: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Digest of a file or a directory tree. Names are walked in byte order, so the digest
/// depends on content and names only, never on the order the OS lists them in.
/// Modification times and permissions do not count.
pub fn tree_digest(root: &Path) -> io::Result<TreeDigest> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.is_file() {
        return Ok(TreeDigest {
            hex: file_digest(root)?,
            files: 1,
            bytes: meta.len(),
        });
    }
    let mut entries = Vec::new();
    for entry in WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.map_err(|e| {
            e.into_io_error()
                .unwrap_or_else(|| io::Error::other("walk failed"))
        })?;
        let rel = entry.path().strip_prefix(root).map_err(io::Error::other)?;
        let rel = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if rel == VOLATILE || rel.starts_with(&format!("{VOLATILE}/")) {
            continue;
        }
        entries.push((rel, entry));
    }
    let records: Vec<io::Result<(String, u64)>> = entries
        .par_iter()
        .map(|(rel, entry)| {
            let ft = entry.file_type();
            if ft.is_dir() {
                Ok((format!("d {rel}\n"), 0))
            } else if ft.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                Ok((format!("l {rel} {}\n", target.display()), 0))
            } else {
                let len = entry.metadata().map_err(io::Error::other)?.len();
                Ok((
                    format!("f {rel} {len} {}\n", file_digest(entry.path())?),
                    len,
                ))
            }
        })
        .collect();
    let mut h = blake3::Hasher::new();
    let (mut files, mut bytes) = (0, 0);
    for r in records {
        let (line, len) = r?;
        if line.starts_with('f') {
            files += 1;
            bytes += len;
        }
        h.update(line.as_bytes());
    }
    Ok(TreeDigest {
        hex: h.finalize().to_hex().to_string(),
        files,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_digest_sees_content_and_names_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
        }
        std::fs::write(a.path().join("x"), "1").unwrap();
        std::fs::write(a.path().join("sub/y"), "22").unwrap();
        // written in the other order
        std::fs::write(b.path().join("sub/y"), "22").unwrap();
        std::fs::write(b.path().join("x"), "1").unwrap();
        let (da, db) = (
            tree_digest(a.path()).unwrap(),
            tree_digest(b.path()).unwrap(),
        );
        assert_eq!(da, db);
        assert_eq!((da.files, da.bytes), (2, 3));
        std::fs::write(b.path().join("x"), "2").unwrap();
        assert_ne!(tree_digest(b.path()).unwrap().hex, da.hex);
        std::fs::write(b.path().join("x"), "1").unwrap();
        std::fs::rename(b.path().join("sub/y"), b.path().join("sub/z")).unwrap();
        assert_ne!(tree_digest(b.path()).unwrap().hex, da.hex);
    }
}
