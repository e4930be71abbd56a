//! `kpipe status` and `kpipe gc`: the cache's entries, their sizes and the lock files that
//! reference them, and removing those no lock file references (or whose content is corrupt).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::args::{GcArgs, GlobalArgs};
use super::{CliError, exit};
use crate::cache::{Cache, LockFile};

/// Lists the entries of the cache.
pub(super) fn status(global: &GlobalArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let cache = Cache::open(&global.cache_dir)?;
    let entries = cache.entries()?;
    let locks = references(&cache);
    let total: u64 = entries.iter().map(|e| e.manifest.bytes).sum();
    writeln!(
        out,
        "cache `{}`: {} entries, {}",
        cache.root().display(),
        entries.len(),
        human_bytes(total)
    )?;
    for e in &entries {
        let m = &e.manifest;
        let refs: Vec<String> = locks
            .iter()
            .filter(|(_, l)| l.nodes.values().any(|r| r.key == m.key))
            .map(|(p, _)| display_path(p))
            .collect();
        let refs = if refs.is_empty() {
            "(unreferenced)".to_string()
        } else {
            refs.join(", ")
        };
        writeln!(
            out,
            "  {}  {:<24} {:<8} {:>10}  {refs}",
            &m.key[..12],
            m.stage,
            m.kind,
            human_bytes(m.bytes)
        )?;
    }
    Ok(exit::OK)
}

/// Removes the unreferenced entries (with `--corrupt`: the corrupt ones).
pub(super) fn gc(
    args: &GcArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let GcArgs { dry_run, corrupt } = *args;
    let cache = Cache::open(&global.cache_dir)?;
    let entries = cache.entries()?;
    let locks = references(&cache);
    let mut doomed = Vec::new();
    for e in entries {
        let drop = if corrupt {
            cache.get(&e.manifest.key).is_err()
        } else {
            !locks
                .iter()
                .any(|(_, l)| l.nodes.values().any(|r| r.key == e.manifest.key))
        };
        if drop {
            doomed.push(e);
        }
    }
    let bytes: u64 = doomed.iter().map(|e| e.manifest.bytes).sum();
    for e in &doomed {
        writeln!(
            out,
            "{} {}  {}",
            if dry_run { "would remove" } else { "removed" },
            &e.manifest.key[..12],
            e.manifest.stage
        )?;
        if !dry_run {
            cache.remove(&e.manifest.key)?;
        }
    }
    let verb = if dry_run { "would free" } else { "freed" };
    writeln!(
        out,
        "{} entries, {verb} {}",
        doomed.len(),
        human_bytes(bytes)
    )?;
    let claims = cache.prune_claims(dry_run)?;
    if claims > 0 {
        let verb = if dry_run { "would remove" } else { "removed" };
        writeln!(out, "{verb} {claims} idle claim files")?;
    }
    Ok(exit::OK)
}

/// Each entry's key, stage, size and referencing lock files.
fn references(cache: &Cache) -> Vec<(PathBuf, LockFile)> {
    cache
        .lock_files()
        .into_iter()
        .filter_map(|p| LockFile::read(&p).ok().map(|l| (p, l)))
        .collect()
}

fn display_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
