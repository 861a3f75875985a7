//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;
mod check;
pub mod combine;
pub mod conv;
pub mod eigencorrect;
pub mod gemm;
pub mod im2col;
pub mod jacobi;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resample;

use crate::gpu::Shader;

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");
pub(crate) static COMBINE: Shader = crate::shader!("combine");
pub(crate) static CONV: Shader = crate::shader!("conv");
pub(crate) static EIGENCORRECT: Shader = crate::shader!("eigencorrect");
pub(crate) static GEMM: Shader = crate::shader!("gemm");
pub(crate) static IM2COL: Shader = crate::shader!("im2col");
pub(crate) static JACOBI: Shader = crate::shader!("jacobi");
pub(crate) static NORM: Shader = crate::shader!("norm");
pub(crate) static POOL: Shader = crate::shader!("pool");
pub(crate) static REDUCE: Shader = crate::shader!("reduce");
pub(crate) static RESAMPLE: Shader = crate::shader!("resample");

/// Every WGSL file of the crate.
pub(crate) static SHADERS: &[&Shader] = &[
    &ACTIVATION,
    &COMBINE,
    &CONV,
    &EIGENCORRECT,
    &GEMM,
    &IM2COL,
    &JACOBI,
    &loss::LOSS_BCE,
    &loss::LOSS_CROSS_ENTROPY,
    &loss::LOSS_MSE,
    &NORM,
    &POOL,
    &REDUCE,
    &RESAMPLE,
];
