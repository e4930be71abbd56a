//! Layers the networks share.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

/// 3x3 'same' convolution, optional batch norm, ReLU.
#[derive(Module, Debug)]
pub struct ConvBnRelu {
    pub(crate) conv: Conv2d,
    norm: Option<BatchNorm>,
    relu: Relu,
}

impl ConvBnRelu {
    pub fn new(cin: usize, cout: usize, kernel: usize, batch_norm: bool, device: &Device) -> Self {
        let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
            .with_padding(PaddingConfig2d::Same)
            .init(device);
        ConvBnRelu {
            conv,
            norm: batch_norm.then(|| BatchNormConfig::new(cout).init(device)),
            relu: Relu::new(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = super::ops::conv2d(&self.conv, x);
        match &self.norm {
            Some(n) => super::ops::batch_norm(n, x, true),
            None => self.relu.forward(x),
        }
    }
}

/// A transposed convolution whose output is exactly `stride` times its input ('same').
pub fn up_conv(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    device: &Device,
) -> ConvTranspose2d {
    // out = (in - 1) * s - 2p + (k - 1) + po + 1 = s * in  <=>  po = s + 2p - k
    let p = kernel.saturating_sub(stride).div_ceil(2);
    let po = stride + 2 * p - kernel;
    ConvTranspose2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding([p, p])
        .with_padding_out([po, po])
        .init(device)
}
