//! Downloading KiTS19 into the folder layout the load stage reads:
//! `OUT/case_XXXXX/{imaging,segmentation}.nii.gz` and `OUT/kits.json`.
//!
//! Segmentations and `kits.json` come from the kits19 repository's raw files
//! (`SEG_BASE/data/case_XXXXX/segmentation.nii.gz`, `SEG_BASE/data/kits.json`), imaging
//! from the KiTS-Challenge-Imaging data set (`IMG_BASE/images/case_XXXXX.nii.gz`), as the
//! official `starter_code/get_imaging_v2.py` does. Several files download at once, each
//! streamed to `OUT/.kpipe-fetch/<file>.part` (resumed with a `Range` request after a
//! drop, see [`http`]), checked as a complete NIfTI volume (see [`check`]) and only then
//! renamed. A case's folder appears only once both of its files are valid, so `OUT`
//! holds complete cases only: a case whose download failed stays absent (a file of it
//! that did arrive waits in `.kpipe-fetch/` for the next run). `OUT/kits.json` lists the
//! cases present in `OUT` (the whole official file once all 210 are), so the load stage
//! reads a partial download as a smaller dataset.
//!
//! This module draws nothing: it sends [`FetchEvent`]s to a [`FetchReporter`].

mod check;
mod http;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use check::{NiftiCheck, check_kits_json, check_nifti};

/// The imaging's official source: the Hugging Face data set `get_imaging_v2.py` reads.
pub const KITS19_IMAGING_URL: &str =
    "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main";
/// The segmentations' official source: the kits19 repository's raw files.
pub const KITS19_SEGMENTATION_URL: &str =
    "https://raw.githubusercontent.com/neheller/kits19/master";
/// Where downloads wait, under the output folder, until their case is complete.
pub const STAGING_DIR: &str = ".kpipe-fetch";

/// What to fetch, from where, into where.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub out: PathBuf,
    /// Case numbers (`case_00042` is 42).
    pub cases: Vec<u32>,
    /// The root under which `images/case_XXXXX.nii.gz` lie.
    pub imaging_url: String,
    /// The root under which `data/case_XXXXX/segmentation.nii.gz` and `data/kits.json` lie.
    pub segmentation_url: String,
    /// Files downloaded at once.
    pub jobs: usize,
    /// Failed attempts in a row, without new bytes, before a file is given up.
    pub retries: u32,
    /// The first back-off between attempts; it doubles each time (at most 60 s).
    pub retry_wait: Duration,
}

/// The files of the KiTS19 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    KitsJson,
    Segmentation,
    Imaging,
}

impl FileKind {
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::KitsJson => "kits.json",
            FileKind::Segmentation => "segmentation.nii.gz",
            FileKind::Imaging => "imaging.nii.gz",
        }
    }
}

/// What a fetch tells its reporter; `file` is the path under the output folder.
#[derive(Debug)]
pub enum FetchEvent<'a> {
    /// Bytes start arriving; `from` > 0 when a partial file is resumed.
    Started {
        file: &'a str,
        total: Option<u64>,
        from: u64,
    },
    /// `done` bytes of the file are on disk.
    Progress { file: &'a str, done: u64 },
    /// An attempt failed; the next starts after `wait`.
    Retry {
        file: &'a str,
        attempt: u32,
        wait: Duration,
        error: &'a str,
    },
    /// The file is done with.
    Finished {
        file: &'a str,
        outcome: &'a FileOutcome,
    },
}

/// Receives the events of a fetch, from several threads.
pub trait FetchReporter: Sync {
    fn event(&self, event: FetchEvent<'_>);
}

/// A reporter that drops every event.
pub struct Silent;

impl FetchReporter for Silent {
    fn event(&self, _: FetchEvent<'_>) {}
}

/// How one file ended.
#[derive(Debug)]
pub enum FileOutcome {
    /// Downloaded in this run (`bytes` long, resumed or not) and checked.
    Fetched {
        bytes: u64,
    },
    /// Already there and valid.
    Present,
    Failed(FileError),
}

impl FileOutcome {
    pub fn is_ok(&self) -> bool {
        !matches!(self, FileOutcome::Failed(_))
    }
}

/// Why a file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("HTTP {status} from `{url}`")]
    Status { url: String, status: u16 },
    #[error("cannot request `{url}`: {error}")]
    Request { url: String, error: String },
    #[error("gave up on `{url}` after {attempts} failed attempts: {error}")]
    GaveUp {
        url: String,
        attempts: u32,
        error: String,
    },
    #[error("the download from `{url}` is not a valid {what}: {why}")]
    Invalid {
        url: String,
        what: &'static str,
        why: String,
    },
    #[error("`{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Problems that stop a fetch before any download.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot create `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not an http:// or https:// URL")]
    Url(String),
}

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseStatus {
    /// At least one of its files was downloaded in this run; the case is complete.
    Fetched,
    /// Both files were already there and valid.
    Skipped,
    /// A file could not be fetched (or moved into place); the case is absent.
    Failed,
}

/// A case's result: its files' outcomes.
#[derive(Debug)]
pub struct CaseResult {
    pub id: String,
    pub status: CaseStatus,
    pub segmentation: FileOutcome,
    pub imaging: FileOutcome,
    /// Why it failed, when that is not one of its files (moving it into place).
    pub error: Option<FileError>,
}

/// What a fetch did.
#[derive(Debug)]
pub struct FetchSummary {
    pub cases: Vec<CaseResult>,
    pub kits_json: FileOutcome,
    /// How many records `OUT/kits.json` lists (the cases present), or why it was not
    /// written.
    pub listed: Result<usize, String>,
}

impl FetchSummary {
    pub fn count(&self, status: CaseStatus) -> usize {
        self.cases.iter().filter(|c| c.status == status).count()
    }

    /// Whether every case arrived and `OUT/kits.json` was written.
    pub fn complete(&self) -> bool {
        self.kits_json.is_ok() && self.listed.is_ok() && self.count(CaseStatus::Failed) == 0
    }
}

/// The case folder name of a case number.
pub fn case_id(case: u32) -> String {
    format!("case_{case:05}")
}

/// One file to get: from `url`, checked, to `target` (via `staged` for case files).
struct FileJob {
    /// The path under the output folder, for reports.
    name: String,
    kind: FileKind,
    url: String,
    target: PathBuf,
    staged: PathBuf,
}

impl FileJob {
    fn new(opts: &FetchOptions, case: Option<u32>, kind: FileKind) -> FileJob {
        let base = |u: &str| u.trim_end_matches('/').to_string();
        let staging = opts.out.join(STAGING_DIR);
        match (case, kind) {
            (Some(c), FileKind::Imaging | FileKind::Segmentation) => {
                let id = case_id(c);
                let url = if kind == FileKind::Imaging {
                    format!("{}/images/{id}.nii.gz", base(&opts.imaging_url))
                } else {
                    format!(
                        "{}/data/{id}/segmentation.nii.gz",
                        base(&opts.segmentation_url)
                    )
                };
                FileJob {
                    name: format!("{id}/{}", kind.file_name()),
                    kind,
                    url,
                    target: opts.out.join(&id).join(kind.file_name()),
                    staged: staging.join(&id).join(kind.file_name()),
                }
            }
            _ => FileJob {
                // The official file is kept as fetched in the staging folder; the one
                // in `OUT` is written from it (see `write_kits_json`).
                name: format!("{STAGING_DIR}/kits.json"),
                kind: FileKind::KitsJson,
                url: format!("{}/data/kits.json", base(&opts.segmentation_url)),
                target: staging.join("kits.json"),
                staged: staging.join("kits.json"),
            },
        }
    }

    /// Whether the file at `path` is a valid file of this kind.
    fn check(&self, path: &Path) -> Result<(), String> {
        match self.kind {
            FileKind::KitsJson => check_kits_json(path).map(drop),
            FileKind::Segmentation | FileKind::Imaging => check_nifti(path).map(drop),
        }
    }

    fn what(&self) -> &'static str {
        match self.kind {
            FileKind::KitsJson => "KiTS19 `kits.json`",
            FileKind::Segmentation | FileKind::Imaging => "NIfTI volume",
        }
    }
}

/// Fetches `opts.cases` and `kits.json` into `opts.out`. Failures of single files are
/// in the summary; an error means nothing was attempted.
pub fn fetch_kits19(
    opts: &FetchOptions,
    reporter: &dyn FetchReporter,
) -> Result<FetchSummary, FetchError> {
    for url in [&opts.imaging_url, &opts.segmentation_url] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(FetchError::Url(url.clone()));
        }
    }
    let staging = opts.out.join(STAGING_DIR);
    std::fs::create_dir_all(&staging).map_err(|source| FetchError::Io {
        path: staging.clone(),
        source,
    })?;
    let mut jobs = vec![FileJob::new(opts, None, FileKind::KitsJson)];
    for &c in &opts.cases {
        // The small segmentation first: a missing case shows early.
        jobs.push(FileJob::new(opts, Some(c), FileKind::Segmentation));
        jobs.push(FileJob::new(opts, Some(c), FileKind::Imaging));
    }
    let downloader = http::Downloader::new(opts.retries, opts.retry_wait);
    let outcomes: Vec<Mutex<Option<FileOutcome>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.clamp(1, jobs.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let outcome = get_file(&downloader, job, reporter);
                    reporter.event(FetchEvent::Finished {
                        file: &job.name,
                        outcome: &outcome,
                    });
                    if let Ok(mut slot) = outcomes[i].lock() {
                        *slot = Some(outcome);
                    }
                }
            });
        }
    });
    let mut outcomes = outcomes.into_iter().map(|m| {
        m.into_inner().ok().flatten().unwrap_or_else(|| {
            FileOutcome::Failed(FileError::Request {
                url: String::new(),
                error: "the download thread panicked".into(),
            })
        })
    });
    let kits_json = outcomes.next().unwrap_or(FileOutcome::Present);
    let mut cases = Vec::with_capacity(opts.cases.len());
    for &c in &opts.cases {
        let segmentation = outcomes.next().unwrap_or(FileOutcome::Present);
        let imaging = outcomes.next().unwrap_or(FileOutcome::Present);
        cases.push(settle_case(opts, c, segmentation, imaging));
    }
    let listed = if kits_json.is_ok() {
        write_kits_json(&opts.out)
    } else {
        Err("not written: the official `kits.json` could not be fetched".into())
    };
    Ok(FetchSummary {
        cases,
        kits_json,
        listed,
    })
}

/// Gets one file to its staged place (or finds it valid in place).
fn get_file(
    downloader: &http::Downloader,
    job: &FileJob,
    reporter: &dyn FetchReporter,
) -> FileOutcome {
    for path in [&job.target, &job.staged] {
        if path.exists() {
            match job.check(path) {
                Ok(()) => return FileOutcome::Present,
                Err(why) => {
                    tracing::warn!(
                        "`{}` is not valid ({why}): fetching it again",
                        path.display()
                    );
                    if let Err(source) = std::fs::remove_file(path) {
                        return FileOutcome::Failed(FileError::Io {
                            path: path.clone(),
                            source,
                        });
                    }
                }
            }
        }
    }
    let io = |path: &Path, source| {
        FileOutcome::Failed(FileError::Io {
            path: path.into(),
            source,
        })
    };
    if let Some(dir) = job.staged.parent()
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        return io(dir, e);
    }
    let part = part_path(&job.staged);
    let bytes = match downloader.download(&job.url, &part, &job.name, reporter) {
        Ok(n) => n,
        Err(e) => return FileOutcome::Failed(e),
    };
    if let Err(why) = job.check(&part) {
        // A complete body that is not the file (an HTML page, a truncated upload):
        // resuming it cannot help, so it goes.
        let _ = std::fs::remove_file(&part);
        return FileOutcome::Failed(FileError::Invalid {
            url: job.url.clone(),
            what: job.what(),
            why,
        });
    }
    match std::fs::rename(&part, &job.staged) {
        Ok(()) => FileOutcome::Fetched { bytes },
        Err(e) => io(&job.staged, e),
    }
}

fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

/// Moves a case into place when both of its files are valid; otherwise makes sure
/// its folder is absent (a valid file of it waits in the staging folder).
fn settle_case(
    opts: &FetchOptions,
    case: u32,
    segmentation: FileOutcome,
    imaging: FileOutcome,
) -> CaseResult {
    let id = case_id(case);
    let dir = opts.out.join(&id);
    let staged_dir = opts.out.join(STAGING_DIR).join(&id);
    let files = [FileKind::Segmentation, FileKind::Imaging];
    let mut result = CaseResult {
        id,
        status: CaseStatus::Failed,
        segmentation,
        imaging,
        error: None,
    };
    let moved = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| FileError::Io {
            path: to.into(),
            source,
        })
    };
    if result.segmentation.is_ok() && result.imaging.is_ok() {
        let placed = std::fs::create_dir_all(&dir)
            .map_err(|source| FileError::Io {
                path: dir.clone(),
                source,
            })
            .and_then(|()| {
                for kind in files {
                    let staged = staged_dir.join(kind.file_name());
                    if staged.exists() {
                        moved(&staged, &dir.join(kind.file_name()))?;
                    }
                }
                Ok(())
            });
        let _ = std::fs::remove_dir(&staged_dir);
        match placed {
            Ok(()) => {
                let fetched = |o: &FileOutcome| matches!(o, FileOutcome::Fetched { .. });
                result.status = if fetched(&result.segmentation) || fetched(&result.imaging) {
                    CaseStatus::Fetched
                } else {
                    CaseStatus::Skipped
                };
            }
            Err(e) => result.error = Some(e),
        }
        return result;
    }
    // Incomplete: keep what is valid for the next run, outside `OUT`'s case folders.
    if dir.is_dir() {
        for kind in files {
            let placed = dir.join(kind.file_name());
            if placed.exists() {
                let kept = std::fs::create_dir_all(&staged_dir)
                    .map_err(|source| FileError::Io {
                        path: staged_dir.clone(),
                        source,
                    })
                    .and_then(|()| moved(&placed, &staged_dir.join(kind.file_name())));
                if let Err(e) = kept {
                    result.error = Some(e);
                }
            }
        }
        // Only an empty folder goes: anything else in it is not ours.
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(&staged_dir);
    result
}

/// Writes `OUT/kits.json`: the official records of the cases present in `OUT` (both
/// files there), byte for byte the official file when all of them are. Returns how
/// many records it lists.
fn write_kits_json(out: &Path) -> Result<usize, String> {
    let official = out.join(STAGING_DIR).join("kits.json");
    let text = std::fs::read_to_string(&official)
        .map_err(|e| format!("cannot read `{}`: {e}", official.display()))?;
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| format!("`{}`: {e}", official.display()))?;
    let present: BTreeSet<String> = std::fs::read_dir(out)
        .map_err(|e| format!("cannot read `{}`: {e}", out.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| {
            [FileKind::Segmentation, FileKind::Imaging]
                .iter()
                .all(|k| out.join(name).join(k.file_name()).is_file())
        })
        .collect();
    let total = records.len();
    let kept: Vec<serde_json::Value> = records
        .into_iter()
        .filter(|r| {
            r.get("case_id")
                .and_then(|v| v.as_str())
                .is_some_and(|id| present.contains(id))
        })
        .collect();
    let path = out.join("kits.json");
    let bytes = if kept.len() == total {
        text.into_bytes()
    } else {
        let mut s = serde_json::to_string_pretty(&kept).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    };
    crate::files::write_atomic(&path, &bytes)
        .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
    Ok(kept.len())
}

/// Parses a case list: `0-209`, `3`, `0-9,15,20-24`.
pub fn parse_cases(s: &str) -> Result<Vec<u32>, String> {
    let mut cases = BTreeSet::new();
    for part in s.split(',').map(str::trim) {
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n <= 99_999)
                .ok_or_else(|| format!("`{t}` is not a case number (0 to 99999)"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if a > b {
            return Err(format!("`{part}` is an empty range"));
        }
        cases.extend(a..=b);
    }
    Ok(cases.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_lists_parse_as_sorted_unique_numbers() {
        assert_eq!(parse_cases("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cases("7, 2-3,3").unwrap(), vec![2, 3, 7]);
        assert_eq!(parse_cases("209").unwrap(), vec![209]);
        assert!(parse_cases("5-2").unwrap_err().contains("empty range"));
        assert!(parse_cases("a").unwrap_err().contains("`a`"));
        assert!(parse_cases("100000").is_err());
        assert!(parse_cases("").is_err());
    }

    #[test]
    fn urls_follow_the_official_layouts() {
        let opts = FetchOptions {
            out: PathBuf::from("/d"),
            cases: vec![7],
            imaging_url: KITS19_IMAGING_URL.into(),
            segmentation_url: format!("{KITS19_SEGMENTATION_URL}/"),
            jobs: 1,
            retries: 0,
            retry_wait: Duration::ZERO,
        };
        let img = FileJob::new(&opts, Some(7), FileKind::Imaging);
        assert_eq!(
            img.url,
            "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main/images/case_00007.nii.gz"
        );
        assert_eq!(img.target, PathBuf::from("/d/case_00007/imaging.nii.gz"));
        assert_eq!(
            img.staged,
            PathBuf::from("/d/.kpipe-fetch/case_00007/imaging.nii.gz")
        );
        let seg = FileJob::new(&opts, Some(7), FileKind::Segmentation);
        assert_eq!(
            seg.url,
            "https://raw.githubusercontent.com/neheller/kits19/master/data/case_00007/segmentation.nii.gz"
        );
        let kits = FileJob::new(&opts, None, FileKind::KitsJson);
        assert_eq!(
            kits.url,
            "https://raw.githubusercontent.com/neheller/kits19/master/data/kits.json"
        );
        assert_eq!(
            part_path(&seg.staged).file_name().unwrap(),
            "segmentation.nii.gz.part"
        );
    }
}
