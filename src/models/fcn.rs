//! FCN-8s on a VGG16 encoder, as the study's FCN V1 and V2.
//!
//! Encoder: VGG16's 13 3x3 convolutions in 5 blocks, each ending in a 2x2 max-pool.
//! Decoder (V1): a 3x3 conv on pool5, then stride-2 'same' transposed convolutions with
//! ReLU: 512 (+ pool4), 256 (+ pool3), 128, and a stride-4 one to the classes. With the
//! encoder frozen this has 6,198,019 trainable parameters, the study's figure exactly.
//! V2 adds a 3x3 'same' conv + ReLU after each transposed convolution but the last.
//!
//! Pretrained ImageNet weights for the encoder come from the user (`pretrained` in the
//! train stage, safetensors); without them the encoder trains from scratch.

use burn::module::Module;
use burn::nn::Relu;
use burn::nn::conv::ConvTranspose2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::tensor::{Device, Tensor};

use super::blocks::{ConvBnRelu, up_conv};

#[derive(Debug, Clone)]
pub struct FcnConfig {
    pub in_channels: usize,
    pub classes: usize,
    /// VGG16's first width (64); later blocks double it up to 8x.
    pub base: usize,
    pub v2: bool,
    pub batch_norm: bool,
}

#[derive(Module, Debug)]
pub struct Fcn {
    /// VGG16 blocks: 2, 2, 3, 3, 3 convolutions.
    pub encoder: Vec<Vec<ConvBnRelu>>,
    fc: ConvBnRelu,
    up: Vec<ConvTranspose2d>,
    /// V2 only: a conv after each transposed convolution but the last.
    refine: Vec<ConvBnRelu>,
    pool: MaxPool2d,
    relu: Relu,
}

impl FcnConfig {
    pub fn init(&self, device: &Device) -> Fcn {
        let b = self.base;
        let widths = [b, b * 2, b * 4, b * 8, b * 8];
        let depths = [2, 2, 3, 3, 3];
        let mut cin = self.in_channels;
        let mut encoder = Vec::new();
        for (w, n) in widths.iter().zip(depths) {
            let mut block = Vec::new();
            for _ in 0..n {
                block.push(ConvBnRelu::new(cin, *w, 3, self.batch_norm, device));
                cin = *w;
            }
            encoder.push(block);
        }
        let fc = ConvBnRelu::new(b * 8, b * 8, 3, false, device);
        let up = vec![
            up_conv(b * 8, b * 8, 3, 2, device),
            up_conv(b * 8, b * 4, 3, 2, device),
            up_conv(b * 4, b * 2, 3, 2, device),
            up_conv(b * 2, self.classes, 3, 4, device),
        ];
        let refine = if self.v2 {
            [b * 8, b * 4, b * 2]
                .iter()
                .map(|&w| ConvBnRelu::new(w, w, 3, false, device))
                .collect()
        } else {
            vec![]
        };
        Fcn {
            encoder,
            fc,
            up,
            refine,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            relu: Relu::new(),
        }
    }
}

impl Fcn {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut pools = Vec::with_capacity(5);
        let mut x = x;
        for block in &self.encoder {
            for conv in block {
                x = conv.forward(x);
            }
            x = self.pool.forward(x);
            pools.push(x.clone());
        }
        let mut x = self.fc.forward(x);
        for (i, up) in self.up.iter().enumerate() {
            x = up.forward(x);
            if i + 1 == self.up.len() {
                break; // logits
            }
            x = self.relu.forward(x);
            if let Some(r) = self.refine.get(i) {
                x = r.forward(x);
            }
            // skips from pool4 (after the first) and pool3 (after the second)
            if i < 2 {
                x = x + pools[3 - i].clone();
            }
        }
        x
    }

    /// Parameters of the VGG16 encoder (frozen when pretrained).
    pub fn encoder_params(&self) -> usize {
        self.encoder.iter().flatten().map(Module::num_params).sum()
    }
}
