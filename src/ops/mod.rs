//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;
pub mod conv;
pub mod eigencorrect;
pub mod gemm;
pub mod jacobi;
pub mod pool;
pub mod reduce;

use crate::gpu::Shader;

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");
pub(crate) static EIGENCORRECT: Shader = crate::shader!("eigencorrect");
pub(crate) static GEMM: Shader = crate::shader!("gemm");
pub(crate) static JACOBI: Shader = crate::shader!("jacobi");
pub(crate) static POOL: Shader = crate::shader!("pool");
pub(crate) static REDUCE: Shader = crate::shader!("reduce");

/// Every WGSL file of the crate.
pub(crate) static SHADERS: &[&Shader] = &[&ACTIVATION, &EIGENCORRECT, &GEMM, &JACOBI, &POOL, &REDUCE];
