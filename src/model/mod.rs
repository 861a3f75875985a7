//! Data and tensor files. The model description, its weights and the GPU network are in
//! [`crate::graph`].

pub mod data;
pub mod tensor_file;

pub use data::{Batch, Dataset, Targets, TargetsSlice};
pub use tensor_file::{TensorFile, TensorRef};
