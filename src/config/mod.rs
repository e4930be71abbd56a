//! Pipeline files: from TOML text to a validated [`PipelineSpec`].
//!
//! Loading runs in passes, each with its own type:
//!
//! 1. [`document`]: the TOML file is parsed with spans kept for every key and value;
//!    the chosen `[profiles.<name>]` table and each `--set key=value` are merged over it.
//!    The result is a plain [`toml::Table`] plus a map from dotted paths to source
//!    locations.
//! 2. [`spec`]: the merged table is checked against the schema of the pipeline header and
//!    of each stage kind (unknown keys, wrong types, bad values, unknown references) and
//!    becomes a [`PipelineSpec`] of typed stage parameters.
//! 3. [`crate::graph`] compiles the spec into a DAG and reports cycles.
//!
//! Every pass collects all the problems it finds; [`ConfigError`] renders them together,
//! each with `file:line:column` and a caret under the culprit.

mod cycles;
mod diagnostics;
pub mod document;
mod resources;
pub mod spec;
mod sweep;

pub use diagnostics::{ConfigError, Located, Sources};
pub use document::{Document, Override};
pub use resources::Resources;
pub use spec::{PipelineSpec, StageSpec, load};

/// The pipeline format version this kpipe reads (`[pipeline] version`).
pub const FORMAT_VERSION: i64 = 1;
