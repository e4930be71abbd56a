//! FCN-8s on a VGG16 encoder, as the study's FCN V1 and V2.
//!
//! Encoder: VGG16's 13 3x3 convolutions in 5 blocks, each ending in a 2x2 max-pool.
//! Decoder (V1): a 3x3 conv on pool5, then stride-2 'same' transposed convolutions with
//! ReLU: 512 (+ pool4), 256 (+ pool3), 128, and a stride-4 one to the classes. With the
//! encoder frozen this has 6,198,019 trainable parameters, the study's figure exactly.
//! V2 adds a 3x3 'same' conv + ReLU after each transposed convolution but the last.
//!
//! Pretrained ImageNet weights for the encoder come from the user (`pretrained` in the
//! train stage: a safetensors file with torchvision's VGG16 names, `features.N.weight`
//! and `features.N.bias`); they are loaded by [`Fcn::load_vgg16`] and frozen. Without
//! them the encoder trains from scratch.

use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Relu;
use burn::nn::conv::ConvTranspose2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::tensor::{Device, Tensor, TensorData};

use super::blocks::{ConvBnRelu, up_conv};
use super::ops;

/// An FCN-8s's shape: `FcnConfig::new(in_channels, base).with_v2(true).init(&device)`.
#[derive(Config, Debug)]
pub struct FcnConfig {
    /// Input channels (the slice and its context slices).
    pub in_channels: usize,
    /// VGG16's first width (64); later blocks double it up to 8x.
    pub base: usize,
    /// Output classes: background, kidney, tumor.
    #[config(default = "super::CLASSES")]
    pub classes: usize,
    /// The study's FCN V2: a 3x3 convolution + ReLU after each transposed convolution.
    #[config(default = "false")]
    pub v2: bool,
    /// Batch norm after every encoder convolution.
    #[config(default = "false")]
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
    /// Per-pixel class logits.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, height, width]`, height and width multiples of 32
    /// - output: `[batch, classes, height, width]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut pools = Vec::with_capacity(5);
        let mut x = x;
        for block in &self.encoder {
            for conv in block {
                x = conv.forward(x);
            }
            x = ops::max_pool2d(&self.pool, x);
            pools.push(x.clone());
        }
        let mut x = self.fc.forward(x);
        for (i, up) in self.up.iter().enumerate() {
            x = ops::conv_transpose2d(up, x);
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

    /// The encoder stops learning (its parameters get no gradients).
    pub fn freeze_encoder(mut self) -> Self {
        self.encoder = self
            .encoder
            .into_iter()
            .map(|block| block.into_iter().map(Module::freeze).collect())
            .collect();
        self
    }

    /// Loads the 13 encoder convolutions from a torchvision-named VGG16 safetensors file
    /// (`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}`, float32, float16 or bfloat16).
    /// ImageNet's first layer sees 3 channels; for `c` input channels its kernels are
    /// adapted as timm does: summed for 1, else repeated and scaled by 3 / c.
    pub fn load_vgg16(mut self, path: &Path, device: &Device) -> Result<Self, String> {
        const FEATURES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>), String> {
            let t = file
                .tensor(name)
                .map_err(|_| format!("no tensor `{name}` (expected torchvision's VGG16 names)"))?;
            let data = t.data();
            let values = match t.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => return Err(format!("`{name}` is {other:?}; expected a float type")),
            };
            Ok((values, t.shape().to_vec()))
        };
        let convs = self.encoder.iter_mut().flatten();
        for (i, (layer, index)) in convs.zip(FEATURES).enumerate() {
            let (w, b) = (
                format!("features.{index}.weight"),
                format!("features.{index}.bias"),
            );
            let (mut weight, mut shape) = read(&w)?;
            let want = layer.conv.weight.shape().dims::<4>().to_vec();
            if i == 0 && shape.len() == 4 && shape[1] != want[1] {
                (weight, shape) = adapt_input_channels(&weight, &shape, want[1]);
            }
            if shape != want {
                return Err(format!(
                    "`{w}` has shape {shape:?}; the encoder needs {want:?}"
                ));
            }
            let (bias, bias_shape) = read(&b)?;
            if bias_shape != [want[0]] || layer.conv.bias.is_none() {
                return Err(format!(
                    "`{b}` has shape {bias_shape:?}; the encoder needs [{}]",
                    want[0]
                ));
            }
            let tensor = |v: Vec<f32>, s: Vec<usize>| TensorData::new(v, s);
            layer.conv.weight =
                Param::from_tensor(Tensor::from_data(tensor(weight, shape), device));
            layer.conv.bias = Some(Param::from_tensor(Tensor::from_data(
                tensor(bias, bias_shape),
                device,
            )));
        }
        Ok(self)
    }
}

/// A first-layer kernel `[out, 3, kh, kw]` for `c` input channels (timm's
/// `adapt_input_conv`): summed over RGB for 1 channel, else RGB repeated to `c` and
/// scaled by 3 / c, so a grey input gives the response an RGB one would.
fn adapt_input_channels(w: &[f32], shape: &[usize], c: usize) -> (Vec<f32>, Vec<usize>) {
    let (out, cin, k) = (shape[0], shape[1], shape[2] * shape[3]);
    let mut v = vec![0.0f32; out * c * k];
    for o in 0..out {
        for ch in 0..c {
            let dst = &mut v[(o * c + ch) * k..][..k];
            if c == 1 {
                for src in 0..cin {
                    let from = &w[(o * cin + src) * k..][..k];
                    dst.iter_mut().zip(from).for_each(|(d, s)| *d += s);
                }
            } else {
                let from = &w[(o * cin + ch % cin) * k..][..k];
                let scale = cin as f32 / c as f32;
                dst.iter_mut().zip(from).for_each(|(d, s)| *d = s * scale);
            }
        }
    }
    (v, vec![out, c, shape[2], shape[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_layer_kernels_adapt_to_the_input_channels() {
        // one output, 3 input channels, 1x1 kernels: r=1, g=2, b=4
        let w = [1.0, 2.0, 4.0];
        let (grey, shape) = adapt_input_channels(&w, &[1, 3, 1, 1], 1);
        assert_eq!((grey, shape), (vec![7.0], vec![1, 1, 1, 1]));
        let (five, shape) = adapt_input_channels(&w, &[1, 3, 1, 1], 5);
        assert_eq!(shape, [1, 5, 1, 1]);
        assert_eq!(five, [0.6, 1.2, 2.4, 0.6, 1.2]);
    }
}
