//! The cheap check of an entry (names, types, sizes and modes against its manifest's
//! listing, no reads) and the description of what differs after a full re-hash.

use std::collections::BTreeMap;

use super::{Entry, Listed, digest};

pub(super) fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// What [`quick_check`] found.
pub(super) enum Quick {
    Sound,
    /// Not wrong yet, but only reading the files can tell.
    Suspect(String),
    Broken(String),
}

/// An entry's `out/` against its manifest's listing, by names, types, sizes and modes.
pub(super) fn quick_check(entry: &Entry) -> Quick {
    let listing = &entry.manifest.listing;
    if listing.is_empty() && entry.manifest.files > 0 {
        return Quick::Suspect("its manifest lists no files".into());
    }
    let found = match digest::walk(&entry.out()) {
        Ok(found) => found,
        Err(e) => return Quick::Broken(format!("cannot list `out/`: {e}")),
    };
    let mut want = listing.iter();
    let mut suspect = None;
    for (rel, e) in &found {
        let Some(w) = want.next() else {
            return Quick::Broken(format!("`{rel}` was added after it was written"));
        };
        if w.path() != rel {
            return Quick::Broken(if w.path() < rel.as_str() {
                format!("`{}` is missing", w.path())
            } else {
                format!("`{rel}` was added after it was written")
            });
        }
        let ft = e.file_type();
        match w {
            Listed::Dir { .. } if ft.is_dir() => {}
            Listed::Link { target, .. } if ft.is_symlink() => {
                let now = std::fs::read_link(e.path()).map(|t| t.display().to_string());
                if now.as_deref().ok() != Some(target.as_str()) {
                    return Quick::Broken(format!("link `{rel}` points elsewhere"));
                }
            }
            Listed::File { size, .. } if ft.is_file() => match e.metadata() {
                Ok(m) if m.len() != *size => {
                    return Quick::Broken(format!(
                        "`{rel}` is {} bytes, but {size} were written",
                        m.len()
                    ));
                }
                Ok(m) if !m.permissions().readonly() => {
                    suspect.get_or_insert_with(|| format!("`{rel}` is writable"));
                }
                Ok(_) => {}
                Err(err) => return Quick::Broken(format!("cannot stat `{rel}`: {err}")),
            },
            _ => return Quick::Broken(format!("`{rel}` changed its type")),
        }
    }
    if let Some(w) = want.next() {
        return Quick::Broken(format!("`{}` is missing", w.path()));
    }
    suspect.map_or(Quick::Sound, Quick::Suspect)
}

/// The first entry where two listings differ, described; `None` if they agree.
pub(super) fn difference(written: &[Listed], now: &[Listed]) -> Option<String> {
    let was: BTreeMap<&str, &Listed> = written.iter().map(|l| (l.path(), l)).collect();
    let is: BTreeMap<&str, &Listed> = now.iter().map(|l| (l.path(), l)).collect();
    let mut paths: Vec<&str> = was.keys().chain(is.keys()).copied().collect();
    paths.sort_unstable();
    paths.dedup();
    paths.into_iter().find_map(|p| match (was.get(p), is.get(p)) {
        (Some(a), Some(b)) if a == b => None,
        (
            Some(Listed::File { blake3: a, .. }),
            Some(Listed::File { blake3: b, .. }),
        ) => Some(format!(
            "`{p}` has changed since it was written: its content digest is {} but {} was written",
            short(b),
            short(a)
        )),
        (Some(_), Some(_)) => Some(format!("`{p}` has changed since it was written")),
        (Some(_), None) => Some(format!("`{p}` is missing")),
        (None, _) => Some(format!("`{p}` was added after it was written")),
    })
}
