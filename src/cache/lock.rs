//! Lock files: beside a pipeline file, one per profile, the key and output digest of each
//! node as last run (as `dvc.lock` does). `plan` diffs against it to say why a node runs;
//! `gc` keeps every entry a lock file references; `verify` recomputes and compares.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CacheError;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LockFile {
    pub version: u32,
    pub pipeline: String,
    pub profile: Option<String>,
    pub nodes: BTreeMap<String, LockRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockRecord {
    pub kind: String,
    pub key: String,
    pub output: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, String>,
    pub extra: serde_json::Value,
}

impl LockFile {
    /// `dir/name.lock` for the default profile, `dir/name.<profile>.lock` otherwise.
    pub fn path_for(pipeline_file: &Path, profile: Option<&str>) -> PathBuf {
        let stem = pipeline_file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "pipeline".into());
        let name = match profile {
            Some(p) => format!("{stem}.{p}.lock"),
            None => format!("{stem}.lock"),
        };
        pipeline_file.with_file_name(name)
    }

    /// Reads a lock file; a missing one is empty.
    pub fn read(path: &Path) -> Result<LockFile, CacheError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CacheError::Corrupt {
                path: path.to_path_buf(),
                why: format!("invalid lock file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile::default()),
            Err(source) => Err(CacheError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), CacheError> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| CacheError::Io {
            action: "serialise",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        text.push('\n');
        crate::files::write_atomic(path, text.as_bytes()).map_err(|source| CacheError::Io {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_paths_are_per_profile() {
        let p = Path::new("pipelines/study.toml");
        assert_eq!(
            LockFile::path_for(p, None),
            Path::new("pipelines/study.lock")
        );
        assert_eq!(
            LockFile::path_for(p, Some("synthetic")),
            Path::new("pipelines/study.synthetic.lock")
        );
    }
}
