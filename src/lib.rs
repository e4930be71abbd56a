//! kpipe: declarative pipelines for kidney and kidney-tumor segmentation on abdominal CT.
//!
//! A TOML file describes stages; kpipe checks it ([`config`]), compiles it into a DAG
//! ([`graph`]), and runs what is not already in the content-addressed [`cache`] with the
//! [`exec`]utor. Each stage kind lives in [`stages`]. The binary is a thin shell over
//! [`cli`].

pub mod backend;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod config;
pub mod data;
pub mod exec;
pub mod fetch;
pub mod figures;
pub mod files;
pub mod graph;
pub mod hint;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod predict;
pub mod schema;
pub mod slurm;
pub mod stages;
pub mod train;
pub mod verify;

/// The layers, lowest first: a module may use only the modules before it.
#[cfg(test)]
const LAYERS: &[&str] = &[
    "kernels", "files", "hint", "schema", "backend", "figures", "cache", "data", "metrics",
    "models", "train", "predict", "stages", "config", "graph", "exec", "slurm", "verify", "fetch",
    "bench", "cli",
];

#[cfg(test)]
mod layers {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The top-level modules that the code (not the comments) of `path` names as `crate::x`.
    fn uses(path: &Path, found: &mut BTreeSet<String>) {
        for e in walkdir::WalkDir::new(path).into_iter().flatten() {
            if !e.file_type().is_file() {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let rest = &line[i + "crate::".len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    found.insert(name);
                }
            }
        }
    }

    #[test]
    fn modules_use_only_the_layers_below_them() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut wrong = Vec::new();
        for (i, module) in super::LAYERS.iter().enumerate() {
            let dir = src.join(module);
            let path = if dir.is_dir() {
                dir
            } else {
                src.join(format!("{module}.rs"))
            };
            assert!(path.exists(), "layer `{module}` has no source");
            let mut found = BTreeSet::new();
            uses(&path, &mut found);
            for name in found.iter().filter(|n| n.as_str() != *module) {
                if name.is_empty() {
                    wrong.push(format!(
                        "{module}: one `use` per module, not `crate::{{...}}`"
                    ));
                    continue;
                }
                match super::LAYERS.iter().position(|l| l == name) {
                    Some(j) if j < i => {}
                    Some(_) => wrong.push(format!("{module} uses {name}, a layer above it")),
                    None => wrong.push(format!("{module} uses {name}, which is in no layer")),
                }
            }
        }
        // Every module of lib.rs has its place.
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        for line in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
            let name = line.trim_end_matches(';');
            if !super::LAYERS.contains(&name) {
                wrong.push(format!("module {name} is in no layer"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
