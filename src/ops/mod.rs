//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;
pub mod jacobi;

use crate::gpu::Shader;

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");
pub(crate) static JACOBI: Shader = crate::shader!("jacobi");

/// Every WGSL file of the crate.
pub(crate) static SHADERS: &[&Shader] = &[&ACTIVATION, &JACOBI];
