//! Adam with its step on kpipe's CPU kernels: burn's `Adam` (same settings, same state,
//! so checkpoints load either way), whose step on burn-flex f32 tensors runs as one
//! parallel pass ([`crate::kernels::adam`], the same bits as burn's dozen operations);
//! elsewhere (the GPU backend, other float types) burn's own step.

use burn::optim::decay::{WeightDecay, WeightDecayConfig};
use burn::optim::{
    AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};

use crate::models::ops;

/// The study's Adam settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    pub betas: [f32; 2],
    pub epsilon: f32,
    /// L2 penalty added to the gradient (0: none).
    pub weight_decay: f32,
}

impl AdamSettings {
    /// burn's configuration of the same optimiser.
    pub fn burn_config(&self) -> AdamConfig {
        let c = AdamConfig::new()
            .with_beta_1(self.betas[0])
            .with_beta_2(self.betas[1])
            .with_epsilon(self.epsilon);
        if self.weight_decay > 0.0 {
            c.with_weight_decay(Some(WeightDecayConfig::new(self.weight_decay)))
        } else {
            c
        }
    }

    /// The optimiser, ready for a module's parameters.
    pub fn init(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(Adam {
            settings: *self,
            decay: (self.weight_decay > 0.0)
                .then(|| WeightDecay::new(&WeightDecayConfig::new(self.weight_decay))),
            burn: self.burn_config().build(),
        })
    }
}

/// The optimiser of [`AdamSettings::init`].
#[derive(Clone)]
struct Adam {
    settings: AdamSettings,
    decay: Option<WeightDecay>,
    burn: burn::optim::Adam,
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let s = &self.settings;
        let momentum = state.as_ref().map(|st| &st.momentum);
        // AMSGrad's extra moment: burn's step (kpipe never turns it on).
        if momentum.is_none_or(|m| m.max_moment_2.is_none()) {
            let time = momentum.map_or(1, |m| m.time + 1);
            let decayed = match &self.decay {
                Some(d) => d.transform(grad.clone(), tensor.clone()),
                None => grad.clone(),
            };
            let moments = momentum.map(|m| (&m.moment_1, &m.moment_2));
            let stepped = ops::adam_step(
                &tensor,
                &decayed,
                moments,
                lr as f32,
                s.betas,
                s.epsilon,
                i32::try_from(time).unwrap_or(i32::MAX),
            );
            if let Some((p, m1, m2)) = stepped {
                let m = AdaptiveMomentumState::new(time, m1, m2);
                return (p, Some(AdamState::new(m)));
            }
        }
        self.burn.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <burn::optim::Adam as Optimizer>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;

    fn bits<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        let v = t.clone().into_data().try_to_vec::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn kernel_steps_are_burns_to_the_bit_with_and_without_weight_decay() {
        let device = Device::flex();
        device.seed(7);
        for weight_decay in [0.0, 1e-4] {
            let settings = AdamSettings {
                betas: [0.9, 0.999],
                epsilon: 1e-7,
                weight_decay,
            };
            let ours = Adam {
                settings,
                decay: (weight_decay > 0.0)
                    .then(|| WeightDecay::new(&WeightDecayConfig::new(weight_decay))),
                burn: settings.burn_config().build(),
            };
            let theirs = settings.burn_config().build();
            let start = Tensor::<2>::random([37, 300], Distribution::Default, &device);
            // The kernel path is the one compared (not burn's step with itself).
            assert!(ops::adam_step(&start, &start, None, 1e-3, [0.9, 0.999], 1e-7, 1).is_some());
            let (mut a, mut b) = (start.clone(), start);
            let (mut sa, mut sb) = (None, None);
            for step in 0..3 {
                let g = Tensor::<2>::random([37, 300], Distribution::Normal(0.0, 0.1), &device);
                (a, sa) = ours.step(1e-3, a, g.clone(), sa);
                (b, sb) = theirs.step(1e-3, b, g, sb);
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "parameters after step {step}, wd {weight_decay}"
                );
                let (ma, mb) = (
                    &sa.as_ref().unwrap().momentum,
                    &sb.as_ref().unwrap().momentum,
                );
                assert_eq!(ma.time, mb.time);
                assert_eq!(bits(&ma.moment_1), bits(&mb.moment_1), "first moment");
                assert_eq!(bits(&ma.moment_2), bits(&mb.moment_2), "second moment");
            }
        }
    }
}
