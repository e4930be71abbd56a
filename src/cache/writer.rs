//! Writing an entry: in `tmp/`, hashed, synced and made read-only, then renamed into
//! place with its manifest; a writer dropped unfinished removes what it wrote.

use std::path::{Path, PathBuf};

use super::{Cache, CacheError, Entry, Manifest, io, tree_digest};
use crate::files::write_synced;

/// An entry being written. Dropped without [`EntryWriter::commit`], it removes itself.
pub struct EntryWriter {
    pub(super) cache: Cache,
    pub(super) key: String,
    pub(super) tmp: PathBuf,
    pub(super) done: bool,
}

impl EntryWriter {
    /// The directory that becomes the artifact.
    pub fn out(&self) -> PathBuf {
        self.tmp.join("out")
    }

    /// A scratch directory removed with the writer.
    pub fn scratch(&self) -> PathBuf {
        self.tmp.join("scratch")
    }

    /// Hashes and syncs `out/`, writes the manifest, and moves the entry into place.
    /// `manifest.output`, `files` and `bytes` are filled in here.
    pub fn commit(mut self, mut manifest: Manifest) -> Result<Entry, CacheError> {
        let out = self.out();
        let scratch = self.scratch();
        make_writable(&scratch);
        std::fs::remove_dir_all(&scratch).map_err(io("remove", &scratch))?;
        let digest = tree_digest(&out).map_err(io("hash", &out))?;
        sync_tree(&out).map_err(io("sync", &out))?;
        manifest.output = digest.hex;
        manifest.files = digest.files;
        manifest.bytes = digest.bytes;
        manifest.listing = digest.listing;
        manifest.key = self.key.clone();
        let mpath = self.tmp.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| io("serialise", &mpath)(std::io::Error::other(e)))?;
        write_synced(&mpath, text.as_bytes()).map_err(io("write", &mpath))?;
        set_readonly(&out);
        let dest = self.cache.entry_dir(&self.key);
        match std::fs::rename(&self.tmp, &dest) {
            Ok(()) => {}
            // Another run committed the same key first: same key, same content.
            Err(_) if dest.join("manifest.json").is_file() => {}
            Err(e) => return Err(io("move into place", &dest)(e)),
        }
        if let Ok(d) = std::fs::File::open(dest.parent().unwrap_or(&dest)) {
            let _ = d.sync_all();
        }
        self.done = true;
        Ok(Entry {
            dir: dest,
            manifest,
        })
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if self.tmp.exists() {
            make_writable(&self.tmp);
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        let _ = self.done;
    }
}

fn sync_tree(root: &Path) -> std::io::Result<()> {
    for e in walkdir::WalkDir::new(root) {
        let e = e.map_err(std::io::Error::other)?;
        if e.file_type().is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    Ok(())
}

fn set_mode(root: &Path, readonly: bool) {
    for e in walkdir::WalkDir::new(root).into_iter().flatten() {
        if e.file_type().is_symlink() {
            continue;
        }
        if let Ok(meta) = e.metadata() {
            let mut perm = meta.permissions();
            if e.file_type().is_dir() && readonly {
                continue; // directories stay writable so gc can remove entries
            }
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(readonly);
            let _ = std::fs::set_permissions(e.path(), perm);
        }
    }
}

/// Cached files are read-only, so a stage cannot edit an input in place by mistake.
pub(super) fn set_readonly(root: &Path) {
    set_mode(root, true);
}

pub(super) fn make_writable(root: &Path) {
    set_mode(root, false);
}
