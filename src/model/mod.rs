//! The network: JSON layer spec, safetensors weights, data, Sequential forward/backward.

pub mod data;
pub mod sequential;
pub mod spec;
pub mod tensor_file;
pub mod weights;

pub use data::{Batch, Dataset, Targets, TargetsSlice};
pub use spec::{Conv2dSpec, Layer, LinearSpec, ModelSpec, PoolSpec};
pub use tensor_file::{TensorFile, TensorRef};
pub use weights::{LayerParams, Model};
