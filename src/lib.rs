//! ekfac: KFAC and EKFAC curvature of neural networks on any GPU through wgpu.
//!
//! Data flows one way: model spec + weights → [`model::sequential::Sequential`] → batches →
//! (layer inputs, output gradients) → Kronecker factors → eigenbases → corrected
//! eigenvalues → operator. [`cpu`] holds the f64 reference of the same maths.

pub mod cpu;
pub mod curvature;
pub mod demo;
pub mod error;
pub mod geometry;
pub mod gpu;
pub mod io;
pub mod loss;
pub mod model;
pub mod ops;
pub mod rng;

pub use error::{Error, Result};
