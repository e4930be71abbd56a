//! LinkNet (Chaurasia & Culurciello): a ResNet18-style encoder (7x7 stem, 4 stages of 2
//! residual blocks) and decoder blocks (1x1 reduce, 3x3 stride-2 transposed conv, 1x1
//! expand, each with batch norm and ReLU), each encoder stage's output added into the
//! decoder at its scale.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Tensor};

use super::blocks::{ConvBnRelu, up_conv};
use super::ops;

/// A LinkNet's shape: `LinkNetConfig::new(in_channels, base).init(&device)`.
#[derive(Config, Debug)]
pub struct LinkNetConfig {
    /// Input channels (the slice and its context slices).
    pub in_channels: usize,
    /// ResNet18's first width (64).
    pub base: usize,
    /// Output classes: background, kidney, tumor.
    #[config(default = "super::CLASSES")]
    pub classes: usize,
}

/// Convolution (no bias) and batch norm, as ResNet uses them.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    norm: BatchNorm,
}

impl ConvBn {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        ops::batch_norm(&self.norm, ops::conv2d(&self.conv, x), false)
    }
}

fn conv_bn(cin: usize, cout: usize, k: usize, stride: usize, device: &Device) -> ConvBn {
    let pad = PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2);
    ConvBn {
        conv: Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(pad)
            .with_bias(false)
            .init(device),
        norm: BatchNormConfig::new(cout).init(device),
    }
}

#[derive(Module, Debug)]
pub struct BasicBlock {
    c1: ConvBn,
    c2: ConvBn,
    down: Option<ConvBn>,
    relu: Relu,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        let c1 = conv_bn(cin, cout, 3, stride, device);
        let c2 = conv_bn(cout, cout, 3, 1, device);
        let down = (stride != 1 || cin != cout).then(|| conv_bn(cin, cout, 1, stride, device));
        BasicBlock {
            c1,
            c2,
            down,
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.relu.forward(self.c1.forward(x.clone()));
        let y = self.c2.forward(y);
        let skip = match &self.down {
            Some(d) => d.forward(x),
            None => x,
        };
        self.relu.forward(y + skip)
    }
}

#[derive(Module, Debug)]
pub struct DecoderBlock {
    reduce: ConvBnRelu,
    up: ConvTranspose2d,
    norm: BatchNorm,
    expand: ConvBnRelu,
    relu: Relu,
}

impl DecoderBlock {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        let mid = cin / 4;
        DecoderBlock {
            reduce: ConvBnRelu::new(cin, mid, 1, true, device),
            up: up_conv(mid, mid, 3, stride, device),
            norm: BatchNormConfig::new(mid).init(device),
            expand: ConvBnRelu::new(mid, cout, 1, true, device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.reduce.forward(x);
        let x = ops::batch_norm(&self.norm, ops::conv_transpose2d(&self.up, x), true);
        self.expand.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct LinkNet {
    stem: ConvBn,
    pool: MaxPool2d,
    stages: Vec<Vec<BasicBlock>>,
    decoders: Vec<DecoderBlock>,
    final_up: ConvTranspose2d,
    final_norm: BatchNorm,
    final_conv: ConvBnRelu,
    head: ConvTranspose2d,
    relu: Relu,
}

impl LinkNetConfig {
    pub fn init(&self, device: &Device) -> LinkNet {
        let b = self.base;
        let widths = [b, b * 2, b * 4, b * 8];
        let mut stages = Vec::new();
        let mut cin = b;
        for (i, &w) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            stages.push(vec![
                BasicBlock::new(cin, w, stride, device),
                BasicBlock::new(w, w, 1, device),
            ]);
            cin = w;
        }
        let decoders = vec![
            DecoderBlock::new(b * 8, b * 4, 2, device),
            DecoderBlock::new(b * 4, b * 2, 2, device),
            DecoderBlock::new(b * 2, b, 2, device),
            // the first encoder stage keeps the stem's 1/4 scale: no upsampling here
            DecoderBlock::new(b, b, 1, device),
        ];
        LinkNet {
            stem: conv_bn(self.in_channels, b, 7, 2, device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            stages,
            decoders,
            final_up: up_conv(b, b / 2, 3, 2, device),
            final_norm: BatchNormConfig::new(b / 2).init(device),
            final_conv: ConvBnRelu::new(b / 2, b / 2, 3, true, device),
            head: up_conv(b / 2, self.classes, 2, 2, device),
            relu: Relu::new(),
        }
    }
}

impl LinkNet {
    /// Per-pixel class logits.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, height, width]`, height and width multiples of 32
    /// - output: `[batch, classes, height, width]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.relu.forward(self.stem.forward(x));
        let mut x = self.pool.forward(x);
        let mut encoded = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = block.forward(x);
            }
            encoded.push(x.clone());
        }
        let mut d = encoded[3].clone();
        for (i, dec) in self.decoders.iter().enumerate() {
            d = dec.forward(d);
            if i < 3 {
                d = d + encoded[2 - i].clone();
            }
        }
        let d = ops::batch_norm(
            &self.final_norm,
            ops::conv_transpose2d(&self.final_up, d),
            true,
        );
        let d = self.final_conv.forward(d);
        ops::conv_transpose2d(&self.head, d)
    }
}
