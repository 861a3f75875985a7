//! One typed wrapper per kernel family of `shaders/`.

pub mod activation;

use crate::gpu::Shader;

pub(crate) static ACTIVATION: Shader = crate::shader!("activation");

/// Every WGSL file of the crate.
pub(crate) static SHADERS: &[&Shader] = &[&ACTIVATION];
