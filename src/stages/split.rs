//! `kind = "split"`: cases into `train`, `test` and `eval` parts, by case, never by slice.
//!
//! ```toml
//! [stages.split]
//! kind = "split"
//! input = "load"            # a case table (load) or a slice store (slice)
//! ratios = [0.7, 0.2, 0.1]  # train : test : eval, summing to 1
//! stratify = "tumor"        # "none", "tumor" (has tumor) or "tumor-size" (terciles)
//! folds = 5                 # optional: k-fold cross-validation, as nnU-Net's
//! ```
//!
//! Downstream stages reference `split.train`, `split.test` and `split.eval`. Part sizes
//! follow the largest-remainder rule; every part gets at least one case, or the stage
//! fails. The shuffle is seeded by the stage seed.
//!
//! With `folds = k`, `eval` keeps its share (`ratios[2]`) as a held-out set and the other
//! cases are dealt into k stratified folds; a train or evaluate stage with `fold = i`
//! then reads `split.test` as fold i and `split.train` as the other folds (sweep
//! `fold = [0, 1, 2, 3, 4]` for the k runs). Without `fold`, `train`/`test` are fold 0's.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::{CheckContext, Inputs, ParamIssue, RunContext, Stage, StageError, StageRef};
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
    /// k-fold cross-validation over the non-eval cases.
    #[serde(default)]
    pub folds: Option<usize>,
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
    /// With `folds = k`: the k folds of the non-eval cases (`train`/`test` are fold 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<Vec<String>>,
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

    /// The cases a stage reads through `reference` (`split.<part>`, `default` when it
    /// names no part), for cross-validation fold `fold`: its `test` is that fold and its
    /// `train` every other fold.
    pub fn cases(
        &self,
        reference: &StageRef,
        default: &str,
        fold: Option<usize>,
    ) -> Result<Vec<String>, StageError> {
        let name = reference.port().unwrap_or(default);
        let part = self
            .part(name)
            .ok_or_else(|| StageError::Failed(format!("`{reference}` is not a split part")))?;
        let Some(i) = fold else {
            return Ok(part.to_vec());
        };
        if i >= self.folds.len() {
            return Err(StageError::Failed(format!(
                "`fold = {i}`, but `{}` has {} folds{}",
                reference.stage(),
                self.folds.len(),
                if self.folds.is_empty() {
                    " (give the split stage `folds = k`)"
                } else {
                    ""
                }
            )));
        }
        Ok(match name {
            "test" => self.folds[i].clone(),
            "train" => {
                let mut v: Vec<String> = (0..self.folds.len())
                    .filter(|&f| f != i)
                    .flat_map(|f| self.folds[f].iter().cloned())
                    .collect();
                v.sort();
                v
            }
            _ => part.to_vec(),
        })
    }
}

impl Stage for Split {
    const KIND: &'static str = "split";

    fn key_params(&self) -> serde_json::Value {
        super::omit_unset(
            serde_json::to_value(self).unwrap_or_default(),
            &[("folds", serde_json::Value::Null)],
        )
    }
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
        if self.folds.is_some_and(|k| k < 2) {
            issues.push(ParamIssue::new("folds", "k-fold needs at least 2 folds"));
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
        let split = match self.folds {
            None => split_cases(&cases, self.ratios, self.stratify, ctx.seed)?,
            Some(k) => fold_cases(&cases, self.ratios[2], k, self.stratify, ctx.seed)?,
        };
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
    let order = stratified_order(cases, stratify, seed);
    let targets = part_sizes(n, ratios)?;
    let [train, test, eval] = deal(cases, &order, &ratios, &targets)
        .try_into()
        .expect("3 parts");
    Ok(SplitFile {
        train,
        test,
        eval,
        folds: vec![],
    })
}

/// Cases in stratified, shuffled order: strata each shuffled and concatenated, so
/// dealing them in turn spreads every stratum over the parts in proportion.
fn stratified_order(
    cases: &[(String, bool, Option<u64>)],
    stratify: Stratify,
    seed: u64,
) -> Vec<usize> {
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
    let mut order: Vec<usize> = (0..cases.len()).collect();
    order.sort_by(|&a, &b| cases[a].0.cmp(&cases[b].0));
    order.shuffle(&mut rng);
    order.sort_by_key(|&i| stratum(&cases[i]));
    order
}

/// Deals the cases of `order` into parts of sizes `targets`: each position goes to the
/// part furthest behind its share (`shares`); each part's ids sorted.
fn deal(
    cases: &[(String, bool, Option<u64>)],
    order: &[usize],
    shares: &[f64],
    targets: &[usize],
) -> Vec<Vec<String>> {
    let mut parts = vec![Vec::new(); targets.len()];
    for (pos, &i) in order.iter().enumerate() {
        let p = (0..targets.len())
            .filter(|&p| parts[p].len() < targets[p])
            .max_by(|&a, &b| {
                let deficit = |p: usize| shares[p] * (pos + 1) as f64 - parts[p].len() as f64;
                deficit(a).total_cmp(&deficit(b)).then(b.cmp(&a))
            })
            .expect("targets sum to the case count");
        parts[p].push(cases[i].0.clone());
    }
    for p in &mut parts {
        p.sort();
    }
    parts
}

/// k-fold cross-validation: a held-out `eval` share, the rest in `k` stratified folds
/// of near-equal size; `train`/`test` are fold 0's.
pub fn fold_cases(
    cases: &[(String, bool, Option<u64>)],
    eval_share: f64,
    k: usize,
    stratify: Stratify,
    seed: u64,
) -> Result<SplitFile, StageError> {
    let n = cases.len();
    let n_eval = ((eval_share * n as f64).round() as usize).max(1);
    if k < 2 || n < n_eval + k {
        return Err(StageError::Failed(format!(
            "{n} cases cannot give an eval part and {k} non-empty folds"
        )));
    }
    let order = stratified_order(cases, stratify, seed);
    let rest = n - n_eval;
    let mut shares = vec![(1.0 - eval_share) / k as f64; k];
    shares.push(eval_share);
    let mut targets: Vec<usize> = (0..k)
        .map(|f| rest / k + usize::from(f < rest % k))
        .collect();
    targets.push(n_eval);
    let mut parts = deal(cases, &order, &shares, &targets);
    let eval = parts.pop().expect("eval part");
    let mut file = SplitFile {
        train: vec![],
        test: vec![],
        eval,
        folds: parts,
    };
    file.test = file.folds[0].clone();
    file.train = file.cases(&StageRef("split.train".into()), "train", Some(0))?;
    Ok(file)
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

/// `fold = i` of a stage that reads `split` (at plan time): the split must have
/// `folds = k` with i < k.
pub fn check_fold(fold: Option<usize>, split: &StageRef, input: &Inputs<'_>) -> Vec<ParamIssue> {
    let (Some(i), Some(stage)) = (fold, input(split)) else {
        return vec![];
    };
    if stage.kind() != Split::KIND {
        return vec![]; // not a split: reading its parts fails on its own terms
    }
    match stage
        .params()
        .get("folds")
        .and_then(serde_json::Value::as_u64)
    {
        None => vec![
            ParamIssue::new(
                "fold",
                format!("`fold = {i}`, but `{}` has no folds", split.stage()),
            )
            .hint(format!(
                "hint: give the split stage `folds = k` (k > {i}) for cross-validation"
            )),
        ],
        Some(k) if i as u64 >= k => vec![
            ParamIssue::new(
                "fold",
                format!(
                    "`fold = {i}`, but `{}` has {k} folds (0 to {})",
                    split.stage(),
                    k.saturating_sub(1)
                ),
            )
            .hint(format!(
                "hint: folds are numbered 0 to {}",
                k.saturating_sub(1)
            )),
        ],
        Some(_) => vec![],
    }
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
    fn folds_partition_the_non_eval_cases_and_give_each_fold_its_train_part() {
        let c = cases(23);
        let s = fold_cases(&c, 0.1, 5, Stratify::Tumor, 3).unwrap();
        assert_eq!(s, fold_cases(&c, 0.1, 5, Stratify::Tumor, 3).unwrap());
        assert_eq!(s.eval.len(), 2);
        let sizes: Vec<usize> = s.folds.iter().map(Vec::len).collect();
        assert_eq!(sizes, [5, 4, 4, 4, 4]);
        let mut all: Vec<&String> = s.folds.iter().flatten().chain(&s.eval).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 23, "folds and eval are disjoint and complete");
        let split = StageRef("split".into());
        for f in 0..5 {
            let test = s
                .cases(&StageRef("split.test".into()), "train", Some(f))
                .unwrap();
            let train = s.cases(&split, "train", Some(f)).unwrap();
            assert_eq!(test, s.folds[f]);
            assert_eq!(train.len() + test.len(), 21);
            assert!(
                train
                    .iter()
                    .all(|id| !test.contains(id) && !s.eval.contains(id))
            );
            let eval = s
                .cases(&StageRef("split.eval".into()), "train", Some(f))
                .unwrap();
            assert_eq!(eval, s.eval, "eval is held out from every fold");
        }
        assert_eq!(
            (s.train.clone(), s.test.clone()),
            (
                s.cases(&split, "train", Some(0)).unwrap(),
                s.folds[0].clone()
            )
        );
        let err = s.cases(&split, "train", Some(5)).unwrap_err().to_string();
        assert!(err.contains("has 5 folds"), "{err}");
        let plain = split_cases(&c, [0.7, 0.2, 0.1], Stratify::Tumor, 3).unwrap();
        let err = plain
            .cases(&split, "train", Some(0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("folds = k"), "{err}");
        // stratified: the 5 tumor-free cases spread over the folds
        let free: Vec<usize> = s
            .folds
            .iter()
            .map(|f| {
                f.iter()
                    .filter(|id| c.iter().any(|x| &x.0 == *id && !x.1))
                    .count()
            })
            .collect();
        assert!(
            free.iter().max().unwrap() - free.iter().min().unwrap() <= 1,
            "{free:?}"
        );
        assert!(fold_cases(&cases(5), 0.1, 5, Stratify::Tumor, 3).is_err());
    }

    #[test]
    fn too_few_cases_is_an_error() {
        assert!(split_cases(&cases(2), [0.7, 0.2, 0.1], Stratify::None, 1).is_err());
    }
}
