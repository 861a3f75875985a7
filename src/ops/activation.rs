//! ReLU, sigmoid and tanh forward and backward.

use crate::error::Result;
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};

/// Records `y = relu(x)` elementwise; `x` and `y` have the same length.
pub fn relu_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let len = x.len() as u32;
    rec.dispatch(
        &Kernel::new(&super::ACTIVATION, "relu_forward"),
        &[x],
        &[y],
        &[len],
        grid_1d(len.div_ceil(256)),
    )
}

/// `relu(x)` as a new tensor, submitted at once.
pub fn relu(ctx: &GpuContext, x: &GpuTensor) -> Result<GpuTensor> {
    let y = ctx.zeros(x.shape())?;
    let mut rec = ctx.recorder();
    relu_forward(&mut rec, x, &y)?;
    rec.submit()?;
    Ok(y)
}
