//! The GPU runtime: context (adapter, limits, features, errors), tensors, the pipeline
//! cache and dispatch recording.

pub mod context;
pub mod pipeline;
pub mod profiler;
pub mod tensor;

pub use context::{AdapterSummary, GpuContext, MemoryCounter};
pub use pipeline::{Kernel, Recorder, Shader, all_shaders, grid_1d};
pub use profiler::{PhaseGuard, UNLABELLED_PHASE};
pub use tensor::GpuTensor;
