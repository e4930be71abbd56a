//! The content-addressed artifact store.
//!
//! Layout under the cache directory:
//!
//! ```text
//! entries/<key>/manifest.json   what made the entry, the digest of out/ and its listing
//! entries/<key>/out/            the artifact (read-only files)
//! tmp/<key>.<pid>.<n>/          entries being written; renamed into entries/ when complete
//! locks/<hash>                  the path of each lock file that recorded keys here (for gc)
//! claims/<key>                  locked (flock) by whoever computes the key: one at a time
//! resume/<key>/                 checkpoints of an unfinished training run, until it succeeds
//! stat-cache.json               digests of data files outside the cache ([`StatCache`])
//! ```
//!
//! An entry is written into `tmp/`, its files synced, its manifest written last, and the
//! directory renamed into `entries/` in one step: a killed run leaves only a `tmp/`
//! directory, which no run accepts and the next run removes.
//!
//! Many processes, on many machines of a shared filesystem, may use one cache. Whoever
//! computes a key first takes its claim ([`Cache::claim`], an exclusive `flock` on
//! `claims/<key>`), held until the entry is in place or abandoned: a second process that
//! wants the same key waits, then finds the entry and computes nothing. A `tmp/`
//! directory is stale, and removed, only when its key's claim is free. Should two writers
//! still race (a filesystem without working locks), the first complete entry wins and
//! the other's rename finds it in place, which is not an error.
//!
//! Two checks guard what is read, by cost. [`Cache::lookup`], which decides that a node
//! is cached, reads the manifest and compares the files' names, types and sizes with its
//! listing, and their modes (read-only) without reading them: a run with nothing to do
//! reads no artifact. A writable file (someone may have edited it) gets the full check
//! instead. [`Cache::verify`] re-hashes every file and compares with the manifest; the
//! executor runs it on every input of a node before the node reads it (once per entry
//! and process), and `kpipe verify --cache` on every entry. A failure names the entry and
//! the file.

pub mod digest;
mod integrity;
pub mod lock;
pub mod stat_cache;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::files::canonical_json;
use integrity::{Quick, difference, quick_check, short};
pub use writer::EntryWriter;
use writer::make_writable;

pub use digest::{Listed, TreeDigest, file_digest, tree_digest};
pub use lock::{LockFile, LockRecord};
pub use stat_cache::StatCache;

/// Bumped when the meaning of an artifact or a key changes: every key changes with it.
/// 2: load keys hash case files' content, `cases.json` paths are relative to the data
/// root, manifests list their files.
pub const CACHE_FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cache entry `{path}` is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

impl CacheError {
    /// An entry that is not what was written (exit code 3), rather than an I/O failure.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, CacheError::Corrupt { .. })
    }
}

impl crate::hint::Hint for CacheError {
    fn hint(&self) -> Option<String> {
        self.is_corrupt()
            .then(|| "remove it (`kpipe gc --corrupt`) and run again".into())
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

/// What an entry's cache key is computed from.
#[derive(Debug, Clone, Serialize)]
pub struct KeyMaterial<'a> {
    pub kind: &'a str,
    pub params: &'a serde_json::Value,
    pub seed: u64,
    /// Output digest of each input stage, by stage id.
    pub inputs: &'a BTreeMap<String, String>,
    /// What the stage adds itself (digests of declared files).
    pub extra: &'a serde_json::Value,
}

impl KeyMaterial<'_> {
    /// The cache key: BLAKE3 of the canonical JSON of the material and the cache format.
    pub fn key(&self) -> String {
        let value = serde_json::json!({
            "format": CACHE_FORMAT,
            "kind": self.kind,
            "params": self.params,
            "seed": self.seed,
            "inputs": self.inputs,
            "extra": self.extra,
        });
        let mut text = String::new();
        canonical_json(&value, &mut text);
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }
}

/// What made an entry, stored beside its `out/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kpipe_version: String,
    pub key: String,
    /// The node that produced it.
    pub stage: String,
    pub kind: String,
    pub params: serde_json::Value,
    pub seed: u64,
    pub inputs: BTreeMap<String, String>,
    pub extra: serde_json::Value,
    /// Digest of `out/`.
    pub output: String,
    pub files: u64,
    pub bytes: u64,
    pub duration_s: f64,
    /// Every file, folder and link of `out/` (but `volatile/`), with sizes and digests.
    #[serde(default)]
    pub listing: Vec<Listed>,
}

/// A complete, verified entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Entry {
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    stat: Arc<StatCache>,
    /// Keys whose content this process has re-hashed and found sound.
    verified: Arc<Mutex<HashSet<String>>>,
}

/// The claim on computing one key ([`Cache::claim`]); dropping it releases the key.
#[derive(Debug)]
pub struct Claim {
    key: String,
    _file: std::fs::File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// Opens (creating) the cache at `root` and removes what killed runs left in `tmp/`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        for sub in ["entries", "tmp", "locks", "claims"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(io("create cache directory", &d))?;
        }
        let root = std::fs::canonicalize(root).map_err(io("open cache directory", root))?;
        let cache = Cache {
            stat: Arc::new(StatCache::at(&root.join("stat-cache.json"))),
            root,
            verified: Arc::default(),
        };
        cache.remove_stale_tmp();
        Ok(cache)
    }

    /// This cache, with `other`'s stat cache (a scratch cache of `verify` reads the same
    /// data files as the pipeline's cache).
    pub fn sharing_stat_cache(self, other: &Cache) -> Cache {
        Cache {
            stat: other.stat.clone(),
            ..self
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Digests of data files outside the cache, by their stat.
    pub fn stat_cache(&self) -> &StatCache {
        &self.stat
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    /// The entry for `key` as its manifest describes it, without re-hashing its content.
    pub fn peek(&self, key: &str) -> Option<Entry> {
        self.read_manifest(&self.entry_dir(key)).ok()
    }

    /// The entry for `key`, its content re-hashed and compared with its manifest;
    /// `None` if there is none.
    pub fn get(&self, key: &str) -> Result<Option<Entry>, CacheError> {
        let Some(entry) = self.manifest_of(key)? else {
            return Ok(None);
        };
        self.verify(&entry)?;
        Ok(Some(entry))
    }

    /// The entry for `key`, checked without reading its files: its manifest, and its
    /// files' names, types, sizes and modes against the manifest's listing. A file that
    /// is no longer read-only gets the full check of [`Cache::verify`].
    pub fn lookup(&self, key: &str) -> Result<Option<Entry>, CacheError> {
        let Some(entry) = self.manifest_of(key)? else {
            return Ok(None);
        };
        match quick_check(&entry) {
            Quick::Sound => {}
            Quick::Suspect(why) => {
                tracing::debug!("re-hashing entry {}: {why}", short(key));
                self.verify(&entry)?;
            }
            Quick::Broken(why) => {
                return Err(CacheError::Corrupt {
                    path: entry.dir.clone(),
                    why: format!("{why} (the output of `{}`)", entry.manifest.stage),
                });
            }
        }
        Ok(Some(entry))
    }

    /// Re-hashes an entry's `out/` and compares with its manifest, naming the first file
    /// that differs. Once an entry passed, it passes again without reading (per process).
    pub fn verify(&self, entry: &Entry) -> Result<(), CacheError> {
        let key = &entry.manifest.key;
        let done = |v: &Mutex<HashSet<String>>| {
            v.lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(key.as_str())
        };
        if done(&self.verified) {
            return Ok(());
        }
        let corrupt = |why: String| CacheError::Corrupt {
            path: entry.dir.clone(),
            why: format!("{why} (the output of `{}`)", entry.manifest.stage),
        };
        let actual =
            tree_digest(&entry.out()).map_err(|e| corrupt(format!("cannot hash `out/`: {e}")))?;
        if actual.hex != entry.manifest.output {
            return Err(corrupt(
                difference(&entry.manifest.listing, &actual.listing).unwrap_or_else(|| {
                    format!(
                        "its content digest is {} but its manifest records {}",
                        short(&actual.hex),
                        short(&entry.manifest.output)
                    )
                }),
            ));
        }
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        Ok(())
    }

    /// The manifest of `key`'s entry, checked to be for `key`; `None` if there is none.
    fn manifest_of(&self, key: &str) -> Result<Option<Entry>, CacheError> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Ok(None);
        }
        let entry = self.read_manifest(&dir)?;
        if entry.manifest.key != key {
            return Err(CacheError::Corrupt {
                path: dir,
                why: format!("its manifest is for key {}", short(&entry.manifest.key)),
            });
        }
        Ok(Some(entry))
    }

    fn read_manifest(&self, dir: &Path) -> Result<Entry, CacheError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| CacheError::Corrupt {
            path: dir.to_path_buf(),
            why: format!("no readable manifest: {e}"),
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| CacheError::Corrupt {
            path: dir.to_path_buf(),
            why: format!("invalid manifest: {e}"),
        })?;
        Ok(Entry {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Starts writing the entry of the claimed key in a private temporary directory (only
    /// the holder of a key's claim writes it).
    pub fn begin(&self, claim: &Claim) -> Result<EntryWriter, CacheError> {
        let key = &claim.key;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{key}.{}.{n}", std::process::id()));
        // `remove_stale_tmp` reads the key back from the name: `<key>.<pid>.<n>`
        for d in [tmp.join("out"), tmp.join("scratch")] {
            std::fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        Ok(EntryWriter {
            cache: self.clone(),
            key: key.clone(),
            tmp,
            done: false,
        })
    }

    /// Where a stage of `key` keeps what must survive an interrupted run (checkpoints).
    pub fn resume_dir(&self, key: &str) -> PathBuf {
        self.root.join("resume").join(key)
    }

    /// Every complete entry (unverified), sorted by key.
    pub fn entries(&self) -> Result<Vec<Entry>, CacheError> {
        let dir = self.root.join("entries");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
            let e = e.map_err(io("list", &dir))?;
            match self.read_manifest(&e.path()) {
                Ok(entry) => out.push(entry),
                Err(err) => tracing::warn!("{err}"),
            }
        }
        out.sort_by(|a, b| a.manifest.key.cmp(&b.manifest.key));
        Ok(out)
    }

    /// Removes an entry (gc).
    pub fn remove(&self, key: &str) -> Result<(), CacheError> {
        let dir = self.entry_dir(key);
        make_writable(&dir);
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))
    }

    /// Notes that `lock` records keys of this cache, so `gc` keeps what it references.
    pub fn register_lock(&self, lock: &Path) -> Result<(), CacheError> {
        let abs = std::path::absolute(lock).map_err(io("resolve", lock))?;
        let name = blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string();
        let path = self.root.join("locks").join(name);
        std::fs::write(&path, abs.as_os_str().as_encoded_bytes()).map_err(io("write", &path))
    }

    /// The lock files registered with this cache that still exist.
    pub fn lock_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.root.join("locks")) {
            for e in rd.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    let p = PathBuf::from(text);
                    if p.is_file() {
                        out.push(p);
                    } else {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Takes the claim on computing `key`, waiting while another process (or thread)
    /// holds it; `waiting` is called once if it has to wait. Released when dropped.
    pub fn claim(&self, key: &str, waiting: impl FnOnce()) -> Result<Claim, CacheError> {
        let path = self.root.join("claims").join(key);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open the claim", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                waiting();
                file.lock().map_err(io("wait for the claim", &path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("take the claim", &path)(e)),
        }
        Ok(Claim {
            key: key.to_string(),
            _file: file,
        })
    }

    /// Whether nobody holds the claim on `key` right now.
    fn unclaimed(&self, key: &str) -> bool {
        let path = self.root.join("claims").join(key);
        match std::fs::File::open(&path) {
            Ok(f) => f.try_lock().is_ok(), // released again when `f` closes
            Err(_) => true,                // never claimed
        }
    }

    /// Removes the claim files nobody holds (`kpipe gc`), each while holding its lock;
    /// `dry_run` only counts them. A process that opened one just before sees a claim
    /// that is no longer on disk: at worst two compute the key, and the first complete
    /// entry wins.
    pub fn prune_claims(&self, dry_run: bool) -> Result<usize, CacheError> {
        let dir = self.root.join("claims");
        let rd = std::fs::read_dir(&dir).map_err(io("read", &dir))?;
        let mut pruned = 0;
        for e in rd.flatten() {
            let Ok(f) = std::fs::File::open(e.path()) else {
                continue;
            };
            if f.try_lock().is_ok() {
                if !dry_run {
                    std::fs::remove_file(e.path()).map_err(io("remove", &e.path()))?;
                }
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Removes temporary directories whose writing process is gone.
    fn remove_stale_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let key = name.split('.').next().unwrap_or_default();
            if self.unclaimed(key) {
                tracing::debug!("removing stale temporary entry `{name}`");
                make_writable(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::set_readonly;
    use super::*;

    #[test]
    fn prune_claims_removes_only_the_claims_nobody_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        drop(cache.claim("idle", || {}).unwrap());
        let held = cache.claim("held", || {}).unwrap();
        let claims = dir.path().join("claims");
        assert_eq!(cache.prune_claims(true).unwrap(), 1);
        assert!(claims.join("idle").exists(), "a dry run removes nothing");
        assert_eq!(cache.prune_claims(false).unwrap(), 1);
        assert!(!claims.join("idle").exists());
        assert!(claims.join("held").exists());
        drop(held);
        assert_eq!(cache.prune_claims(false).unwrap(), 1);
        assert!(!claims.join("held").exists());
        // a key can be claimed again after its file went
        drop(cache.claim("idle", || {}).unwrap());
    }

    fn manifest() -> Manifest {
        Manifest {
            format: CACHE_FORMAT,
            kpipe_version: "test".into(),
            key: String::new(),
            stage: "s".into(),
            kind: "command".into(),
            params: serde_json::Value::Null,
            seed: 0,
            inputs: BTreeMap::new(),
            extra: serde_json::Value::Null,
            output: String::new(),
            files: 0,
            bytes: 0,
            duration_s: 0.0,
            listing: vec![],
        }
    }

    #[test]
    fn keys_ignore_map_order_but_not_values() {
        let inputs = BTreeMap::new();
        let p1 = serde_json::json!({"a": 1, "b": [1, 2]});
        let p2: serde_json::Value = serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).unwrap();
        let p3 = serde_json::json!({"a": 2, "b": [1, 2]});
        let k = |p: &serde_json::Value| {
            KeyMaterial {
                kind: "x",
                params: p,
                seed: 1,
                inputs: &inputs,
                extra: &serde_json::Value::Null,
            }
            .key()
        };
        assert_eq!(k(&p1), k(&p2));
        assert_ne!(k(&p1), k(&p3));
    }

    #[test]
    fn committed_entries_verify_and_tampering_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let claim = cache.claim("k1", || {}).unwrap();
        let w = cache.begin(&claim).unwrap();
        std::fs::write(w.out().join("a.txt"), "hello").unwrap();
        let entry = w.commit(manifest()).unwrap();
        assert_eq!(entry.manifest.files, 1);
        assert!(cache.get("k1").unwrap().is_some());
        assert!(cache.get("k2").unwrap().is_none());
        let f = entry.out().join("a.txt");
        make_writable(&f);
        std::fs::write(&f, "hellO").unwrap();
        // (a later process: this one remembers that it verified `k1`)
        let later = Cache::open(dir.path()).unwrap();
        assert!(matches!(later.get("k1"), Err(CacheError::Corrupt { .. })));
    }

    #[test]
    fn lookup_checks_sizes_and_modes_and_verify_reads_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let claim = cache.claim("k1", || {}).unwrap();
        let w = cache.begin(&claim).unwrap();
        std::fs::create_dir_all(w.out().join("sub")).unwrap();
        std::fs::write(w.out().join("sub/a.bin"), "hello").unwrap();
        std::fs::write(w.out().join("b.bin"), "world").unwrap();
        let entry = w.commit(manifest()).unwrap();
        assert_eq!(
            entry.manifest.listing.len(),
            3,
            "{:?}",
            entry.manifest.listing
        );
        let f = entry.out().join("sub/a.bin");
        // same size, read-only again: a lookup cannot tell, reading can
        make_writable(&f);
        std::fs::write(&f, "hellO").unwrap();
        set_readonly(&f);
        let fresh = Cache::open(dir.path()).unwrap();
        assert!(fresh.lookup("k1").unwrap().is_some());
        let err = fresh.verify(&entry).unwrap_err().to_string();
        assert!(
            err.contains("`sub/a.bin` has changed since it was written"),
            "{err}"
        );
        assert!(matches!(fresh.get("k1"), Err(CacheError::Corrupt { .. })));
        // left writable: a lookup reads it
        make_writable(&f);
        assert!(matches!(
            Cache::open(dir.path()).unwrap().lookup("k1"),
            Err(CacheError::Corrupt { .. })
        ));
        // restored, then a file goes missing or appears: seen without reading
        std::fs::write(&f, "hello").unwrap();
        set_readonly(&f);
        assert!(
            Cache::open(dir.path())
                .unwrap()
                .get("k1")
                .unwrap()
                .is_some()
        );
        let extra = entry.out().join("c.bin");
        std::fs::write(&extra, "x").unwrap();
        let err = cache.lookup("k1").unwrap_err().to_string();
        assert!(err.contains("`c.bin` was added"), "{err}");
        std::fs::remove_file(&extra).unwrap();
        make_writable(&entry.out().join("b.bin"));
        std::fs::remove_file(entry.out().join("b.bin")).unwrap();
        let err = cache.lookup("k1").unwrap_err().to_string();
        assert!(err.contains("`b.bin` is missing"), "{err}");
    }

    #[test]
    fn a_verified_entry_is_not_read_again_in_the_same_process() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let claim = cache.claim("k1", || {}).unwrap();
        let w = cache.begin(&claim).unwrap();
        std::fs::write(w.out().join("a.txt"), "hello").unwrap();
        let entry = w.commit(manifest()).unwrap();
        cache.verify(&entry).unwrap();
        let f = entry.out().join("a.txt");
        make_writable(&f);
        std::fs::write(&f, "hellO").unwrap();
        assert!(cache.verify(&entry).is_ok(), "remembered");
        assert!(Cache::open(dir.path()).unwrap().verify(&entry).is_err());
    }

    #[test]
    fn an_uncommitted_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        {
            let claim = cache.claim("k1", || {}).unwrap();
            let w = cache.begin(&claim).unwrap();
            std::fs::write(w.out().join("a.txt"), "partial").unwrap();
        }
        assert!(cache.peek("k1").is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
