//! Learning rates per epoch: constant, or a schedule, with an optional linear warm-up.
//!
//! ```toml
//! learning-rate = 1e-4
//! learning-rate = { piecewise = [[1e-3, 6], [1e-4, 9]] }   # (rate, epochs) in turn
//! learning-rate = { step = { initial = 1e-3, gamma = 0.1, every = 5 } }
//! learning-rate = { cosine = { initial = 1e-3, min = 1e-6 } }
//! warmup-epochs = 2                                         # ramps up to the schedule
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a learning rate: a number, or `{ piecewise = [[rate, epochs], ...] }`, `{ step = { initial, gamma, every } }` or `{ cosine = { initial, min } }`"
)]
pub enum LearningRate {
    Constant(f64),
    Schedule(Schedule),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// (rate, epochs) pairs, in order; the last rate holds past their end.
    Piecewise(Vec<(f64, usize)>),
    Step {
        initial: f64,
        gamma: f64,
        every: usize,
    },
    Cosine {
        initial: f64,
        min: f64,
    },
}

impl LearningRate {
    /// The rate of `epoch` (0-based) of `epochs`, warm-up included.
    pub fn at(&self, epoch: usize, epochs: usize, warmup: usize) -> f64 {
        let base = match self {
            LearningRate::Constant(r) => *r,
            LearningRate::Schedule(Schedule::Piecewise(parts)) => {
                let mut end = 0;
                let mut rate = parts.last().map_or(0.0, |p| p.0);
                for &(r, n) in parts {
                    end += n;
                    if epoch < end {
                        rate = r;
                        break;
                    }
                }
                rate
            }
            LearningRate::Schedule(Schedule::Step {
                initial,
                gamma,
                every,
            }) => initial * gamma.powi((epoch / (*every).max(1)) as i32),
            LearningRate::Schedule(Schedule::Cosine { initial, min }) => {
                let t = epoch as f64 / epochs.max(1) as f64;
                min + (initial - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if epoch < warmup {
            base * (epoch + 1) as f64 / (warmup + 1) as f64
        } else {
            base
        }
    }

    /// A short name for tables and node ids: `1e-3`, `piecewise(1e-3x6,1e-4x9)`.
    pub fn label(&self) -> String {
        match self {
            LearningRate::Constant(r) => format!("{r:e}"),
            LearningRate::Schedule(Schedule::Piecewise(p)) => {
                format!(
                    "piecewise({})",
                    p.iter()
                        .map(|(r, n)| format!("{r:e}x{n}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            LearningRate::Schedule(Schedule::Step {
                initial,
                gamma,
                every,
            }) => format!("step({initial:e},{gamma},{every})"),
            LearningRate::Schedule(Schedule::Cosine { initial, min }) => {
                format!("cosine({initial:e},{min:e})")
            }
        }
    }

    pub fn check(&self) -> Option<String> {
        let ok = |r: f64| r > 0.0 && r.is_finite();
        match self {
            LearningRate::Constant(r) if !ok(*r) => Some("a learning rate must be positive".into()),
            LearningRate::Schedule(Schedule::Piecewise(p))
                if p.is_empty() || p.iter().any(|(r, n)| !ok(*r) || *n == 0) =>
            {
                Some("piecewise needs [rate, epochs] pairs with positive rates and epochs".into())
            }
            LearningRate::Schedule(Schedule::Step {
                initial,
                gamma,
                every,
            }) if !ok(*initial) || !ok(*gamma) || *every == 0 => {
                Some("step needs positive `initial`, `gamma` and `every`".into())
            }
            LearningRate::Schedule(Schedule::Cosine { initial, min })
                if !ok(*initial) || *min < 0.0 || min > initial =>
            {
                Some("cosine needs 0 <= `min` <= `initial`".into())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_give_the_expected_rate_per_epoch() {
        let study: LearningRate = toml::from_str::<toml::Table>(
            "lr = { piecewise = [[1e-3, 6], [1e-4, 9]] }",
        )
        .unwrap()["lr"]
            .clone()
            .try_into()
            .unwrap();
        let rates: Vec<f64> = (0..15).map(|e| study.at(e, 15, 0)).collect();
        assert_eq!(rates[..6], [1e-3; 6]);
        assert_eq!(rates[6..], [1e-4; 9]);
        assert_eq!(study.at(20, 15, 0), 1e-4);
        let step = LearningRate::Schedule(Schedule::Step {
            initial: 1.0,
            gamma: 0.5,
            every: 2,
        });
        assert_eq!(
            (0..5).map(|e| step.at(e, 5, 0)).collect::<Vec<_>>(),
            [1.0, 1.0, 0.5, 0.5, 0.25]
        );
        let cos = LearningRate::Schedule(Schedule::Cosine {
            initial: 1.0,
            min: 0.0,
        });
        assert_eq!(cos.at(0, 4, 0), 1.0);
        assert!((cos.at(2, 4, 0) - 0.5).abs() < 1e-12);
        let c = LearningRate::Constant(1e-4);
        assert_eq!(c.at(0, 10, 3), 1e-4 / 4.0);
        assert_eq!(c.at(3, 10, 3), 1e-4);
        assert_eq!(study.label(), "piecewise(1e-3x6,1e-4x9)");
        assert_eq!(c.label(), "1e-4");
    }
}
