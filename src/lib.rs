//! ekfac: KFAC and EKFAC curvature of neural networks on any GPU through wgpu.
//!
//! Data flows one way: graph + weights → [`graph::Network`] → batches →
//! (layer inputs, output gradients) → Kronecker factors → eigenbases → corrected
//! eigenvalues → operator. [`reference`] holds the f64 reference of the same maths.

pub mod curvature;
pub mod data;
pub mod demo;
pub mod distributed;
pub mod error;
pub mod geometry;
pub mod gpu;
pub mod graph;
pub mod io;
pub mod layers;
pub mod loss;
pub mod model;
pub mod ops;
pub mod plot;
pub mod progress;
pub mod reference;
pub mod report;
pub mod rng;

pub use error::{Error, Result};
