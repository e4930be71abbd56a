//! The one place that knows which burn backend runs: burn-flex on the CPU, burn-wgpu on
//! a GPU (with the `gpu` cargo feature).

use burn::tensor::Device;

use crate::hint::Message;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    #[default]
    Cpu,
    Gpu,
}

/// The CPU device (burn-flex). Build an autodiff one from it with `.autodiff()`.
pub fn cpu() -> Device {
    Device::flex()
}

/// The device for a backend. Devices are always built explicitly: adding the GPU feature
/// moves burn's `Device::default()` off the CPU.
pub fn device(kind: BackendKind, index: usize) -> Result<Device, Message> {
    match kind {
        BackendKind::Cpu => Ok(cpu()),
        #[cfg(feature = "gpu")]
        BackendKind::Gpu => Ok(Device::wgpu(if index == 0 {
            burn::tensor::DeviceKind::DefaultDevice
        } else {
            burn::tensor::DeviceKind::DiscreteGpu(index)
        })),
        #[cfg(not(feature = "gpu"))]
        BackendKind::Gpu => {
            let _ = index;
            Err(Message::new("this kpipe was built without GPU support")
                .with_hint("build with `cargo build --features gpu` (burn-wgpu)"))
        }
    }
}
