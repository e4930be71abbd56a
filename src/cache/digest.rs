//! Content digests (BLAKE3) of files and directory trees, and the listing of a tree
//! (each entry's path, type, size and digest) that a cache manifest keeps, so an entry
//! can be checked by its sizes without reading it and a failed check names the file.

use std::io;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use walkdir::WalkDir;

/// The digest of a tree and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// Lower-case hex BLAKE3 over every entry's relative path, type, size and content.
    pub hex: String,
    pub files: u64,
    pub bytes: u64,
    /// Every entry, in the order hashed (byte order of `/`-joined relative paths).
    pub listing: Vec<Listed>,
}

/// One entry of a tree, by its `/`-joined path relative to the tree's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Listed {
    File {
        path: String,
        size: u64,
        blake3: String,
    },
    Dir {
        path: String,
    },
    Link {
        path: String,
        target: String,
    },
}

impl Listed {
    pub fn path(&self) -> &str {
        match self {
            Listed::File { path, .. } | Listed::Dir { path } | Listed::Link { path, .. } => path,
        }
    }

    /// The line this entry adds to a tree digest.
    fn line(&self) -> String {
        match self {
            Listed::File { path, size, blake3 } => format!("f {path} {size} {blake3}\n"),
            Listed::Dir { path } => format!("d {path}\n"),
            Listed::Link { path, target } => format!("l {path} {target}\n"),
        }
    }
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
        let hex = file_digest(root)?;
        return Ok(TreeDigest {
            listing: vec![Listed::File {
                path: String::new(),
                size: meta.len(),
                blake3: hex.clone(),
            }],
            hex,
            files: 1,
            bytes: meta.len(),
        });
    }
    let entries = walk(root)?;
    let listing: Vec<Listed> = entries
        .par_iter()
        .map(|(rel, entry)| {
            let ft = entry.file_type();
            let path = rel.clone();
            Ok(if ft.is_dir() {
                Listed::Dir { path }
            } else if ft.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                Listed::Link {
                    path,
                    target: target.display().to_string(),
                }
            } else {
                Listed::File {
                    path,
                    size: entry.metadata().map_err(io::Error::other)?.len(),
                    blake3: file_digest(entry.path())?,
                }
            })
        })
        .collect::<io::Result<_>>()?;
    Ok(digest_of_listing(listing))
}

/// Every entry below `root` but `volatile/`, with its `/`-joined relative path, in byte
/// order of names: the order a tree digest hashes them in.
pub fn walk(root: &Path) -> io::Result<Vec<(String, walkdir::DirEntry)>> {
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
        if is_volatile(&rel) {
            continue;
        }
        entries.push((rel, entry));
    }
    Ok(entries)
}

/// The tree digest of a listing (in walk order).
pub fn digest_of_listing(listing: Vec<Listed>) -> TreeDigest {
    let mut h = blake3::Hasher::new();
    let (mut files, mut bytes) = (0, 0);
    for l in &listing {
        if let Listed::File { size, .. } = l {
            files += 1;
            bytes += size;
        }
        h.update(l.line().as_bytes());
    }
    TreeDigest {
        hex: h.finalize().to_hex().to_string(),
        files,
        bytes,
        listing,
    }
}

/// Whether `rel` (a `/`-joined relative path) lies in the `volatile/` folder.
pub fn is_volatile(rel: &str) -> bool {
    rel == VOLATILE || rel.starts_with(&format!("{VOLATILE}/"))
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
