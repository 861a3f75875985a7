//! Adapter selection, device creation, limits, features and error capture.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::counters::WorkCounter;
use crate::gpu::pipeline::PipelineCache;
use crate::gpu::profiler::Profiler;

/// Counts the bytes of GPU buffers the crate has allocated: what is live now and the peak.
#[derive(Debug, Default)]
pub struct MemoryCounter {
    current: AtomicU64,
    peak: AtomicU64,
}

impl MemoryCounter {
    pub(crate) fn allocate(&self, bytes: u64) {
        let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, bytes: u64) {
        self.current.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes of crate-owned GPU buffers alive now.
    pub fn current_bytes(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    /// Largest value [`Self::current_bytes`] has reached since the last reset.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from the current live bytes.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// What the adapter is, as printed by `ekfac info` and recorded in state files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub driver: String,
    pub device_type: String,
}

/// A wgpu device and queue plus everything the crate keeps per device: the pipeline
/// cache, captured errors and the memory counter.
///
/// Create one with [`GpuContext::new`] (the crate picks an adapter) or adopt the
/// device of a host application with [`GpuContext::from_device`].
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// Limits the device was created with.
    pub limits: wgpu::Limits,
    /// Features the device was created with.
    pub features: wgpu::Features,
    pub(crate) pipelines: PipelineCache,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    pub(crate) memory: Arc<MemoryCounter>,
    memory_budget: AtomicU64,
    /// Timestamp bookkeeping while GPU profiling is on; `None` (no queries) while off.
    profiler: Mutex<Option<Profiler>>,
    /// Dispatches, submissions and readbacks per phase ([`crate::gpu::counters`]).
    pub(crate) work: WorkCounter,
}

/// How `EKFAC_FEATURES` restricts the device.
fn portable_only() -> bool {
    std::env::var("EKFAC_FEATURES").is_ok_and(|v| v.eq_ignore_ascii_case("none"))
}

/// Optional features the crate uses when the adapter has them. Each has a portable
/// fallback: without `TIMESTAMP_QUERY` phases are timed on the host.
const OPTIONAL_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY;

/// The limits the kernels need: WebGPU's defaults (workgroups of at most 256
/// invocations, 16 KiB of workgroup memory, 8 storage buffers per stage), with buffer
/// sizes raised to what the adapter offers so large factors fit.
fn required_limits(adapter: &wgpu::Limits) -> wgpu::Limits {
    let defaults = wgpu::Limits::default();
    if portable_only() {
        return defaults;
    }
    wgpu::Limits {
        max_storage_buffer_binding_size: adapter.max_storage_buffer_binding_size,
        max_buffer_size: adapter.max_buffer_size,
        max_compute_workgroups_per_dimension: adapter.max_compute_workgroups_per_dimension,
        ..defaults
    }
}

fn default_memory_budget(limits: &wgpu::Limits) -> u64 {
    (limits.max_buffer_size / 2).clamp(256 << 20, 4 << 30)
}

impl GpuContext {
    /// Picks an adapter and opens a device on it.
    ///
    /// `WGPU_BACKEND` restricts the backends (e.g. `vulkan`, `metal`, `dx12`),
    /// `EKFAC_ADAPTER=<substring>` picks the first adapter whose name contains the
    /// substring (case-insensitive); `EKFAC_ADAPTER_INDEX=<i>`, or under OpenMPI the
    /// node-local rank modulo the number of GPUs, picks one of the GPUs by position
    /// ([`crate::distributed::adapter_index`]); otherwise the high-performance adapter
    /// is used.
    /// `EKFAC_FEATURES=none` requests only WebGPU's default features and limits.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    async fn new_async() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapter = match std::env::var("EKFAC_ADAPTER") {
            Ok(wanted) => {
                let adapters = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| {
                        a.get_info()
                            .name
                            .to_lowercase()
                            .contains(&wanted.to_lowercase())
                    })
                    .ok_or_else(|| {
                        Error::NoAdapter(format!(
                            "EKFAC_ADAPTER={wanted:?} matches none of the adapters {names:?}"
                        ))
                    })?
            }
            Err(_) if crate::distributed::adapter_by_rank() => {
                // One rank per adapter (issue 14): the GPUs (or, without any, every
                // adapter) in the order the instance lists them.
                let mut adapters = instance.enumerate_adapters(backends).await;
                if adapters
                    .iter()
                    .any(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
                {
                    adapters.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
                }
                let index = crate::distributed::adapter_index(adapters.len())?.unwrap_or(0);
                if adapters.is_empty() {
                    return Err(Error::NoAdapter(format!(
                        "backends {backends:?}: none found"
                    )));
                }
                adapters.swap_remove(index)
            }
            Err(_) => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| Error::NoAdapter(format!("backends {backends:?}: {e}")))?,
        };
        let features = if portable_only() {
            wgpu::Features::empty()
        } else {
            adapter.features() & OPTIONAL_FEATURES
        };
        let limits = required_limits(&adapter.limits());
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ekfac"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::gpu("opening the device", e))?;
        Ok(Self::from_device(device, queue, adapter.get_info()))
    }

    /// Adopts a device and queue that the host application already owns. The crate
    /// only uses the limits and features the device reports.
    ///
    /// Installs an uncaptured-error handler and a device-lost callback on `device`; the
    /// errors they see are returned by the next crate call that synchronises.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(Mutex::new(None));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        }));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *lost_sink.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("{reason:?}: {message}"));
        });
        let limits = device.limits();
        let features = device.features();
        let memory_budget = AtomicU64::new(default_memory_budget(&limits));
        Self {
            device,
            queue,
            info,
            limits,
            features,
            pipelines: PipelineCache::default(),
            errors,
            lost,
            memory: Arc::new(MemoryCounter::default()),
            memory_budget,
            profiler: Mutex::new(None),
            work: WorkCounter::default(),
        }
    }

    /// Bytes of GPU memory a fit may plan for: batches and stacks of backpropagated
    /// vectors are split into chunks that fit. Defaults to half the adapter's
    /// `max_buffer_size`, clamped to 256 MiB ..= 4 GiB.
    pub fn memory_budget(&self) -> u64 {
        self.memory_budget.load(Ordering::Relaxed)
    }

    /// Sets [`Self::memory_budget`].
    pub fn set_memory_budget(&self, bytes: u64) {
        self.memory_budget.store(bytes, Ordering::Relaxed);
    }

    /// The adapter's name, backend, driver and device type.
    pub fn adapter_summary(&self) -> AdapterSummary {
        AdapterSummary {
            name: self.info.name.clone(),
            backend: format!("{:?}", self.info.backend),
            driver: format!("{} {}", self.info.driver, self.info.driver_info)
                .trim()
                .to_string(),
            device_type: format!("{:?}", self.info.device_type),
        }
    }

    /// Bytes of GPU memory the crate has allocated: live and peak.
    pub fn memory(&self) -> &MemoryCounter {
        &self.memory
    }

    /// Whether GPU timestamp queries are available for phase timing
    /// ([`GpuContext::set_profiling`]).
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    pub(crate) fn profiler_lock(&self) -> std::sync::MutexGuard<'_, Option<Profiler>> {
        self.profiler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the first error the uncaptured-error handler or the device-lost callback
    /// recorded since the last call, as an [`Error::Gpu`] about `context`.
    pub fn check_errors(&self, context: &str) -> Result<()> {
        if let Some(reason) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::gpu(context, format!("device lost ({reason})")));
        }
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            return Ok(());
        }
        let all = errors.join("; ");
        errors.clear();
        Err(Error::gpu(context, all))
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns whatever
    /// they capture into an [`Error::Gpu`] about `context`.
    pub fn scoped<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation_error = pollster::block_on(validation.pop());
        let oom_error = pollster::block_on(oom.pop());
        if let Some(e) = validation_error.or(oom_error) {
            return Err(Error::gpu(context, e));
        }
        Ok(value)
    }

    /// Blocks until all submitted work is done, then reports captured errors.
    pub fn wait(&self, context: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::gpu(context, e))?;
        self.check_errors(context)
    }

    /// A multi-line description for `ekfac info`.
    pub fn describe(&self) -> String {
        let a = self.adapter_summary();
        let l = &self.limits;
        format!(
            "adapter:      {}\nbackend:      {}\ndriver:       {}\ndevice type:  {}\n\
             features:     {:?}\nlimits:\n  max_storage_buffer_binding_size: {}\n  \
             max_buffer_size: {}\n  max_compute_workgroup_storage_size: {}\n  \
             max_compute_invocations_per_workgroup: {}\n  \
             max_compute_workgroups_per_dimension: {}\n  \
             max_storage_buffers_per_shader_stage: {}",
            a.name,
            a.backend,
            a.driver,
            a.device_type,
            self.features,
            l.max_storage_buffer_binding_size,
            l.max_buffer_size,
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension,
            l.max_storage_buffers_per_shader_stage,
        )
    }
}
