//! The stat cache: content digests of files outside the cache (a KiTS19 folder), keyed
//! by what `stat` says about them, so a key that hashes 30 GB of volumes reads them once.
//!
//! A record is (absolute path, size, modification time, change time, inode, device) ->
//! BLAKE3 digest, kept in `stat-cache.json` beside the cache's entries. A file whose stat
//! matches its record is not read; any other file is hashed and recorded. `touch` or a
//! copy changes the stat, not the digest, so it costs one re-read and re-runs nothing.
//!
//! Two rules keep a record honest. The change time (ctime) is part of the stat: no tool
//! can set it back, so an edit that restores the modification time is still seen. And a
//! file changed within the last two seconds before it was hashed is hashed but not
//! recorded ("racily clean", as git calls it): a second edit in the same clock tick
//! would leave its stat unchanged. The file is plain JSON; losing or deleting it only
//! costs re-reading the files it described. Whoever reads a file for its content still
//! checks the bytes it reads against the digest (the slice stage does).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::file_digest;

/// What `stat` says about a file, as far as the stat cache trusts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    /// Seconds and nanoseconds since the epoch.
    mtime: (i64, i64),
    ctime: (i64, i64),
    inode: u64,
    device: u64,
}

impl Stamp {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }

    #[cfg(not(unix))]
    fn of(meta: &std::fs::Metadata) -> Stamp {
        let t = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let t = (t.as_secs() as i64, i64::from(t.subsec_nanos()));
        Stamp {
            size: meta.len(),
            mtime: t,
            ctime: t,
            inode: 0,
            device: 0,
        }
    }

    /// The later of the modification and change times.
    fn changed(&self) -> SystemTime {
        let (s, n) = self.mtime.max(self.ctime);
        match u64::try_from(s) {
            Ok(s) => SystemTime::UNIX_EPOCH + Duration::new(s, n.clamp(0, 999_999_999) as u32),
            Err(_) => SystemTime::UNIX_EPOCH,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    #[serde(flatten)]
    stamp: Stamp,
    blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StatFile {
    version: u32,
    files: BTreeMap<PathBuf, Record>,
}

const VERSION: u32 = 1;
/// How long after its last change a file's stat is trusted.
const SETTLE: Duration = Duration::from_secs(2);

/// Digests of files by their stat; see the module docs.
#[derive(Debug)]
pub struct StatCache {
    /// Where the records persist; `None`: in memory only.
    path: Option<PathBuf>,
    /// How long after its last change a file's stat is trusted.
    settle: Duration,
    state: Mutex<Option<State>>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, Record>,
    dirty: bool,
    /// Files read (hashed) rather than answered from a record, for tests and logs.
    hashed: u64,
}

impl StatCache {
    /// The stat cache kept in the file `path` (read when first needed).
    pub fn at(path: &Path) -> StatCache {
        StatCache {
            path: Some(path.to_path_buf()),
            settle: SETTLE,
            state: Mutex::new(None),
        }
    }

    /// A stat cache that forgets everything when dropped.
    pub fn in_memory() -> StatCache {
        StatCache {
            path: None,
            settle: SETTLE,
            state: Mutex::new(None),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = guard.get_or_insert_with(|| State {
            files: self.path.as_deref().map(read_records).unwrap_or_default(),
            ..State::default()
        });
        f(state)
    }

    /// The BLAKE3 digest (hex) of the file at `path`: from its record when its stat is
    /// unchanged, else read and hashed (and recorded unless it changed just now).
    pub fn digest(&self, path: &Path) -> io::Result<String> {
        let abs = std::path::absolute(path)?;
        let before = Stamp::of(&std::fs::metadata(&abs)?);
        let known = self.with(|s| {
            s.files
                .get(&abs)
                .filter(|r| r.stamp == before)
                .map(|r| r.blake3.clone())
        });
        if let Some(d) = known {
            return Ok(d);
        }
        let started = SystemTime::now();
        let blake3 = file_digest(&abs)?;
        let after = Stamp::of(&std::fs::metadata(&abs)?);
        let settled = after == before
            && after
                .changed()
                .checked_add(self.settle)
                .is_some_and(|t| t <= started);
        self.with(|s| {
            s.hashed += 1;
            if settled {
                s.files.insert(
                    abs,
                    Record {
                        stamp: after,
                        blake3: blake3.clone(),
                    },
                );
                s.dirty = true;
            }
        });
        Ok(blake3)
    }

    /// How many files this stat cache has read so far (rather than trusted a record).
    pub fn files_hashed(&self) -> u64 {
        self.with(|s| s.hashed)
    }

    /// Writes new records to the stat cache's file (merged with what another process
    /// wrote meanwhile; records of files that no longer exist are dropped).
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let files = self.with(|s| {
            if !s.dirty {
                return None;
            }
            s.dirty = false;
            Some(s.files.clone())
        });
        let Some(mut files) = files else {
            return Ok(());
        };
        for (p, r) in read_records(path) {
            files.entry(p).or_insert(r);
        }
        files.retain(|p, _| p.is_file());
        let text = serde_json::to_string(&StatFile {
            version: VERSION,
            files,
        })
        .map_err(io::Error::other)?;
        crate::files::write_atomic(path, text.as_bytes())
    }
}

/// The records of a stat cache file; an unreadable or foreign one counts as empty.
fn read_records(path: &Path) -> BTreeMap<PathBuf, Record> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<StatFile>(&t).ok())
        .filter(|f| f.version == VERSION)
        .map(|f| f.files)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore_mtime(path: &Path, to: SystemTime) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(to).unwrap();
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"one").unwrap();
        let cache = StatCache::at(&dir.path().join("stat.json"));
        let d = cache.digest(&f).unwrap();
        assert_eq!(d, file_digest(&f).unwrap());
        assert_eq!(cache.digest(&f).unwrap(), d);
        assert_eq!(
            cache.files_hashed(),
            2,
            "not trusted within the settle time"
        );
    }

    #[test]
    fn an_unchanged_file_is_read_once_and_an_edited_one_again() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("stat.json");
        let f = dir.path().join("a.bin");
        std::fs::write(&f, b"one").unwrap();
        let settled = |p: &Path| StatCache {
            settle: Duration::ZERO,
            ..StatCache::at(p)
        };
        let cache = settled(&stat);
        let d1 = cache.digest(&f).unwrap();
        assert_eq!(cache.digest(&f).unwrap(), d1);
        assert_eq!(cache.files_hashed(), 1);
        cache.save().unwrap();
        // another process (a fresh stat cache on the same file) trusts the record
        let again = settled(&stat);
        assert_eq!(again.digest(&f).unwrap(), d1);
        assert_eq!(again.files_hashed(), 0);
        // same size, modification time put back: the change time gives it away
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        // a later clock tick than the first write (what the settle time ensures in use)
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(&f, b"two").unwrap();
        restore_mtime(&f, mtime);
        let d2 = again.digest(&f).unwrap();
        assert_ne!(d2, d1);
        assert_eq!(d2, file_digest(&f).unwrap());
        assert_eq!(again.files_hashed(), 1);
    }
}
