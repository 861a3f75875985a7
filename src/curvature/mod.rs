//! The curvature maths shared by the CPU reference and the GPU pipeline: options,
//! the parameter/block layout, and the scalar properties from eigenvalues.

pub mod options;
pub mod scalars;

pub use options::{FisherType, KfacApprox, LossKind, Options, Reduction};
pub use scalars::Scalars;
