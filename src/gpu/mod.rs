//! The GPU runtime: context (adapter, limits, features, errors), tensors, the pipeline
//! cache and dispatch recording.

pub mod context;
pub mod counters;
pub mod params;
pub mod pipeline;
pub mod profiler;
pub mod tensor;

pub use context::{AdapterSummary, GpuContext, MemoryCounter};
pub use counters::WorkCounts;
pub use params::{KernelParams, ParamsLayout};
pub use pipeline::{Kernel, Recorder, Shader, grid_1d};
pub use profiler::{PhaseGuard, UNLABELLED_PHASE};
pub use tensor::GpuTensor;
