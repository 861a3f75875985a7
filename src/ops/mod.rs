//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;
pub mod gemm;
pub mod reduce;

use crate::gpu::Shader;

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");
pub(crate) static GEMM: Shader = crate::shader!("gemm");
pub(crate) static REDUCE: Shader = crate::shader!("reduce");

/// Every WGSL file of the crate.
pub(crate) static SHADERS: &[&Shader] = &[&ACTIVATION, &GEMM, &REDUCE];
