//! One file over HTTP(S), streamed to disk: a partial file is resumed with a `Range`
//! request, a dropped connection or a server error is retried with exponential
//! back-off, and a 404 (or any other client error) is final at once.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use super::{FetchEvent, FetchReporter, FileError};

/// The longest wait between two attempts.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Bytes read per `read` call; progress is reported at most once per chunk.
const CHUNK: usize = 256 * 1024;

/// An HTTP client with the retry policy of a fetch.
pub(super) struct Downloader {
    agent: ureq::Agent,
    /// Failed attempts in a row (without new bytes) before giving up.
    retries: u32,
    /// The first back-off; it doubles after each failed attempt.
    wait: Duration,
}

/// How one attempt ended, when it did not deliver the whole file.
enum Failure {
    /// Worth another attempt (the connection, a timeout, a 5xx).
    Retry(String),
    /// Not worth one (a 404, a bad URL, a local I/O error).
    Fatal(FileError),
}

impl Downloader {
    pub(super) fn new(retries: u32, wait: Duration) -> Downloader {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("kpipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Downloader {
            agent,
            retries,
            wait,
        }
    }

    /// Downloads `url` into `part`, continuing what `part` already holds. Returns the
    /// file's length.
    pub(super) fn download(
        &self,
        url: &str,
        part: &Path,
        file: &str,
        reporter: &dyn FetchReporter,
    ) -> Result<u64, FileError> {
        let mut failures = 0u32;
        let mut furthest = 0u64;
        loop {
            let offset = length_of(part)?;
            let error = match self.attempt(url, part, offset, file, reporter) {
                Ok(n) => return Ok(n),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(error)) => error,
            };
            // An attempt that got further than any before starts a fresh budget, so a
            // long download survives many drops; one that did not counts against it.
            let now = length_of(part)?;
            if now > furthest {
                furthest = now;
                failures = 0;
            }
            failures += 1;
            if failures > self.retries {
                return Err(FileError::GaveUp {
                    url: url.into(),
                    attempts: failures,
                    error,
                });
            }
            let wait = self
                .wait
                .saturating_mul(1 << (failures - 1).min(16))
                .min(MAX_WAIT);
            reporter.event(FetchEvent::Retry {
                file,
                attempt: failures,
                wait,
                error: &error,
            });
            std::thread::sleep(wait);
        }
    }

    fn attempt(
        &self,
        url: &str,
        part: &Path,
        offset: u64,
        file: &str,
        reporter: &dyn FetchReporter,
    ) -> Result<u64, Failure> {
        let mut request = self.agent.get(url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let response = request.call().map_err(|e| classify(url, e))?;
        let status = response.status().as_u16();
        let content_range = response
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (start, total) = match status {
            200 => (0, response.body().content_length()),
            206 => match content_range.as_deref().and_then(parse_content_range) {
                Some((Some(start), total)) if start == offset => (offset, total),
                _ => {
                    remove(part)?;
                    return Err(Failure::Retry(format!(
                        "the server resumed at `{}`, not at byte {offset}: starting over",
                        content_range.unwrap_or_default()
                    )));
                }
            },
            416 => {
                // The part may already be whole (an earlier run ended after its last
                // byte); otherwise it is stale: start over.
                let total = content_range
                    .as_deref()
                    .and_then(parse_content_range)
                    .and_then(|(_, t)| t);
                if offset > 0 && total == Some(offset) {
                    return Ok(offset);
                }
                remove(part)?;
                return Err(Failure::Retry(format!(
                    "HTTP 416 for bytes {offset}- (the server's file is {}): starting over",
                    total.map_or("of unknown size".into(), |t| format!("{t} bytes"))
                )));
            }
            408 | 429 | 500..=599 => return Err(Failure::Retry(format!("HTTP {status}"))),
            _ => {
                return Err(Failure::Fatal(FileError::Status {
                    url: url.into(),
                    status,
                }));
            }
        };
        let io = |source: std::io::Error| {
            Failure::Fatal(FileError::Io {
                path: part.into(),
                source,
            })
        };
        let mut out = if start > 0 {
            OpenOptions::new().append(true).open(part)
        } else {
            std::fs::File::create(part)
        }
        .map_err(io)?;
        reporter.event(FetchEvent::Started {
            file,
            total,
            from: start,
        });
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut done = start;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    out.flush().map_err(io)?;
                    return Err(Failure::Retry(format!(
                        "the connection dropped after byte {done}: {e}"
                    )));
                }
            };
            out.write_all(&buf[..n]).map_err(io)?;
            done += n as u64;
            reporter.event(FetchEvent::Progress { file, done });
        }
        out.flush().map_err(io)?;
        if let Some(total) = total
            && done != total
        {
            return Err(Failure::Retry(format!(
                "the body ended after {done} of {total} bytes"
            )));
        }
        Ok(done)
    }
}

/// Transport errors are retried, except those that another attempt cannot mend.
fn classify(url: &str, e: ureq::Error) -> Failure {
    match e {
        ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::InvalidProxyUrl
        | ureq::Error::TooManyRedirects
        | ureq::Error::RedirectFailed => Failure::Fatal(FileError::Request {
            url: url.into(),
            error: e.to_string(),
        }),
        other => Failure::Retry(other.to_string()),
    }
}

/// `bytes START-END/TOTAL` or `bytes */TOTAL` as (START, TOTAL); `*` totals are `None`.
fn parse_content_range(v: &str) -> Option<(Option<u64>, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some((start, total))
}

fn length_of(path: &Path) -> Result<u64, FileError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(FileError::Io {
            path: path.into(),
            source,
        }),
    }
}

fn remove(path: &Path) -> Result<(), Failure> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Failure::Fatal(FileError::Io {
            path: path.into(),
            source,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_ranges_parse_as_start_and_total() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((Some(100), Some(200)))
        );
        assert_eq!(
            parse_content_range("bytes */4096"),
            Some((None, Some(4096)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((Some(5), None)));
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }
}
