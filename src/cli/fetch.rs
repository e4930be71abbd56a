//! `kpipe fetch kits19`: indicatif bars for the downloads (one per file in flight and a
//! total), and the summary on stdout. Its arguments are in `args.rs`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::args::{FetchCommand, GlobalArgs};
use super::util::progress_bars;
use super::{CliError, exit, usage};
use crate::fetch::{CaseStatus, FetchEvent, FetchOptions, FetchReporter, FileOutcome};

/// Runs `kpipe fetch ...`; returns the exit code.
pub(super) fn run(
    cmd: &FetchCommand,
    global: &GlobalArgs,
    stdout: &mut impl Write,
) -> Result<i32, CliError> {
    let FetchCommand::Kits19(args) = cmd;
    let opts = FetchOptions {
        out: args.out.clone(),
        cases: args.cases.0.clone(),
        imaging_url: args.imaging_url.clone(),
        segmentation_url: args.segmentation_url.clone(),
        jobs: args.jobs.max(1),
        retries: args.retries,
        retry_wait: args.retry_wait,
    };
    let bars = FetchBars::new(progress_bars(global), opts.cases.len() * 2 + 1);
    let summary = crate::fetch::fetch_kits19(&opts, &bars).map_err(|e| match e {
        crate::fetch::FetchError::Io { ref source, .. } => {
            CliError::Output(std::io::Error::new(source.kind(), e.to_string()))
        }
        crate::fetch::FetchError::Url(_) => usage(e.to_string()),
    })?;
    bars.finish();
    for case in &summary.cases {
        if case.status != CaseStatus::Failed {
            continue;
        }
        let mut problems = Vec::new();
        for (what, outcome) in [
            ("segmentation", &case.segmentation),
            ("imaging", &case.imaging),
        ] {
            if let FileOutcome::Failed(e) = outcome {
                problems.push(format!("{what}: {e}"));
            }
        }
        if let Some(e) = &case.error {
            problems.push(e.to_string());
        }
        writeln!(stdout, "failed  {}  {}", case.id, problems.join("; "))?;
    }
    if let FileOutcome::Failed(e) = &summary.kits_json {
        writeln!(stdout, "failed  kits.json  {e}")?;
    }
    writeln!(
        stdout,
        "{} cases: {} fetched, {} skipped (already there and valid), {} failed",
        summary.cases.len(),
        summary.count(CaseStatus::Fetched),
        summary.count(CaseStatus::Skipped),
        summary.count(CaseStatus::Failed),
    )?;
    match &summary.listed {
        Ok(n) => writeln!(
            stdout,
            "`{}` lists the {n} cases present",
            opts.out.join("kits.json").display()
        )?,
        Err(why) => writeln!(stdout, "kits.json {why}")?,
    }
    Ok(if summary.complete() {
        exit::OK
    } else {
        exit::STAGE_FAILED
    })
}

/// Bars on stderr when it is a terminal; otherwise a line per downloaded, failed or
/// retried file.
struct FetchBars {
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
    files: Mutex<HashMap<String, ProgressBar>>,
    bytes: AtomicU64,
}

impl FetchBars {
    fn new(show: bool, files: usize) -> FetchBars {
        let multi = show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let total = multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(files as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} {wide_bar} {pos}/{len} files {msg} [{elapsed}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix("total");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        FetchBars {
            multi,
            total,
            files: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
        }
    }

    fn line(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Ok(mut files) = self.files.lock() {
            for (_, bar) in files.drain() {
                bar.finish_and_clear();
            }
        }
        if let Some(total) = &self.total {
            total.finish_and_clear();
        }
    }
}

impl FetchReporter for FetchBars {
    fn event(&self, event: FetchEvent<'_>) {
        match event {
            FetchEvent::Started { file, total, from } => {
                if from > 0 {
                    self.line(format!("  resume  {file} at {}", HumanBytes(from)));
                }
                let Some(m) = &self.multi else { return };
                let bar = match total {
                    Some(t) => m.insert_from_back(1, ProgressBar::new(t)),
                    None => m.insert_from_back(1, ProgressBar::new_spinner()),
                };
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_prefix(file.to_string());
                bar.set_position(from);
                if let Ok(mut files) = self.files.lock()
                    && let Some(old) = files.insert(file.to_string(), bar)
                {
                    old.finish_and_clear();
                    m.remove(&old);
                }
            }
            FetchEvent::Progress { file, done } => {
                if let Some(bar) = self.files.lock().ok().and_then(|f| f.get(file).cloned()) {
                    let added = done.saturating_sub(bar.position());
                    bar.set_position(done);
                    let all = self.bytes.fetch_add(added, Ordering::Relaxed) + added;
                    if let Some(total) = &self.total {
                        total.set_message(format!("{} downloaded", HumanBytes(all)));
                    }
                }
            }
            FetchEvent::Retry {
                file,
                attempt,
                wait,
                error,
            } => self.line(format!(
                "   retry  {file} in {:.1}s (failed attempt {attempt}): {error}",
                wait.as_secs_f64()
            )),
            FetchEvent::Finished { file, outcome } => {
                if let Some(bar) = self.files.lock().ok().and_then(|mut f| f.remove(file)) {
                    bar.finish_and_clear();
                    if let Some(m) = &self.multi {
                        m.remove(&bar);
                    }
                }
                if let Some(total) = &self.total {
                    total.inc(1);
                }
                match outcome {
                    FileOutcome::Fetched { bytes } => {
                        self.line(format!(" fetched  {file} ({})", HumanBytes(*bytes)));
                    }
                    FileOutcome::Present => {}
                    FileOutcome::Failed(e) => self.line(format!("  failed  {file}: {e}")),
                }
            }
        }
    }
}
