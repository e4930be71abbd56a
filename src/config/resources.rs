//! `resources` on any stage: what a Slurm job of the stage asks for.
//!
//! ```toml
//! [profiles.cluster.stages.train]
//! resources = { cpus = 8, mem = "32G", time = "12:00:00", gpus = 1, partition = "gpu" }
//! ```
//!
//! Not part of the cache key: where a stage runs does not change what it computes. Train
//! stages with `backend = "gpu"` ask for one GPU unless `gpus` says otherwise.

use serde::{Deserialize, Serialize};

use crate::schema::ParamIssue;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resources {
    /// `--cpus-per-task`.
    pub cpus: Option<u32>,
    /// `--mem`: a size with an optional unit, `"32G"`, `"500M"`.
    pub mem: Option<String>,
    /// `--time`: Slurm's forms, `"90"` (minutes), `"12:00:00"`, `"1-12:00:00"`.
    pub time: Option<String>,
    /// `--gres=gpu:N`.
    pub gpus: Option<u32>,
    pub partition: Option<String>,
}

impl Resources {
    pub fn check(&self) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if let Some(m) = &self.mem
            && !is_size(m)
        {
            issues.push(
                ParamIssue::new("mem", format!("`{m}` is not a memory size"))
                    .hint("hint: a number with an optional unit K, M, G or T: `\"32G\"`"),
            );
        }
        if let Some(t) = &self.time
            && !is_time(t)
        {
            issues.push(
                ParamIssue::new("time", format!("`{t}` is not a Slurm time limit"))
                    .hint("hint: minutes, `\"HH:MM:SS\"` or `\"D-HH:MM:SS\"`"),
            );
        }
        if self.cpus == Some(0) {
            issues.push(ParamIssue::new("cpus", "must be at least 1"));
        }
        issues
    }
}

fn is_size(s: &str) -> bool {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    !digits.is_empty() && digits.len() + 1 >= s.len() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
/// days-hours:minutes:seconds (Slurm's `--time`).
fn is_time(s: &str) -> bool {
    let number = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    days.is_none_or(number)
        && parts.iter().all(|p| number(p))
        && match days {
            Some(_) => (1..=3).contains(&parts.len()),
            None => (1..=3).contains(&parts.len()),
        }
}

#[cfg(test)]
mod tests {
    use super::{is_size, is_time};

    #[test]
    fn sizes_and_times_follow_slurm() {
        for ok in ["32G", "500M", "1024", "2t"] {
            assert!(is_size(ok), "{ok}");
        }
        for bad in ["", "G", "32GB", "3.5G", "-1"] {
            assert!(!is_size(bad), "{bad}");
        }
        for ok in ["90", "90:30", "12:00:00", "1-12", "1-12:30", "2-00:00:00"] {
            assert!(is_time(ok), "{ok}");
        }
        for bad in ["", "12h", "1-", "1:2:3:4", "a:00"] {
            assert!(!is_time(bad), "{bad}");
        }
    }
}
