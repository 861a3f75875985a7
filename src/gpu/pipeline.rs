//! Shader sources, the pipeline cache, and recording dispatches into one compute pass.
//!
//! The runtime knows no kernels: a [`Kernel`] names a [`Shader`] (WGSL source) and an
//! entry point, and its parameters are any [`KernelParams`] struct.
//!
//! Binding convention shared by every kernel in `shaders/`: bind group 0 holds the
//! read-only storage inputs at bindings `0..r`, then the read-write outputs at
//! `r..r+w`, then (if the kernel takes parameters) its parameter struct at binding
//! `r+w`: a read-only storage binding at a dynamic offset into the one parameter
//! buffer of its [`Recorder`].
//!
//! Parameters are a storage buffer, not a uniform buffer: the software Vulkan driver
//! (lavapipe, Mesa 22.3) specialises a kernel on its uniform values at every pipeline
//! bind when that removes most of its code, and keeps each specialisation until the
//! pipeline is destroyed; the loss kernel leaked about 600 KiB per dispatch that way
//! (`tests/host_memory.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::params::KernelParams;
use crate::gpu::tensor::GpuTensor;

/// One WGSL file of `shaders/`.
#[derive(Debug)]
pub struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// Declares a [`Shader`] whose source is `shaders/<name>.wgsl`, compiled in; with
/// `after <common>`, `shaders/<common>.wgsl` is prepended (helpers several shaders
/// share: WGSL has no includes).
#[macro_export]
macro_rules! shader {
    ($name:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/shaders/",
                $name,
                ".wgsl"
            )),
        }
    };
    ($name:literal after $common:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: concat!(
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/shaders/",
                    $common,
                    ".wgsl"
                )),
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/shaders/",
                    $name,
                    ".wgsl"
                ))
            ),
        }
    };
}

/// A compute entry point with its pipeline-overridable constants (WGSL `override`).
#[derive(Debug, Clone)]
pub struct Kernel {
    pub shader: &'static Shader,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
}

impl Kernel {
    /// The entry point `entry` of `shader` with default constants.
    pub fn new(shader: &'static Shader, entry: &'static str) -> Self {
        Self {
            shader,
            entry,
            constants: Vec::new(),
        }
    }

    /// Sets an `override` constant.
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value));
        self
    }
}

#[derive(Hash, PartialEq, Eq, Clone)]
struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    /// Each constant's name and value bits.
    constants: Vec<(&'static str, u64)>,
    reads: usize,
    writes: usize,
    params: bool,
}

struct CachedPipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Compiled pipelines keyed by shader name, entry point, constants and binding layout.
#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<CachedPipeline>>>,
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl GpuContext {
    fn module(&self, shader: &'static Shader) -> Result<Arc<wgpu::ShaderModule>> {
        let mut modules = self
            .pipelines
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(shader.name) {
            return Ok(m.clone());
        }
        let descriptor = wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        };
        let module = self.scoped(&format!("compiling shaders/{}.wgsl", shader.name), || {
            if cfg!(debug_assertions) || std::env::var_os("EKFAC_SHADER_CHECKS").is_some() {
                self.device.create_shader_module(descriptor)
            } else {
                // SAFETY: every kernel guards its own indices against the sizes it is
                // given (the debug build and `EKFAC_SHADER_CHECKS=1` run the same
                // kernels with runtime bounds checks, and the tests exercise both).
                unsafe {
                    self.device.create_shader_module_trusted(
                        descriptor,
                        wgpu::ShaderRuntimeChecks::unchecked(),
                    )
                }
            }
        })?;
        let module = Arc::new(module);
        modules.insert(shader.name, module.clone());
        Ok(module)
    }

    fn pipeline(
        &self,
        kernel: &Kernel,
        reads: usize,
        writes: usize,
        params: bool,
    ) -> Result<Arc<CachedPipeline>> {
        let key = PipelineKey {
            shader: kernel.shader.name,
            entry: kernel.entry,
            constants: kernel
                .constants
                .iter()
                .map(|&(name, value)| (name, value.to_bits()))
                .collect(),
            reads,
            writes,
            params,
        };
        if let Some(p) = self
            .pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let module = self.module(kernel.shader)?;
        let mut entries: Vec<_> = (0..reads + writes)
            .map(|i| storage_entry(i as u32, i < reads))
            .collect();
        if params {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: (reads + writes) as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: true },
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let context = format!(
            "creating pipeline {}::{} {:?}",
            kernel.shader.name, kernel.entry, kernel.constants
        );
        let cached = self.scoped(&context, || {
            let layout = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(kernel.entry),
                    entries: &entries,
                });
            let pipeline_layout =
                self.device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(kernel.entry),
                        bind_group_layouts: &[Some(&layout)],
                        immediate_size: 0,
                    });
            let pipeline = self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(kernel.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &kernel.constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            CachedPipeline { pipeline, layout }
        })?;
        let cached = Arc::new(cached);
        self.pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, cached.clone());
        Ok(cached)
    }

    /// Starts recording dispatches that will run in one compute pass.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder {
            ctx: self,
            steps: Vec::new(),
            params: Vec::new(),
            flops: 0,
        }
    }
}

/// A storage binding of one recorded dispatch: a range of a buffer.
struct Bound {
    buffer: wgpu::Buffer,
    offset: u64,
    size: Option<std::num::NonZeroU64>,
}

struct Step {
    pipeline: Arc<CachedPipeline>,
    label: &'static str,
    bindings: Vec<Bound>,
    /// Byte offset and size of the dispatch's parameters in the recorder's parameter
    /// buffer; size 0 for a kernel without parameters.
    params: (u32, u64),
    workgroups: [u32; 3],
}

/// Dispatches recorded in order and submitted together as one compute pass. wgpu
/// orders the dispatches of a pass, so each may read what the previous ones wrote.
///
/// The parameters of all dispatches are packed into one buffer, each at a multiple of
/// the adapter's `min_storage_buffer_offset_alignment`, uploaded once at
/// [`Recorder::submit`] and bound at a dynamic offset per dispatch.
pub struct Recorder<'a> {
    ctx: &'a GpuContext,
    steps: Vec<Step>,
    /// The packed parameters, 32-bit words.
    params: Vec<u32>,
    /// Floating-point operations declared so far ([`Recorder::count_flops`]).
    flops: u64,
}

impl<'a> Recorder<'a> {
    /// Records `kernel` over `workgroups`, binding `reads`, then `writes`, then
    /// `params` as described in the module docs. A dispatch with zero workgroups in any
    /// dimension is skipped.
    pub fn dispatch<P: KernelParams>(
        &mut self,
        kernel: &Kernel,
        reads: &[&GpuTensor],
        writes: &[&GpuTensor],
        params: &P,
        workgroups: [u32; 3],
    ) -> Result<()> {
        self.record(
            kernel,
            reads,
            writes,
            bytemuck::cast_slice(bytemuck::bytes_of(params)),
            workgroups,
        )
    }

    fn record(
        &mut self,
        kernel: &Kernel,
        reads: &[&GpuTensor],
        writes: &[&GpuTensor],
        params: &[u32],
        workgroups: [u32; 3],
    ) -> Result<()> {
        if workgroups.contains(&0) {
            return Ok(());
        }
        let max = self.ctx.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::gpu(
                format!("dispatching {}::{}", kernel.shader.name, kernel.entry),
                format!("workgroup grid {workgroups:?} exceeds the limit of {max} per dimension"),
            ));
        }
        if let Some(t) = reads.iter().chain(writes).find(|t| t.is_released()) {
            return Err(Error::gpu(
                format!("dispatching {}::{}", kernel.shader.name, kernel.entry),
                format!(
                    "it binds a released tensor of shape {:?}: a forward value that the \
                     layer's Layer::saved does not declare",
                    t.shape()
                ),
            ));
        }
        let limit = self.ctx.limits.max_storage_buffer_binding_size;
        if let Some(t) = reads
            .iter()
            .chain(writes)
            .find(|t| t.binding_size() > limit)
        {
            return Err(Error::Memory(format!(
                "{}::{} would bind a tensor of shape {:?} ({} bytes), more than the adapter's \
                 max_storage_buffer_binding_size of {limit} bytes",
                kernel.shader.name,
                kernel.entry,
                t.shape(),
                t.binding_size()
            )));
        }
        let pipeline = self
            .ctx
            .pipeline(kernel, reads.len(), writes.len(), !params.is_empty())?;
        let bindings = reads
            .iter()
            .chain(writes)
            .map(|t| match t.binding()? {
                wgpu::BindingResource::Buffer(b) => Ok(Bound {
                    buffer: b.buffer.clone(),
                    offset: b.offset,
                    size: b.size,
                }),
                _ => unreachable!("tensors bind buffers"),
            })
            .collect::<Result<_>>()?;
        let align = (self.ctx.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let offset = self.params.len().next_multiple_of(align);
        if !params.is_empty() {
            self.params.resize(offset, 0);
            self.params.extend_from_slice(params);
        }
        self.steps.push(Step {
            pipeline,
            label: kernel.entry,
            bindings,
            params: ((offset * 4) as u32, (params.len() * 4) as u64),
            workgroups,
        });
        Ok(())
    }

    /// Number of dispatches recorded so far.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Declares `flops` floating-point operations of the work recorded so far, counted
    /// from its shapes by the op that records it. They are added to the current phase's
    /// [`crate::gpu::WorkCounts::flops`] when the pass is submitted (a benchmark's cost
    /// driver; nothing else reads them).
    pub fn count_flops(&mut self, flops: u64) {
        self.flops = self.flops.saturating_add(flops);
    }

    /// The context the dispatches are recorded for, e.g. to allocate temporaries. A
    /// temporary may be dropped once recorded: the recorded work keeps its buffer
    /// alive until the GPU is done with it.
    pub fn context(&self) -> &'a GpuContext {
        self.ctx
    }

    /// Uploads the parameters, encodes every recorded dispatch into one compute pass
    /// and submits it. Does not wait; reading a tensor back (or [`GpuContext::wait`])
    /// synchronises. While GPU profiling is on the pass writes timestamps at its
    /// beginning and end ([`crate::gpu::profiler`]).
    pub fn submit(self) -> Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let len = self.params.len();
        let param_buffer = (len > 0)
            .then(|| self.ctx.upload_u32(&self.params, &[len]))
            .transpose()?;
        let param_buffer = param_buffer.as_ref().map(|t| t.buffer()).transpose()?;
        let bind_groups: Vec<wgpu::BindGroup> = self
            .steps
            .iter()
            .map(|step| {
                let mut entries: Vec<wgpu::BindGroupEntry> = step
                    .bindings
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &b.buffer,
                            offset: b.offset,
                            size: b.size,
                        }),
                    })
                    .collect();
                if let (Some(buffer), size @ 1..) = (param_buffer, step.params.1) {
                    entries.push(wgpu::BindGroupEntry {
                        binding: step.bindings.len() as u32,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset: 0,
                            size: std::num::NonZeroU64::new(size),
                        }),
                    });
                }
                self.ctx
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(step.label),
                        layout: &step.pipeline.layout,
                        entries: &entries,
                    })
            })
            .collect();
        let mut encoder = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        let mut profiler = self.ctx.profiler_lock();
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: profiler
                    .as_mut()
                    .map(|p| p.timestamp_writes(&self.ctx.device)),
            });
            for (step, bind_group) in self.steps.iter().zip(&bind_groups) {
                pass.set_pipeline(&step.pipeline.pipeline);
                let offsets: &[u32] = if step.params.1 > 0 {
                    &[step.params.0]
                } else {
                    &[]
                };
                pass.set_bind_group(0, bind_group, offsets);
                let [x, y, z] = step.workgroups;
                pass.dispatch_workgroups(x, y, z);
            }
        }
        if let Some(p) = profiler.as_mut() {
            p.after_pass(&self.ctx.device, &mut encoder);
        }
        drop(profiler);
        self.ctx.queue.submit([encoder.finish()]);
        self.ctx.work.submitted(self.steps.len(), self.flops);
        self.ctx.check_errors("submitting GPU work")
    }
}

/// Splits `groups` workgroups into a 2-D grid that respects the per-dimension limit
/// (65535 by WebGPU's defaults). Kernels recover the linear workgroup index as
/// `wid.x + wid.y * nwg.x`, and must ignore indices at or beyond `groups`.
pub fn grid_1d(groups: u32) -> [u32; 3] {
    const MAX: u32 = 65535;
    if groups <= MAX {
        [groups, 1, 1]
    } else {
        [MAX, groups.div_ceil(MAX), 1]
    }
}
