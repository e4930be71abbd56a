//! The one place that knows which burn backend runs: burn-flex on the CPU, burn-wgpu on
//! a GPU (with the `gpu` cargo feature).

use burn::tensor::{Device, DeviceConfig, FloatDType};

use crate::hint::Message;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    #[default]
    Cpu,
    Gpu,
}

/// The float precision a GPU node computes in (`precision = "..."` on train, evaluate and
/// predict). The CPU backend computes in f32 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 storage and arithmetic.
    #[default]
    F32,
    /// f32 storage, with kernels free to compute in f16 tiles (tensor cores through
    /// cooperative matrices on Vulkan).
    Flex32,
    /// f16 storage and arithmetic (the loss is still computed in f32).
    F16,
}

impl Precision {
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Flex32 => FloatDType::Flex32,
            Precision::F16 => FloatDType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Flex32 => "flex32",
            Precision::F16 => "f16",
        }
    }

    /// Why this precision cannot run on `kind`, if it cannot.
    pub fn unsupported_on(self, kind: BackendKind) -> Option<String> {
        (kind == BackendKind::Cpu && self != Precision::F32).then(|| {
            format!(
                "precision `{}` runs on the GPU backend only (the CPU backend computes in f32): set `backend = \"gpu\"` or `precision = \"f32\"`",
                self.name()
            )
        })
    }
}

/// Lets the allocator keep freed memory for reuse. A training step allocates and frees
/// activations and gradients of tens of MB each; glibc hands blocks over 128 KiB (its
/// threshold grows to at most 32 MiB) to `mmap` and back, and trims the heap's top, so
/// each step faulted fresh zeroed pages in again (12% of a 128x128 U-Net training step
/// on one core; a 256x256 base-32 inference ran 1.25x faster without). Now every block
/// comes from the heap and the heap is not trimmed: the process keeps its peak, which a
/// run reaches in its first steps anyway. One arena for all threads: the kernels run on
/// pool workers ([`on_pool`]), and a worker's own arena is a set of 64 MiB `mmap`ed heaps
/// that glibc shrinks and grows again (17,000 page faults per 128x128 U-Net training
/// step on two threads; none with one arena). Small blocks still come from each
/// thread's cache without the arena's lock. Call before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes glibc malloc's settings; it is called at start-up,
    // before other threads allocate, and both values are within glibc's bounds.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs `f` on a rayon pool of `threads` threads of its own, `f` itself on one of them
/// (the calling thread waits); directly where the caller is already a pool's worker.
///
/// burn-flex's and kpipe's CPU kernels split each operation over the pool of the thread
/// that calls them. From a thread outside every pool, each operation is handed to a
/// worker and waited for: a wake-up per operation, which cost a 64x64 U-Net training
/// step on one thread about a sixth of its time. From a worker, an operation's work
/// starts on that worker at once. No result depends on the pool's size (the kernels cut
/// work by shape alone).
pub fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("kpipe-cpu-{i}"))
        .build()
    {
        Ok(pool) => {
            let span = tracing::Span::current();
            pool.install(move || span.in_scope(f))
        }
        // no threads to be had: the global pool, as before
        Err(_) => f(),
    }
}

/// Logical cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU device (burn-flex). Build an autodiff one from it with `.autodiff()`.
pub fn cpu() -> Device {
    Device::flex()
}

/// How many GPUs the GPU backend finds: the discrete adapters burn-wgpu enumerates (on
/// the graphics API it settles on), or 1 where there is only another kind (an integrated
/// or software adapter, which `DefaultDevice` picks); 0 without the `gpu` feature.
pub fn gpu_count() -> usize {
    #[cfg(feature = "gpu")]
    {
        use burn::backend::Backend;
        // type id 0: discrete GPUs, numbered as `DiscreteGpu(i)` addresses them
        <burn::backend::Wgpu as Backend>::device_count(0).max(1)
    }
    #[cfg(not(feature = "gpu"))]
    0
}

/// The device for a backend, computing in `precision`. Devices are always built
/// explicitly: adding the GPU feature moves burn's `Device::default()` off the CPU.
///
/// burn fixes a device's float type once per process, at its first use: nodes that share
/// a device within one run must share its precision.
pub fn device(kind: BackendKind, index: usize, precision: Precision) -> Result<Device, Message> {
    if let Some(why) = precision.unsupported_on(kind) {
        return Err(Message::new(why));
    }
    let mut device = plain_device(kind, index)?;
    if kind == BackendKind::Gpu {
        let wanted = precision.dtype();
        if !device.supports_dtype(wanted) {
            return Err(Message::new(format!(
                "GPU device {index} does not compute in {}",
                precision.name()
            ))
            .with_hint("use `precision = \"f32\"`"));
        }
        if device
            .configure(DeviceConfig::default().float_dtype(wanted))
            .is_err()
            && device.settings().float_dtype != wanted
        {
            return Err(Message::new(format!(
                "GPU device {index} already computes in {:?} in this run, not {}",
                device.settings().float_dtype,
                precision.name()
            ))
            .with_hint(
                "give the nodes on one device the same `precision`, or run them in separate `kpipe run`s",
            ));
        }
    }
    Ok(device)
}

/// The device as a benchmark reports it: on the GPU the adapter's name and the runtime,
/// which names the shader compiler its kernels go through (`wgpu<wgsl>`, or
/// `wgpu<spirv>` in a build with the `vulkan` feature on an adapter that has what burn's
/// SPIR-V compiler needs).
pub fn describe(device: &Device, kind: BackendKind) -> String {
    match kind {
        BackendKind::Cpu => "CPU (burn-flex)".into(),
        #[cfg(feature = "gpu")]
        BackendKind::Gpu => {
            let plain = device.clone().inner();
            let runtime = match plain.as_dispatch() {
                burn::backend::DispatchDevice::Cube(d) => d.client().name(),
                _ => "?",
            };
            device.identity().map_or_else(
                || format!("{device:?} ({runtime})"),
                |id| format!("{} ({}, {runtime})", id.name, id.fingerprint),
            )
        }
        #[cfg(not(feature = "gpu"))]
        BackendKind::Gpu => format!("{device:?}"),
    }
}

fn plain_device(kind: BackendKind, index: usize) -> Result<Device, Message> {
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
