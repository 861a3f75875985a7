//! The curvature maths shared by the CPU reference and the GPU pipeline: options,
//! the parameter/block layout, and the scalar properties from eigenvalues.

mod batches;
mod correction;
pub mod eigen;
mod factors;
pub mod fit;
pub mod influence;
pub mod layer;
pub mod layout;
pub mod operator;
pub mod options;
pub mod scalars;
pub mod state;
pub mod summary;
pub mod validate;

pub use options::{DampingMode, FisherType, KfacApprox, LossKind, MIN_DAMPING, Options, Reduction};
pub use scalars::Scalars;
