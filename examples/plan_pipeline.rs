//! Load a pipeline with the library API and print what a run would do.
//!
//! ```sh
//! cargo run --example plan_pipeline -- tests/fixtures/pipelines/ok/three_stages.toml
//! ```

// An example prints its result.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use kpipe::cache::Cache;
use kpipe::config;
use kpipe::exec::preview;
use kpipe::graph::Plan;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file: PathBuf = std::env::args()
        .nth(1)
        .ok_or("usage: plan_pipeline PIPELINE.toml")?
        .into();
    let spec = config::load(&file, None, &[])?;
    let plan = Plan::new(spec);
    let cache = Cache::open(&std::env::temp_dir().join("kpipe-example-cache"))?;
    for node in preview(&plan, &cache)? {
        println!(
            "{:<12} {:<10} {:?} {}",
            node.id,
            node.kind,
            node.status,
            node.reason.unwrap_or_default()
        );
    }
    Ok(())
}
