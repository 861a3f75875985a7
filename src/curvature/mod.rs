//! The curvature maths shared by the CPU reference and the GPU pipeline: options,
//! the parameter/block layout, and the scalar properties from eigenvalues.

pub mod layout;
pub mod options;
pub mod scalars;

pub use options::{DampingMode, FisherType, KfacApprox, LossKind, MIN_DAMPING, Options, Reduction};
pub use scalars::Scalars;
