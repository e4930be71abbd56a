//! `kpipe models`: the study's networks with their trainable and frozen parameter counts.

use std::io::Write;

use super::args::ModelsArgs;
use super::util::print_json;
use super::{CliError, exit};
use crate::models::{ModelConfig, ModelKind};

/// One row per network, as a table or JSON.
pub(super) fn run(args: &ModelsArgs, out: &mut impl Write) -> Result<i32, CliError> {
    let ModelsArgs {
        base,
        in_channels,
        json,
    } = *args;
    let device = crate::backend::cpu();
    let mut rows = Vec::new();
    for kind in ModelKind::ALL {
        let config = ModelConfig {
            kind,
            in_channels,
            base,
            batch_norm: false,
            up_kernel: 2,
            freeze_encoder: true,
        };
        let net = config.init(&device);
        let (trainable, frozen) = crate::models::param_counts(
            &net,
            matches!(kind, ModelKind::Fcn8s | ModelKind::Fcn8sV2),
        );
        rows.push(serde_json::json!({"model": kind.name(), "trainable": trainable, "frozen": frozen, "study_trainable": kind.study_params()}));
    }
    if json {
        print_json(out, &rows)?;
    } else {
        writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>16}   (base {base}, {in_channels} input channel(s); FCN with its VGG16 encoder frozen, as the study)",
            "model", "trainable", "frozen", "study trainable"
        )?;
        for r in &rows {
            let study = r["study_trainable"]
                .as_u64()
                .map_or("-".to_string(), |v| v.to_string());
            writeln!(
                out,
                "{:<10} {:>12} {:>12} {:>16}",
                r["model"].as_str().unwrap_or(""),
                r["trainable"].as_u64().unwrap_or(0),
                r["frozen"].as_u64().unwrap_or(0),
                study
            )?;
        }
    }
    Ok(exit::OK)
}
