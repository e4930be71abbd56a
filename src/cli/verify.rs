//! `kpipe verify`: recompute a pipeline from scratch and compare every output with its
//! lock file, or (`--cache`) re-hash every entry of the cache.

use std::io::Write;

use super::args::{GlobalArgs, PipelineArgs, VerifyArgs};
use super::util::{load, progress_bars};
use super::{CliError, advise, exit, progress};
use crate::cache::{Cache, LockFile};
use crate::exec::RunOptions;
use crate::verify::{NodeCheck, Verdict};

/// A row per node (or entry) and a tally; the exit code says whether anything mismatched,
/// was not in the lock file, or failed.
pub(super) fn run(
    args: &VerifyArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let store = Cache::open(&global.cache_dir)?;
    if args.cache {
        return verify_cache(&store, out);
    }
    let pipeline = PipelineArgs {
        file: args.file.clone().unwrap_or_default(),
        profile: args.profile.clone(),
        set: args.set.clone(),
    };
    let plan = load(&pipeline)?;
    let lock_path = LockFile::path_for(&plan.spec.file, plan.spec.profile.as_deref());
    if !lock_path.is_file() {
        return Err(advise(
            format!("no lock file `{}` to verify against", lock_path.display()),
            format!(
                "run the pipeline first (`kpipe run {}{}`), or check out the lock file that came with it",
                pipeline.file.display(),
                pipeline
                    .profile
                    .as_deref()
                    .map(|p| format!(" --profile {p}"))
                    .unwrap_or_default()
            ),
        ));
    }
    let mut opts = RunOptions::default();
    if let Some(j) = args.jobs {
        opts.jobs = j.max(1);
    }
    let gpu_tolerance = args.gpu_tolerance;
    let reporter = progress::TermReporter::new(progress_bars(global));
    let checks = crate::verify::verify_pipeline(&plan, &store, &opts, &reporter, gpu_tolerance)?;
    reporter.finish();
    let width = checks.iter().map(|c| c.id.len()).max().unwrap_or(4);
    writeln!(
        out,
        "{:<width$}  {:<9} {:<12}  {:<12}  result",
        "node", "kind", "locked", "recomputed"
    )?;
    for c in &checks {
        let short = |d: &Option<String>| {
            d.as_deref()
                .map_or("-".to_string(), |d| d[..12].to_string())
        };
        writeln!(
            out,
            "{:<width$}  {:<9} {:<12}  {:<12}  {}",
            c.id,
            c.kind,
            short(&c.locked),
            short(&c.actual),
            verdict_text(c)
        )?;
    }
    let count = |v: Verdict| checks.iter().filter(|c| c.verdict == v).count();
    let mismatches = count(Verdict::Mismatch);
    let unlocked = count(Verdict::Unlocked);
    let failed = count(Verdict::Failed);
    let tolerated = count(Verdict::Tolerated);
    let tolerated = if tolerated > 0 {
        format!(" ({tolerated} within GPU tolerance {gpu_tolerance})")
    } else {
        String::new()
    };
    let passed = checks.iter().filter(|c| c.passed()).count();
    writeln!(
        out,
        "{} nodes: {passed} match{tolerated}, {mismatches} mismatch, {unlocked} not in the lock file, {failed} failed",
        checks.len(),
    )?;
    if unlocked > 0 {
        eprintln!(
            "error: {unlocked} node(s) have no record in `{}`: nothing to verify them against\nhint: the lock file is older than the pipeline; run it (`kpipe run`) where its results are trusted and commit the lock file",
            lock_path.display()
        );
    }
    Ok(if mismatches > 0 || unlocked > 0 {
        exit::CORRUPT
    } else if failed > 0 {
        exit::STAGE_FAILED
    } else {
        exit::OK
    })
}

/// `--cache`: a row per entry, `ok` or its problem.
fn verify_cache(store: &Cache, out: &mut impl Write) -> Result<i32, CliError> {
    let rows = crate::verify::verify_cache(store)?;
    let bad = rows.iter().filter(|r| r.2.is_some()).count();
    for (key, stage, problem) in &rows {
        writeln!(
            out,
            "{}  {:<28} {}",
            &key[..12],
            stage,
            problem.as_deref().unwrap_or("ok")
        )?;
    }
    writeln!(out, "{} entries, {bad} corrupt", rows.len())?;
    Ok(if bad > 0 { exit::CORRUPT } else { exit::OK })
}

/// The result column of a node's row.
fn verdict_text(c: &NodeCheck) -> String {
    match c.verdict {
        Verdict::Match => "match".to_string(),
        Verdict::Tolerated => match c.drift {
            Some(d) => format!("within GPU tolerance (max drift {d:.4})"),
            None => "within GPU tolerance (its inputs were)".into(),
        },
        Verdict::Mismatch => match c.drift {
            Some(d) => format!("MISMATCH (GPU metrics drift {d:.4})"),
            None => "MISMATCH".into(),
        },
        Verdict::Unlocked => "NOT IN LOCK FILE".into(),
        Verdict::Failed => "FAILED".into(),
    }
}
