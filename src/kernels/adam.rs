//! One Adam step over a parameter tensor in a single parallel pass: burn's `Adam`
//! arithmetic, operation by operation in f32 (so the same bits), where burn runs it as a
//! dozen separate whole-tensor operations, each on one thread for the small tensors of
//! weights (5% of a 64x64 U-Net training step on two threads).

use rayon::prelude::*;

use super::isa::wide;
use super::{Shared, filled};

/// Floats a work item takes at least.
const MIN_FLOATS: usize = 16 * 1024;

/// The step's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    /// The step's number, from 1: bias corrections.
    pub time: i32,
}

/// A step's constants.
#[derive(Clone, Copy)]
struct Coefs {
    s: Settings,
    /// 1 - beta_1, 1 - beta_2
    f1: f32,
    f2: f32,
    /// sqrt(1 - beta_2^t) / (1 - beta_1^t)
    combined: f32,
    /// epsilon sqrt(1 - beta_2^t)
    eps: f32,
}

impl Coefs {
    /// The step over slices of one length, into `(param, moment_1, moment_2)`: no branch
    /// in the loops, so they vectorise.
    #[inline(always)]
    fn update(
        &self,
        param: &[f32],
        grad: &[f32],
        moments: Option<(&[f32], &[f32])>,
        (po, m1o, m2o): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let (s, n) = (self.s, param.len());
        let mut put = |i: usize, a: f32, b: f32| {
            m1o[i] = a;
            m2o[i] = b;
            po[i] = param[i] - ((a * self.combined) / (b.sqrt() + self.eps)) * s.lr;
        };
        // burn: m1 * b1 + g * (1 - b1); m2 * b2 + g^2 * (1 - b2); from zeros the first
        // products alone.
        match moments {
            Some((m1, m2)) => {
                let (m1, m2, grad) = (&m1[..n], &m2[..n], &grad[..n]);
                for i in 0..n {
                    let g = grad[i];
                    put(
                        i,
                        m1[i] * s.beta_1 + g * self.f1,
                        m2[i] * s.beta_2 + (g * g) * self.f2,
                    );
                }
            }
            None => {
                for (i, &g) in grad[..n].iter().enumerate() {
                    put(i, g * self.f1, (g * g) * self.f2);
                }
            }
        }
    }
}

/// `(param, moment_1, moment_2)` after a step with gradient `grad` from the moments
/// (`None` before the first step: zeros, as burn starts them).
pub fn step(
    param: &[f32],
    grad: &[f32],
    moments: Option<(&[f32], &[f32])>,
    s: Settings,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = param.len();
    assert_eq!(grad.len(), len, "gradient and parameter differ in size");
    if let Some((m1, m2)) = moments {
        assert!(
            m1.len() == len && m2.len() == len,
            "moments and parameter differ in size"
        );
    }
    let bc2 = (1.0 - s.beta_2.powi(s.time)).sqrt();
    let k = Coefs {
        s,
        f1: 1.0 - s.beta_1,
        f2: 1.0 - s.beta_2,
        combined: bc2 / (1.0 - s.beta_1.powi(s.time)),
        eps: s.epsilon * bc2,
    };
    let (mut m1o, mut m2o) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let (p1, p2) = (Shared(m1o.as_mut_ptr()), Shared(m2o.as_mut_ptr()));
    let run = |po: Shared| {
        (0..len.div_ceil(MIN_FLOATS)).into_par_iter().for_each(|c| {
            let r = c * MIN_FLOATS..((c + 1) * MIN_FLOATS).min(len);
            let (n, at) = (r.len(), r.start);
            // SAFETY: elements `r` of the three outputs (`len` floats each), written by
            // this item alone.
            let out = unsafe {
                (
                    std::slice::from_raw_parts_mut(po.ptr().add(at), n),
                    std::slice::from_raw_parts_mut(p1.ptr().add(at), n),
                    std::slice::from_raw_parts_mut(p2.ptr().add(at), n),
                )
            };
            let (param, grad) = (&param[r.clone()], &grad[r.clone()]);
            let moments = moments.map(|(m1, m2)| (&m1[r.clone()], &m2[r]));
            wide(
                #[inline(always)]
                || k.update(param, grad, moments, out),
            );
        });
    };
    // SAFETY: the items cover 0..len, each element of the three written once.
    let p = unsafe { filled(len, run) };
    // SAFETY: as above: every element of both moments was written.
    unsafe {
        m1o.set_len(len);
        m2o.set_len(len);
    }
    (p, m1o, m2o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::values;

    #[test]
    fn a_step_is_burns_arithmetic_in_order() {
        let (p, g) = (values(40_000, 1), values(40_000, 2));
        let s = Settings {
            lr: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            time: 1,
        };
        let (p1, m1, m2) = step(&p, &g, None, s);
        let t2 = Settings { time: 2, ..s };
        let (p2, n1, n2) = step(&p1, &g, Some((&m1, &m2)), t2);
        for i in [0, 17, 39_999] {
            let a = g[i] * (1.0 - 0.9);
            let b = (g[i] * g[i]) * (1.0 - 0.999);
            assert_eq!((m1[i], m2[i]), (a, b));
            let bc2 = (1.0f32 - 0.999f32.powi(2)).sqrt();
            let a2 = a * 0.9 + g[i] * (1.0 - 0.9);
            let b2 = b * 0.999 + (g[i] * g[i]) * (1.0 - 0.999);
            assert_eq!((n1[i], n2[i]), (a2, b2));
            let upd = (a2 * (bc2 / (1.0 - 0.9f32.powi(2)))) / (b2.sqrt() + 1e-7 * bc2);
            assert_eq!(p2[i], p1[i] - upd * 1e-3);
        }
        // A first step moves each parameter by about the learning rate, against its
        // gradient.
        assert!(
            p.iter().zip(&p1).zip(&g).all(|((a, b), g)| {
                g.abs() < 1e-3 || ((a - b) * g.signum() - 1e-3).abs() < 1e-4
            })
        );
    }
}
