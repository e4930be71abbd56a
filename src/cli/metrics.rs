//! `kpipe report` and `kpipe metrics`: where the pipeline's latest report is, and the
//! metrics of its latest evaluate and sweep results, read from the lock file and the cache.

use std::io::Write;
use std::path::PathBuf;

use super::args::{GlobalArgs, MetricsArgs, PipelineArgs};
use super::util::{load, print_flat, print_json};
use super::{CliError, advise, exit};
use crate::cache::{Cache, LockFile};
use crate::graph::Plan;

/// A line `node: path/report.html` per report node.
pub(super) fn report(
    pipeline: &PipelineArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let plan = load(pipeline)?;
    let cache = Cache::open(&global.cache_dir)?;
    let found = latest_outputs(&plan, &cache, "report");
    if found.is_empty() {
        return Err(advise(
            format!("no report of `{}` in the cache", pipeline.file.display()),
            "run the pipeline first",
        ));
    }
    for (id, dir) in found {
        writeln!(out, "{id}: {}", dir.join("report.html").display())?;
    }
    Ok(exit::OK)
}

/// Each evaluate node's summary and each sweep node's arms, as a listing or JSON.
pub(super) fn metrics(
    args: &MetricsArgs,
    global: &GlobalArgs,
    out: &mut impl Write,
) -> Result<i32, CliError> {
    let plan = load(&args.pipeline)?;
    let cache = Cache::open(&global.cache_dir)?;
    let mut all = serde_json::Map::new();
    for (id, dir) in latest_outputs(&plan, &cache, "evaluate") {
        if let Ok(v) = std::fs::read_to_string(dir.join("summary.json"))
            .map(|t| serde_json::from_str::<serde_json::Value>(&t))
        {
            all.insert(id, v.unwrap_or_default());
        }
    }
    for (id, dir) in latest_outputs(&plan, &cache, "sweep") {
        if let Ok(file) = crate::stages::sweep::SweepFile::read(&dir) {
            let wall: serde_json::Value =
                std::fs::read_to_string(dir.join("volatile/wall_time.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default();
            let arms: serde_json::Map<String, serde_json::Value> = file
                .arms
                .iter()
                .map(|a| (a.id.clone(), serde_json::json!({"kept": a.best, "kept_epoch": a.best_epoch, "kept_val_iou": a.kept.val_iou, "kept_dice_kidney": a.kept.dice_kidney, "kept_dice_tumor": a.kept.dice_tumor, "final_val_iou": a.last.val_iou, "selected": a.selected, "wall_time_s": wall[&a.id]})))
                .collect();
            all.insert(
                id,
                serde_json::json!({"metric": file.select.metric, "arms": arms}),
            );
        }
    }
    if all.is_empty() {
        return Err(advise(
            format!(
                "no evaluate or sweep results of `{}` in the cache",
                args.pipeline.file.display()
            ),
            "run the pipeline first",
        ));
    }
    if args.json {
        print_json(out, &all)?;
    } else {
        for (id, v) in &all {
            writeln!(out, "{id}")?;
            print_flat(out, "  ", v)?;
        }
    }
    Ok(exit::OK)
}

/// The artifact directories of the pipeline's nodes of `kind`, as the lock file records them.
fn latest_outputs(plan: &Plan, cache: &Cache, kind: &str) -> Vec<(String, PathBuf)> {
    let lock = LockFile::read(&LockFile::path_for(
        &plan.spec.file,
        plan.spec.profile.as_deref(),
    ))
    .unwrap_or_default();
    lock.nodes
        .iter()
        .filter(|(_, r)| r.kind == kind)
        .filter_map(|(id, r)| cache.peek(&r.key).map(|e| (id.clone(), e.out())))
        .collect()
}
