//! The networks' operations on [`crate::kernels`]: convolutions, transposed convolutions
//! (alone or as the U-Net's up step, [`up_cat`]), batch norm with its ReLU, the 2x2 max
//! pool, as burn operations with a backward pass of their own on the CPU backend
//! (burn-flex, f32), and Adam's step ([`adam_step`]); burn's own operations everywhere
//! else (the GPU backend, 16-bit floats, shapes the kernels do not cover).
//!
//! The modules stay burn's `Conv2d`, `ConvTranspose2d`, `BatchNorm` and `MaxPool2d` (same
//! parameters, same initialisation, same checkpoint keys); only their forward pass goes
//! through the functions here.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::module::Param;
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::activation;
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};

use crate::kernels::{self, Nchw};

/// The CPU kernels as backend operations (burn-flex, and autodiff over it).
#[backend_extension(Flex, Autodiff)]
pub trait KernelOps: Backend {
    /// `k x k` convolution, stride 1, 'same' zero padding, `k` odd.
    fn kp_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// 2x2 transposed convolution, stride 2.
    fn kp_up2(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `[2, channels]`: each channel's mean and biased variance (not differentiated).
    fn kp_bn_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Batch norm with `stats` (`[2, channels]`) and an optional ReLU. Its gradient treats
    /// `stats` as the batch's own ([`Self::kp_bn_stats`] of `x`), as training uses it.
    fn kp_bn(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self>;
    /// 2x2 max pool, stride 2, no padding.
    fn kp_pool2(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// One Adam step of a parameter of any rank: `(param, moment_1, moment_2)` after it
    /// ([`crate::kernels::adam`]); the moments are ignored on the `first` step.
    #[allow(clippy::too_many_arguments)]
    fn kp_adam(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        first: bool,
        lr: f32,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        time: i32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `cat([skip, relu(kp_up2(x, weight, bias))], 1)`: the U-Net's up step.
    fn kp_up2_cat(
        skip: FloatTensor<Self>,
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `conv.forward(x)`, on the CPU kernels where they apply.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [kh, kw] = conv.kernel_size;
    let p = kh / 2;
    // 'same' zero padding: with stride 1 and an odd kernel, `Same` is `p` on every side.
    let same = match conv.padding {
        PaddingConfig2d::Same => true,
        PaddingConfig2d::Valid => p == 0,
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r] == [p; 4],
    };
    let fits = kh == kw
        && kh % 2 == 1
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && same;
    if !(fits && on_kernels(&x)) {
        return conv.forward(x);
    }
    let bias = bias_or_zeros(&conv.bias, conv.weight.dims()[0], &x.device());
    Tensor::from_dispatch(<Dispatch as KernelOps>::kp_conv(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Whether the kernels do `conv`: 2x2, stride 2, unpadded, ungrouped.
fn up2_fits(conv: &ConvTranspose2d) -> bool {
    conv.kernel_size == [2, 2]
        && conv.stride == [2, 2]
        && conv.padding == [0, 0]
        && conv.padding_out == [0, 0]
        && conv.dilation == [1, 1]
        && conv.groups == 1
}

/// `conv.forward(x)`, on the CPU kernels where they apply.
pub fn conv_transpose2d(conv: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    if !(up2_fits(conv) && on_kernels(&x)) {
        return conv.forward(x);
    }
    let bias = bias_or_zeros(&conv.bias, conv.weight.dims()[1], &x.device());
    Tensor::from_dispatch(<Dispatch as KernelOps>::kp_up2(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// The U-Net's up step, `cat([skip, relu(conv.forward(x))], 1)`: on the CPU kernels one
/// operation that writes the transposed convolution into its channels of the result
/// (no separate ReLU and concatenation passes, forward or backward).
pub fn up_cat(conv: &ConvTranspose2d, skip: Tensor<4>, x: Tensor<4>) -> Tensor<4> {
    if !(up2_fits(conv) && on_kernels(&x) && on_kernels(&skip)) {
        return Tensor::cat(vec![skip, activation::relu(conv_transpose2d(conv, x))], 1);
    }
    let bias = bias_or_zeros(&conv.bias, conv.weight.dims()[1], &x.device());
    Tensor::from_dispatch(<Dispatch as KernelOps>::kp_up2_cat(
        skip.into_dispatch(),
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// One Adam step on the CPU kernels: `Some((param, moment_1, moment_2))` after it, or
/// `None` where they do not apply (not burn-flex, not f32).
#[allow(clippy::too_many_arguments)]
pub fn adam_step<const D: usize>(
    param: &Tensor<D>,
    grad: &Tensor<D>,
    moments: Option<(&Tensor<D>, &Tensor<D>)>,
    lr: f32,
    [beta_1, beta_2]: [f32; 2],
    epsilon: f32,
    time: i32,
) -> Option<(Tensor<D>, Tensor<D>, Tensor<D>)> {
    let all_on = on_kernels(param)
        && on_kernels(grad)
        && moments.is_none_or(|(a, b)| on_kernels(a) && on_kernels(b));
    if !all_on {
        return None;
    }
    // The first step reads no moments: the gradient stands in for them.
    let (m1, m2) = moments.unwrap_or((grad, grad));
    let (p, a, b) = <Dispatch as KernelOps>::kp_adam(
        param.clone().into_dispatch(),
        grad.clone().into_dispatch(),
        m1.clone().into_dispatch(),
        m2.clone().into_dispatch(),
        moments.is_none(),
        lr,
        beta_1,
        beta_2,
        epsilon,
        time,
    );
    Some((
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(a),
        Tensor::from_dispatch(b),
    ))
}

/// `pool.forward(x)`, on the CPU kernels where they apply (2x2, stride 2, unpadded).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let unpadded = match pool.padding {
        PaddingConfig2d::Valid => true,
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r] == [0; 4],
        PaddingConfig2d::Same => false,
    };
    let [_, _, h, w] = x.dims();
    let fits = pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && unpadded
        && (!pool.ceil_mode || (h % 2 == 0 && w % 2 == 0));
    if !(fits && on_kernels(&x)) {
        return pool.forward(x);
    }
    Tensor::from_dispatch(<Dispatch as KernelOps>::kp_pool2(x.into_dispatch()))
}

/// `bn.forward(x)`, followed by a ReLU with `relu`: one fused operation on the CPU
/// kernels (training with the batch's statistics, or inference with the running ones),
/// burn's batch norm elsewhere and for a frozen layer on a training device. The running
/// statistics are updated as burn's `BatchNorm` updates them.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    let autodiff = x.device().is_autodiff();
    let training = autodiff && bn.training.is_enabled();
    if !on_kernels(&x) || (autodiff && !training) {
        let y = bn.forward(x);
        return if relu { activation::relu(y) } else { y };
    }
    let device = x.device();
    let stats = if training {
        let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as KernelOps>::kp_bn_stats(
            x.clone().into_dispatch(),
        ));
        let c = stats.dims()[1];
        let m = bn.momentum;
        let row = |i: usize| stats.clone().slice([i..i + 1, 0..c]).reshape([c]).detach();
        let mean = bn
            .running_mean
            .value_sync()
            .to_device(&device)
            .mul_scalar(1.0 - m)
            .add(row(0).mul_scalar(m));
        let var = bn
            .running_var
            .value_sync()
            .to_device(&device)
            .mul_scalar(1.0 - m)
            .add(row(1).mul_scalar(m));
        bn.running_mean.update(mean.detach());
        bn.running_var.update(var.detach());
        stats
    } else {
        Tensor::stack(vec![bn.running_mean.value(), bn.running_var.value()], 0).to_device(&device)
    };
    Tensor::from_dispatch(<Dispatch as KernelOps>::kp_bn(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        stats.into_dispatch(),
        bn.epsilon,
        relu,
    ))
}

/// The module's bias, or zeros (untracked: no gradient goes to them) for one without.
fn bias_or_zeros(bias: &Option<Param<Tensor<1>>>, channels: usize, device: &Device) -> Tensor<1> {
    match bias {
        Some(b) => b.val(),
        None => Tensor::zeros([channels], device),
    }
}

/// Whether `x` lives on burn-flex (with or without autodiff) in f32.
fn on_kernels<const D: usize>(x: &Tensor<D>) -> bool {
    x.device() == Device::flex() && x.dtype() == DType::F32
}

/// An f32 tensor's shape and contiguous copy (no copy when it already is one).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "the CPU kernels take f32 tensors");
    t.to_contiguous()
}

fn floats(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn nchw(t: &FlexTensor) -> Nchw {
    let [n, c, h, w] = t.layout().shape().dims::<4>();
    Nchw { n, c, h, w }
}

/// A tensor of `data` in the shape of `like`.
fn shaped_like(data: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, like.layout().shape().clone()))
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    let shape = Shape::from(shape);
    debug_assert_eq!(Layout::contiguous(shape.clone()).num_elements(), data.len());
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// The glue between burn-flex's tensors and the kernels.
mod glue {
    use super::*;

    pub fn conv(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
        let (x, w, b) = (contiguous(x), contiguous(w), contiguous(b));
        let s = nchw(&x);
        let [co, ci, k, _] = w.layout().shape().dims::<4>();
        assert_eq!(
            ci, s.c,
            "convolution of {} channels with weights for {ci}",
            s.c
        );
        let y = kernels::conv::forward(floats(&x), s, floats(&w), co, k, Some(floats(&b)));
        tensor(y, vec![s.n, co, s.h, s.w])
    }

    pub fn conv_dx(dy: &FlexTensor, w: &FlexTensor) -> FlexTensor {
        let (dy, w) = (contiguous(dy), contiguous(w));
        let s = nchw(&dy);
        let [_, ci, k, _] = w.layout().shape().dims::<4>();
        let dx = kernels::conv::backward_input(floats(&dy), s, floats(&w), ci, k);
        tensor(dx, vec![s.n, ci, s.h, s.w])
    }

    pub fn conv_dw(x: &FlexTensor, dy: &FlexTensor, k: usize) -> FlexTensor {
        let (x, dy) = (contiguous(x), contiguous(dy));
        let s = nchw(&x);
        let co = nchw(&dy).c;
        let dw = kernels::conv::backward_weight(floats(&x), s, floats(&dy), co, k);
        tensor(dw, vec![co, s.c, k, k])
    }

    pub fn bias_grad(dy: &FlexTensor) -> FlexTensor {
        let dy = contiguous(dy);
        let s = nchw(&dy);
        tensor(kernels::channel_sums(floats(&dy), s), vec![s.c])
    }

    pub fn up2(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
        let (x, w, b) = (contiguous(x), contiguous(w), contiguous(b));
        let s = nchw(&x);
        let [ci, co, _, _] = w.layout().shape().dims::<4>();
        assert_eq!(
            ci, s.c,
            "transposed convolution of {} channels with weights for {ci}",
            s.c
        );
        let y = kernels::upconv::forward(floats(&x), s, floats(&w), co, Some(floats(&b)));
        tensor(y, vec![s.n, co, 2 * s.h, 2 * s.w])
    }

    pub fn up2_cat(
        skip: &FlexTensor,
        x: &FlexTensor,
        w: &FlexTensor,
        b: &FlexTensor,
    ) -> FlexTensor {
        let (skip, x, w, b) = (
            contiguous(skip),
            contiguous(x),
            contiguous(w),
            contiguous(b),
        );
        let s = nchw(&x);
        let sk = nchw(&skip);
        let [ci, co, _, _] = w.layout().shape().dims::<4>();
        assert_eq!(
            ci, s.c,
            "transposed convolution of {} channels with weights for {ci}",
            s.c
        );
        assert_eq!(
            (sk.n, sk.h, sk.w),
            (s.n, 2 * s.h, 2 * s.w),
            "skip of shape {sk:?} beside an up-sampled {s:?}"
        );
        let y = kernels::upconv::forward_cat(
            floats(&skip),
            floats(&x),
            s,
            floats(&w),
            co,
            Some(floats(&b)),
        );
        tensor(y, vec![s.n, sk.c + co, sk.h, sk.w])
    }

    /// The gradients `(skip, x, weight, bias)` of [`up2_cat`] from its result's `dy`.
    pub fn up2_cat_grads(
        dy: &FlexTensor,
        y: &FlexTensor,
        x: &FlexTensor,
        w: &FlexTensor,
        cs: usize,
    ) -> [FlexTensor; 4] {
        let (dy, y) = (contiguous(dy), contiguous(y));
        let so = nchw(&dy);
        let (dskip, du) =
            kernels::upconv::split_cat_gradient(floats(&dy), floats(&y), so.n, cs, so.plane());
        let du = tensor(du, vec![so.n, so.c - cs, so.h, so.w]);
        [
            tensor(dskip, vec![so.n, cs, so.h, so.w]),
            up2_dx(&du, w),
            up2_dw(x, &du),
            bias_grad(&du),
        ]
    }

    pub fn up2_dx(dy: &FlexTensor, w: &FlexTensor) -> FlexTensor {
        let (dy, w) = (contiguous(dy), contiguous(w));
        let so = nchw(&dy);
        let [ci, co, _, _] = w.layout().shape().dims::<4>();
        let s = Nchw {
            n: so.n,
            c: ci,
            h: so.h / 2,
            w: so.w / 2,
        };
        let dx = kernels::upconv::backward_input(floats(&dy), s, floats(&w), co);
        tensor(dx, vec![s.n, s.c, s.h, s.w])
    }

    pub fn bn_stats(x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let s = nchw(&x);
        let (mut mean, var) = kernels::norm::channel_stats(floats(&x), s);
        mean.extend(var);
        tensor(mean, vec![2, s.c])
    }

    /// The mean and variance rows of a `[2, channels]` statistics tensor.
    fn rows(stats: &FlexTensor) -> (FlexTensor, usize) {
        let stats = contiguous(stats);
        let c = stats.layout().shape().dims::<2>()[1];
        (stats, c)
    }

    pub fn bn(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        stats: &FlexTensor,
        eps: f64,
        relu: bool,
    ) -> FlexTensor {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let (stats, c) = rows(stats);
        let s = nchw(&x);
        let (mean, var) = floats(&stats).split_at(c);
        let y = kernels::norm::normalize(
            floats(&x),
            s,
            mean,
            var,
            floats(&gamma),
            floats(&beta),
            eps,
            relu,
        );
        tensor(y, vec![s.n, s.c, s.h, s.w])
    }

    /// `(dx, dgamma, dbeta)` of [`bn`] with the batch's statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_grads(
        x: &FlexTensor,
        y: &FlexTensor,
        dy: &FlexTensor,
        gamma: &FlexTensor,
        stats: &FlexTensor,
        eps: f64,
        relu: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, y, dy, gamma) = (
            contiguous(x),
            contiguous(y),
            contiguous(dy),
            contiguous(gamma),
        );
        let (stats, c) = rows(stats);
        let s = nchw(&x);
        let (mean, var) = floats(&stats).split_at(c);
        let (dx, dg, db) = kernels::norm::normalize_backward(
            floats(&x),
            floats(&y),
            floats(&dy),
            s,
            mean,
            var,
            floats(&gamma),
            eps,
            relu,
        );
        (
            tensor(dx, vec![s.n, s.c, s.h, s.w]),
            tensor(dg, vec![c]),
            tensor(db, vec![c]),
        )
    }

    pub fn pool2(x: &FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let s = nchw(&x);
        let o = kernels::pool::pooled(s);
        tensor(
            kernels::pool::forward(floats(&x), s),
            vec![o.n, o.c, o.h, o.w],
        )
    }

    pub fn pool2_dx(x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
        let (x, dy) = (contiguous(x), contiguous(dy));
        let s = nchw(&x);
        tensor(
            kernels::pool::backward(floats(&x), s, floats(&dy)),
            vec![s.n, s.c, s.h, s.w],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn adam(
        param: &FlexTensor,
        grad: &FlexTensor,
        m1: &FlexTensor,
        m2: &FlexTensor,
        first: bool,
        s: kernels::adam::Settings,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (param, grad) = (contiguous(param), contiguous(grad));
        let (m1, m2) = if first {
            (None, None)
        } else {
            (Some(contiguous(m1)), Some(contiguous(m2)))
        };
        let moments = m1
            .as_ref()
            .zip(m2.as_ref())
            .map(|(a, b)| (floats(a), floats(b)));
        let (p, a, b) = kernels::adam::step(floats(&param), floats(&grad), moments, s);
        (
            shaped_like(p, &param),
            shaped_like(a, &param),
            shaped_like(b, &param),
        )
    }

    pub fn up2_dw(x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
        let (x, dy) = (contiguous(x), contiguous(dy));
        let s = nchw(&x);
        let co = nchw(&dy).c;
        let dw = kernels::upconv::backward_weight(floats(&x), s, floats(&dy), co);
        tensor(dw, vec![s.c, co, 2, 2])
    }
}

impl KernelOps for Flex {
    fn kp_conv(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        glue::conv(&x, &weight, &bias)
    }

    fn kp_up2(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        glue::up2(&x, &weight, &bias)
    }

    fn kp_bn_stats(x: FlexTensor) -> FlexTensor {
        glue::bn_stats(&x)
    }

    fn kp_bn(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        stats: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        glue::bn(&x, &gamma, &beta, &stats, epsilon, relu)
    }

    fn kp_pool2(x: FlexTensor) -> FlexTensor {
        glue::pool2(&x)
    }

    fn kp_adam(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        first: bool,
        lr: f32,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        time: i32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let s = kernels::adam::Settings {
            lr,
            beta_1,
            beta_2,
            epsilon,
            time,
        };
        glue::adam(&param, &grad, &moment_1, &moment_2, first, s)
    }

    fn kp_up2_cat(
        skip: FlexTensor,
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
    ) -> FlexTensor {
        glue::up2_cat(&skip, &x, &weight, &bias)
    }
}

/// The backward step of the up step: the state is the input, the weights, the result
/// and the skip's channel count.
#[derive(Debug)]
struct UpCatBackward;

impl Backward<Flex, 4> for UpCatBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, y, cs) = ops.state;
        let all = glue::up2_cat_grads(&dy, &y, &x, &w, cs);
        for (node, g) in ops.parents.into_iter().zip(all) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// The backward step of the max pool: the state is its input.
#[derive(Debug)]
struct PoolBackward;

impl Backward<Flex, 1> for PoolBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, glue::pool2_dx(&ops.state, &dy));
        }
    }
}

/// The backward step of the fused batch norm: the state is the input, the output, gamma,
/// the statistics, epsilon and whether a ReLU followed.
#[derive(Debug)]
struct NormBackward;

impl Backward<Flex, 3> for NormBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f64, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, y, gamma, stats, eps, relu) = ops.state;
        let (dx, dgamma, dbeta) = glue::bn_grads(&x, &y, &dy, &gamma, &stats, eps, relu);
        for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

/// Which of the two operations a backward step differentiates.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Conv,
    Up2,
}

/// The backward step of both operations: gradients of the input, the weights and the
/// bias, from the forward pass's input and weights.
#[derive(Debug)]
struct KernelBackward(Kind);

impl Backward<Flex, 3> for KernelBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        // Made contiguous once for the two or three gradients that read it.
        let dy = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, w) = ops.state;
        let k = w.layout().shape().dims::<4>()[2];
        if let Some(node) = node_x {
            let dx = match self.0 {
                Kind::Conv => glue::conv_dx(&dy, &w),
                Kind::Up2 => glue::up2_dx(&dy, &w),
            };
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_w {
            let dw = match self.0 {
                Kind::Conv => glue::conv_dw(&x, &dy, k),
                Kind::Up2 => glue::up2_dw(&x, &dy),
            };
            grads.register::<Flex>(node.id, dw);
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, glue::bias_grad(&dy));
        }
    }
}

type AdTensor<C> = FloatTensor<Autodiff<Flex, C>>;

/// Runs `forward` on the primitives and records the backward step when any input is tracked.
fn differentiable<C: CheckpointStrategy>(
    kind: Kind,
    x: AdTensor<C>,
    w: AdTensor<C>,
    b: AdTensor<C>,
    forward: fn(&FlexTensor, &FlexTensor, &FlexTensor) -> FlexTensor,
) -> AdTensor<C> {
    match KernelBackward(kind)
        .prepare::<C>([x.node(), w.node(), b.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
            let out = forward(&xp, &wp, b.primitive());
            prep.finish((xp, wp), out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(forward(x.primitive(), w.primitive(), b.primitive()))
        }
    }
}

impl<C: CheckpointStrategy> KernelOps for Autodiff<Flex, C> {
    fn kp_conv(x: AdTensor<C>, weight: AdTensor<C>, bias: AdTensor<C>) -> AdTensor<C> {
        differentiable::<C>(Kind::Conv, x, weight, bias, glue::conv)
    }

    fn kp_up2(x: AdTensor<C>, weight: AdTensor<C>, bias: AdTensor<C>) -> AdTensor<C> {
        differentiable::<C>(Kind::Up2, x, weight, bias, glue::up2)
    }

    fn kp_bn_stats(x: AdTensor<C>) -> AdTensor<C> {
        AdTensor::<C>::new(glue::bn_stats(x.primitive()))
    }

    fn kp_bn(
        x: AdTensor<C>,
        gamma: AdTensor<C>,
        beta: AdTensor<C>,
        stats: AdTensor<C>,
        epsilon: f64,
        relu: bool,
    ) -> AdTensor<C> {
        match NormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, gp, sp) = (
                    x.primitive().clone(),
                    gamma.primitive().clone(),
                    stats.primitive().clone(),
                );
                let y = glue::bn(&xp, &gp, beta.primitive(), &sp, epsilon, relu);
                prep.finish((xp, y.clone(), gp, sp, epsilon, relu), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(glue::bn(
                x.primitive(),
                gamma.primitive(),
                beta.primitive(),
                stats.primitive(),
                epsilon,
                relu,
            )),
        }
    }

    fn kp_up2_cat(
        skip: AdTensor<C>,
        x: AdTensor<C>,
        weight: AdTensor<C>,
        bias: AdTensor<C>,
    ) -> AdTensor<C> {
        let nodes = [skip.node(), x.node(), weight.node(), bias.node()];
        match UpCatBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
                let cs = nchw(skip.primitive()).c;
                let y = glue::up2_cat(skip.primitive(), &xp, &wp, bias.primitive());
                prep.finish((xp, wp, y.clone(), cs), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(glue::up2_cat(
                skip.primitive(),
                x.primitive(),
                weight.primitive(),
                bias.primitive(),
            )),
        }
    }

    // Optimisers step on the inner tensors; tracked ones get untracked results.
    fn kp_adam(
        param: AdTensor<C>,
        grad: AdTensor<C>,
        moment_1: AdTensor<C>,
        moment_2: AdTensor<C>,
        first: bool,
        lr: f32,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        time: i32,
    ) -> (AdTensor<C>, AdTensor<C>, AdTensor<C>) {
        let (p, a, b) = Flex::kp_adam(
            param.primitive().clone(),
            grad.primitive().clone(),
            moment_1.primitive().clone(),
            moment_2.primitive().clone(),
            first,
            lr,
            beta_1,
            beta_2,
            epsilon,
            time,
        );
        (
            AdTensor::<C>::new(p),
            AdTensor::<C>::new(a),
            AdTensor::<C>::new(b),
        )
    }

    fn kp_pool2(x: AdTensor<C>) -> AdTensor<C> {
        match PoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xp = x.primitive().clone();
                let y = glue::pool2(&xp);
                prep.finish(xp, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(glue::pool2(x.primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::BatchNormConfig;
    use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use burn::tensor::{Distribution, Gradients};

    use super::*;

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel_err<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
        let got = got.into_data().try_to_vec::<f32>().unwrap();
        let want = want.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale
    }

    const TOL: f32 = 1e-5;

    #[test]
    fn flex_tensors_take_the_kernels_with_or_without_autodiff() {
        let x = Tensor::<4>::zeros([1, 1, 2, 2], &Device::flex());
        assert!(on_kernels(&x));
        let x = Tensor::<4>::zeros([1, 1, 2, 2], &Device::flex().autodiff());
        assert!(on_kernels(&x));
    }

    #[test]
    fn kernel_convolutions_agree_with_burns_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(3);
        for (cin, cout, k, bias) in [
            (3, 5, 3, true),
            (4, 2, 1, true),
            (1, 16, 3, true),
            (6, 4, 3, false),
        ] {
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_padding(PaddingConfig2d::Same)
                .with_bias(bias)
                .init(&device);
            let x =
                Tensor::<4>::random([3, cin, 9, 7], Distribution::Default, &device).require_grad();
            let probe = Tensor::<4>::random([3, cout, 9, 7], Distribution::Default, &device);
            let ours = conv2d(&conv, x.clone());
            let theirs = conv.forward(x.clone());
            assert!(
                rel_err(ours.clone(), theirs.clone()) < TOL,
                "forward {cin}->{cout} k{k}"
            );
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (theirs * probe).sum().backward();
            let grad = |t: &Tensor<4>, g| t.grad(g).unwrap();
            assert!(
                rel_err(grad(&x, &g1), grad(&x, &g2)) < TOL,
                "input gradient"
            );
            let w = conv.weight.val();
            assert!(
                rel_err(grad(&w, &g1), grad(&w, &g2)) < TOL,
                "weight gradient"
            );
            if let Some(b) = &conv.bias {
                let b = b.val();
                assert!(
                    rel_err(b.grad(&g1).unwrap(), b.grad(&g2).unwrap()) < TOL,
                    "bias gradient"
                );
            }
        }
        // 2x2 stride-2 transposed convolutions.
        let up = ConvTranspose2dConfig::new([6, 3], [2, 2])
            .with_stride([2, 2])
            .init(&device);
        let x = Tensor::<4>::random([2, 6, 5, 4], Distribution::Default, &device).require_grad();
        let probe = Tensor::<4>::random([2, 3, 10, 8], Distribution::Default, &device);
        let (ours, theirs) = (conv_transpose2d(&up, x.clone()), up.forward(x.clone()));
        assert!(
            rel_err(ours.clone(), theirs.clone()) < TOL,
            "transposed forward"
        );
        let g1 = (ours * probe.clone()).sum().backward();
        let g2 = (theirs * probe).sum().backward();
        up_gradients_agree(&up, &x, &g1, &g2);
    }

    #[test]
    fn the_fused_up_step_agrees_with_burns_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        device.seed(6);
        let up = ConvTranspose2dConfig::new([5, 3], [2, 2])
            .with_stride([2, 2])
            .init(&device);
        let x = Tensor::<4>::random([2, 5, 3, 4], Distribution::Default, &device).require_grad();
        let skip = Tensor::<4>::random([2, 4, 6, 8], Distribution::Default, &device).require_grad();
        let probe = Tensor::<4>::random([2, 7, 6, 8], Distribution::Default, &device);
        let ours = up_cat(&up, skip.clone(), x.clone());
        let theirs = Tensor::cat(
            vec![skip.clone(), activation::relu(up.forward(x.clone()))],
            1,
        );
        assert!(rel_err(ours.clone(), theirs.clone()) < TOL, "forward");
        let g1 = (ours * probe.clone()).sum().backward();
        let g2 = (theirs * probe).sum().backward();
        assert_eq!(
            rel_err(skip.grad(&g1).unwrap(), skip.grad(&g2).unwrap()),
            0.0
        );
        up_gradients_agree(&up, &x, &g1, &g2);
    }

    /// The gradients of `x` and of `up`'s weight and bias agree between two backward
    /// passes.
    fn up_gradients_agree(up: &ConvTranspose2d, x: &Tensor<4>, g1: &Gradients, g2: &Gradients) {
        let input = rel_err(x.grad(g1).unwrap(), x.grad(g2).unwrap());
        assert!(input < TOL, "input gradient {input}");
        let w = up.weight.val();
        let weight = rel_err(w.grad(g1).unwrap(), w.grad(g2).unwrap());
        assert!(weight < TOL, "weight gradient {weight}");
        let b = up.bias.as_ref().unwrap().val();
        let bias = rel_err(b.grad(g1).unwrap(), b.grad(g2).unwrap());
        assert!(bias < TOL, "bias gradient {bias}");
    }

    #[test]
    fn kernel_max_pool_agrees_with_burns_in_values_and_gradients() {
        use burn::nn::pool::MaxPool2dConfig;
        let device = Device::flex().autodiff();
        device.seed(5);
        let pool = MaxPool2dConfig::new([2, 2]).init();
        // Odd sizes (the last row and column dropped), with and without autodiff.
        let x = Tensor::<4>::random([2, 3, 9, 6], Distribution::Default, &device).require_grad();
        let probe = Tensor::<4>::random([2, 3, 4, 3], Distribution::Default, &device);
        let (ours, theirs) = (max_pool2d(&pool, x.clone()), pool.forward(x.clone()));
        assert_eq!(ours.dims(), [2, 3, 4, 3]);
        assert_eq!(rel_err(ours.clone(), theirs.clone()), 0.0, "forward");
        let g1 = (ours * probe.clone()).sum().backward();
        let g2 = (theirs * probe).sum().backward();
        assert_eq!(rel_err(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()), 0.0);
        let plain = x.clone().inner();
        assert_eq!(
            rel_err(max_pool2d(&pool, plain.clone()), pool.forward(plain)),
            0.0,
            "inference"
        );
    }

    #[test]
    fn fused_batch_norm_agrees_with_burns_in_training_and_inference() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let x = Tensor::<4>::random([4, 3, 6, 5], Distribution::Normal(0.5, 2.0), &device)
            .require_grad();
        let probe = Tensor::<4>::random([4, 3, 6, 5], Distribution::Default, &device);
        for relu in [false, true] {
            // Two identical layers (running statistics are state: one per path).
            let (a, b) = (
                BatchNormConfig::new(3).init(&device),
                BatchNormConfig::new(3).init(&device),
            );
            let ours = batch_norm(&a, x.clone(), relu);
            let theirs = b.forward(x.clone());
            let theirs = if relu {
                activation::relu(theirs)
            } else {
                theirs
            };
            assert!(
                rel_err(ours.clone(), theirs.clone()) < TOL,
                "forward relu={relu}"
            );
            let g1 = (ours * probe.clone()).sum().backward();
            let g2 = (theirs * probe.clone()).sum().backward();
            assert!(
                rel_err(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-4,
                "input gradient relu={relu}"
            );
            for (p, q) in [(a.gamma.val(), b.gamma.val()), (a.beta.val(), b.beta.val())] {
                assert!(
                    rel_err(p.grad(&g1).unwrap(), q.grad(&g2).unwrap()) < 1e-4,
                    "affine gradients"
                );
            }
            assert!(
                rel_err(a.running_mean.value(), b.running_mean.value()) < TOL,
                "running mean"
            );
            assert!(
                rel_err(a.running_var.value(), b.running_var.value()) < TOL,
                "running variance"
            );
        }
        // Inference (no autodiff): the running statistics.
        let device = Device::flex();
        let bn = BatchNormConfig::new(3).init(&device);
        bn.running_mean
            .update(Tensor::from_floats([0.3, -1.0, 2.0], &device));
        bn.running_var
            .update(Tensor::from_floats([0.5, 2.0, 1.5], &device));
        let x = Tensor::<4>::random([2, 3, 4, 4], Distribution::Normal(0.0, 2.0), &device);
        let ours = batch_norm(&bn, x.clone(), true);
        assert!(
            rel_err(ours, activation::relu(bn.forward(x))) < TOL,
            "inference"
        );
    }
}
