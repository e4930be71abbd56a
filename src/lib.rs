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
pub mod metrics;
pub mod models;
pub mod predict;
pub mod stages;
pub mod train;
pub mod verify;
