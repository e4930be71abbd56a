//! `kind = "split"`: cases into `train`, `test` and `eval` parts, by case, never by slice.
//!
//! ```toml
//! [stages.split]
//! kind = "split"
//! input = "load"            # a case table (load) or a slice store (slice)
//! ratios = [0.7, 0.2, 0.1]  # train : test : eval, summing to 1
//! stratify = "tumor"        # "none", "tumor" (has tumor) or "tumor-size" (terciles)
//! ```
//!
//! Downstream stages reference `split.train`, `split.test` and `split.eval`. Part sizes
//! follow the largest-remainder rule; every part gets at least one case, or the stage
//! fails. The shuffle is seeded by the stage seed.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::{CheckContext, ParamIssue, RunContext, Stage, StageError, StageRef};
use crate::data::kits::CaseTable;
use crate::data::slices::SliceMeta;

pub const PARTS: [&str; 3] = ["train", "test", "eval"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Stratify {
    None,
    #[default]
    Tumor,
    TumorSize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Split {
    pub input: StageRef,
    #[serde(default = "default_ratios")]
    pub ratios: [f64; 3],
    #[serde(default)]
    pub stratify: Stratify,
}

fn default_ratios() -> [f64; 3] {
    [0.7, 0.2, 0.1]
}

/// `split.json`: the case ids of each part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitFile {
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub eval: Vec<String>,
}

impl SplitFile {
    pub const FILE: &'static str = "split.json";

    pub fn read(artifact: &Path) -> Result<SplitFile, StageError> {
        let path = artifact.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
        serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("`{}`: {e}", path.display())))
    }

    /// The case ids of a part by name (`train`, `test`, `eval`).
    pub fn part(&self, name: &str) -> Option<&[String]> {
        match name {
            "train" => Some(&self.train),
            "test" => Some(&self.test),
            "eval" => Some(&self.eval),
            _ => None,
        }
    }
}

impl Stage for Split {
    const KIND: &'static str = "split";
    const OUTPUTS: &'static [&'static str] = &PARTS;

    fn check(&self, _: &CheckContext) -> Vec<ParamIssue> {
        let sum: f64 = self.ratios.iter().sum();
        let mut issues = Vec::new();
        if self
            .ratios
            .iter()
            .any(|r| r.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater))
        {
            issues.push(ParamIssue::new("ratios", "every ratio must be positive"));
        } else if (sum - 1.0).abs() > 1e-6 {
            issues.push(ParamIssue::new(
                "ratios",
                format!("ratios sum to {sum}, not 1"),
            ));
        }
        issues
    }

    fn inputs(&self) -> Vec<(String, &StageRef)> {
        vec![("input".into(), &self.input)]
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let input = ctx.input(&self.input)?;
        let cases = read_cases(input)?;
        if self.stratify == Stratify::TumorSize && cases.iter().any(|c| c.2.is_none()) {
            return Err(StageError::Failed(
                "`stratify = \"tumor-size\"` needs a case table (a load stage) as input".into(),
            ));
        }
        let split = split_cases(&cases, self.ratios, self.stratify, ctx.seed)?;
        let path = ctx.out.join(SplitFile::FILE);
        let text =
            serde_json::to_string_pretty(&split).map_err(|e| StageError::Failed(e.to_string()))?;
        std::fs::write(&path, text).map_err(StageError::io("write", &path))?;
        tracing::info!(
            train = split.train.len(),
            test = split.test.len(),
            eval = split.eval.len(),
            "split"
        );
        Ok(())
    }
}

/// (id, has tumor, tumor voxels) of each case, from a case table or a slice store.
fn read_cases(dir: &Path) -> Result<Vec<(String, bool, Option<u64>)>, StageError> {
    if dir.join(CaseTable::FILE).exists() {
        let t = CaseTable::read(dir).map_err(|e| StageError::Other(Box::new(e)))?;
        return Ok(t
            .cases
            .iter()
            .map(|c| (c.id.clone(), c.has_tumor(), Some(c.label_counts[2])))
            .collect());
    }
    let path = dir.join(SliceMeta::FILE);
    let text = std::fs::read_to_string(&path).map_err(StageError::io("read", &path))?;
    let meta: SliceMeta =
        serde_json::from_str(&text).map_err(|e| StageError::Failed(e.to_string()))?;
    Ok(meta
        .cases
        .iter()
        .map(|c| (c.id.clone(), c.has_tumor, None))
        .collect())
}

/// Splits cases by the ratios, stratified, seeded.
pub fn split_cases(
    cases: &[(String, bool, Option<u64>)],
    ratios: [f64; 3],
    stratify: Stratify,
    seed: u64,
) -> Result<SplitFile, StageError> {
    let n = cases.len();
    if n < 3 {
        return Err(StageError::Failed(format!(
            "{n} cases cannot be split into 3 non-empty parts"
        )));
    }
    // Strata, each shuffled, concatenated; then each position goes to the part furthest
    // behind its target share, so every stratum spreads over the parts in proportion.
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut sizes: Vec<u64> = cases
        .iter()
        .filter_map(|c| c.2)
        .filter(|&s| s > 0)
        .collect();
    sizes.sort_unstable();
    let tercile = |s: u64| -> usize {
        if s == 0 || sizes.is_empty() {
            return 0;
        }
        1 + (sizes.partition_point(|&x| x < s) * 3 / sizes.len()).min(2)
    };
    let stratum = |c: &(String, bool, Option<u64>)| -> usize {
        match stratify {
            Stratify::None => 0,
            Stratify::Tumor => usize::from(c.1),
            Stratify::TumorSize => tercile(c.2.unwrap_or(0)),
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| cases[a].0.cmp(&cases[b].0));
    order.shuffle(&mut rng);
    order.sort_by_key(|&i| stratum(&cases[i]));
    let targets = part_sizes(n, ratios)?;
    let mut parts: [Vec<String>; 3] = Default::default();
    for (pos, &i) in order.iter().enumerate() {
        let p = (0..3)
            .filter(|&p| parts[p].len() < targets[p])
            .max_by(|&a, &b| {
                let deficit = |p: usize| ratios[p] * (pos + 1) as f64 - parts[p].len() as f64;
                deficit(a).total_cmp(&deficit(b)).then(b.cmp(&a))
            })
            .expect("targets sum to n");
        parts[p].push(cases[i].0.clone());
    }
    for p in &mut parts {
        p.sort();
    }
    let [train, test, eval] = parts;
    Ok(SplitFile { train, test, eval })
}

/// Largest-remainder part sizes, each at least 1.
fn part_sizes(n: usize, ratios: [f64; 3]) -> Result<[usize; 3], StageError> {
    let exact = ratios.map(|r| r * n as f64);
    let mut sizes = exact.map(|e| e.floor() as usize);
    let mut rest: Vec<usize> = (0..3).collect();
    rest.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let mut left = n - sizes.iter().sum::<usize>();
    for &p in rest.iter().cycle() {
        if left == 0 {
            break;
        }
        sizes[p] += 1;
        left -= 1;
    }
    while let Some(empty) = sizes.iter().position(|&s| s == 0) {
        let largest = (0..3).max_by_key(|&p| sizes[p]).expect("3 parts");
        if sizes[largest] <= 1 {
            return Err(StageError::Failed(format!(
                "{n} cases cannot give every part a case"
            )));
        }
        sizes[largest] -= 1;
        sizes[empty] += 1;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases(n: usize) -> Vec<(String, bool, Option<u64>)> {
        (0..n)
            .map(|i| {
                (
                    format!("case_{i:05}"),
                    i % 5 != 0,
                    Some(if i % 5 == 0 {
                        0
                    } else {
                        (i * 37 % 100) as u64 + 1
                    }),
                )
            })
            .collect()
    }

    #[test]
    fn sizes_follow_the_ratios() {
        assert_eq!(part_sizes(210, [0.7, 0.2, 0.1]).unwrap(), [147, 42, 21]);
        assert_eq!(part_sizes(10, [0.7, 0.2, 0.1]).unwrap(), [7, 2, 1]);
        assert_eq!(part_sizes(3, [0.7, 0.2, 0.1]).unwrap(), [1, 1, 1]);
        assert_eq!(
            part_sizes(24, [0.7, 0.2, 0.1])
                .unwrap()
                .iter()
                .sum::<usize>(),
            24
        );
    }

    #[test]
    fn splits_are_disjoint_complete_seeded_and_stratified() {
        let c = cases(50);
        let a = split_cases(&c, [0.7, 0.2, 0.1], Stratify::Tumor, 7).unwrap();
        let b = split_cases(&c, [0.7, 0.2, 0.1], Stratify::Tumor, 7).unwrap();
        assert_eq!(a, b);
        let other = split_cases(&c, [0.7, 0.2, 0.1], Stratify::Tumor, 8).unwrap();
        assert_ne!(a, other);
        let mut all: Vec<String> = a
            .train
            .iter()
            .chain(&a.test)
            .chain(&a.eval)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
        assert_eq!((a.train.len(), a.test.len(), a.eval.len()), (35, 10, 5));
        // 10 tumor-free cases: 7 / 2 / 1 of them in train / test / eval
        let free = |p: &[String]| {
            p.iter()
                .filter(|id| c.iter().any(|x| &x.0 == *id && !x.1))
                .count()
        };
        assert_eq!((free(&a.train), free(&a.test), free(&a.eval)), (7, 2, 1));
    }

    #[test]
    fn too_few_cases_is_an_error() {
        assert!(split_cases(&cases(2), [0.7, 0.2, 0.1], Stratify::None, 1).is_err());
    }
}
