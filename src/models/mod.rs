//! The study's segmentation networks, as burn modules: one module each, with a
//! `XxxConfig` (serde, from the train stage's TOML) whose `init` builds the network and
//! a `forward` from `[batch, channels, h, w]` images to `[batch, classes, h, w]` logits.
//!
//! | model      | what it is                                                     |
//! |------------|----------------------------------------------------------------|
//! | `unet`     | 4-level U-Net, 'same' padding, transposed-conv up, concat skips |
//! | `fcn8s`    | FCN-8s on a VGG16 encoder (the study's FCN V1)                 |
//! | `fcn8s-v2` | the same with a 3x3 conv + ReLU after each transposed conv     |
//! | `linknet`  | ResNet18-style encoder, LinkNet decoder blocks, additive skips |

pub mod blocks;
pub mod fcn;
pub mod linknet;
pub mod ops;
pub mod unet;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use fcn::{Fcn, FcnConfig};
pub use linknet::{LinkNet, LinkNetConfig};
pub use unet::{UNet, UNetConfig};

/// `model.json` of a train artifact: what predict and evaluate need to rebuild the
/// network and slice like training did, and which epoch's weights `model.safetensors`
/// holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    pub model: ModelConfig,
    pub slices: crate::data::slices::SliceMeta,
    /// The 1-based epoch of `model.safetensors`, and the rule that chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<KeptEpoch>,
}

/// Which epoch a train stage kept, by which rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptEpoch {
    pub epoch: usize,
    pub of: usize,
    /// `"best"` or `"last"`.
    pub keep: String,
    pub metric: String,
    pub value: Option<f64>,
}

impl ModelFile {
    pub const FILE: &'static str = "model.json";
}

/// Output classes: background, kidney, tumor.
pub const CLASSES: usize = 3;

/// Which network, with its own settings; `model = "unet"` in TOML, with the settings
/// beside it (`base`, `batch-norm`, `up-kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    Unet,
    Fcn8s,
    Fcn8sV2,
    Linknet,
}

impl ModelKind {
    pub const ALL: [ModelKind; 4] = [
        ModelKind::Unet,
        ModelKind::Fcn8s,
        ModelKind::Fcn8sV2,
        ModelKind::Linknet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Unet => "unet",
            ModelKind::Fcn8s => "fcn8s",
            ModelKind::Fcn8sV2 => "fcn8s-v2",
            ModelKind::Linknet => "linknet",
        }
    }

    /// Trainable parameters the study reports, where it reports one that fits.
    pub fn study_params(self) -> Option<usize> {
        match self {
            ModelKind::Unet => Some(31_031_857),
            ModelKind::Fcn8s => Some(6_198_019),
            ModelKind::Fcn8sV2 => Some(11_543_715),
            ModelKind::Linknet => None, // reported as 11,543,715: a copy of FCN V2's figure
        }
    }
}

/// A model's full configuration, as stored beside its weights (`model.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub in_channels: usize,
    /// Width of the first level (U-Net: 64 in the study; LinkNet and FCN use their own).
    pub base: usize,
    pub batch_norm: bool,
    /// U-Net's transposed-convolution kernel: 2 (default; fits the study's count) or 3.
    pub up_kernel: usize,
    /// FCN: freeze the VGG16 encoder (when pretrained weights are given).
    pub freeze_encoder: bool,
}

/// Any of the networks.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per training run
pub enum Network {
    UNet(UNet),
    Fcn(Fcn),
    LinkNet(LinkNet),
}

impl Network {
    /// Per-pixel class logits.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, height, width]`, height and width multiples of
    ///   [`ModelConfig::size_multiple`]
    /// - output: `[batch, CLASSES, height, width]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Network::UNet(m) => m.forward(x),
            Network::Fcn(m) => m.forward(x),
            Network::LinkNet(m) => m.forward(x),
        }
    }

    /// FCN: the VGG16 encoder from a torchvision-named safetensors file.
    pub fn load_vgg16(self, path: &std::path::Path, device: &Device) -> Result<Self, String> {
        match self {
            Network::Fcn(f) => f.load_vgg16(path, device).map(Network::Fcn),
            _ => Err("pretrained VGG16 weights fit the FCN models only".into()),
        }
    }

    /// Freezes what `config` says is frozen (again after any load of weights).
    pub fn frozen_as(self, config: &ModelConfig) -> Self {
        match self {
            Network::Fcn(f) if config.freeze_encoder => Network::Fcn(f.freeze_encoder()),
            other => other,
        }
    }
}

impl ModelConfig {
    pub fn init(&self, device: &Device) -> Network {
        match self.kind {
            ModelKind::Unet => Network::UNet(
                UNetConfig::new(self.in_channels, self.base)
                    .with_batch_norm(self.batch_norm)
                    .with_up_kernel(self.up_kernel)
                    .init(device),
            ),
            ModelKind::Fcn8s | ModelKind::Fcn8sV2 => Network::Fcn(
                FcnConfig::new(self.in_channels, self.base)
                    .with_v2(self.kind == ModelKind::Fcn8sV2)
                    .with_batch_norm(self.batch_norm)
                    .init(device),
            ),
            ModelKind::Linknet => {
                Network::LinkNet(LinkNetConfig::new(self.in_channels, self.base).init(device))
            }
        }
    }

    /// The input size of every network here must be a multiple of this (five halvings).
    pub const SIZE_MULTIPLE: usize = 32;

    /// The input size must be a multiple of this.
    pub fn size_multiple(&self) -> usize {
        Self::SIZE_MULTIPLE
    }
}

/// Trainable and frozen parameter counts.
pub fn param_counts(net: &Network, freeze_encoder: bool) -> (usize, usize) {
    let total = net.num_params();
    let frozen = match net {
        Network::Fcn(f) if freeze_encoder => f.encoder_params(),
        _ => 0,
    };
    (total - frozen, frozen)
}
