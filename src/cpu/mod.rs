//! The f64 CPU reference of the crate's maths: the test oracle.

pub mod curvature;
pub mod graph_ops;
pub mod nn;
pub mod ops;
