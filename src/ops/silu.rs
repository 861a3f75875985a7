//! SiLU forward and backward (`shaders/silu.wgsl`), elementwise over tensors of any
//! shape. Backward takes a `V`-major stack of gradients and reads the saved forward
//! input without repeating it.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Forward: `len` elements.
    pub struct ElementwiseParams {
        len: u32,
    }
}

kernel_params! {
    /// Backward: `len` gradient elements, a stack of gradients of the `x_len` saved
    /// inputs (element `i` reads `x[i mod x_len]`).
    pub struct StackedParams {
        len: u32,
        x_len: u32,
    }
}

/// Records `y = x·σ(x)`; `y` has as many elements as `x`.
pub fn silu_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let op = "silu forward";
    expect_len(op, "y", y, x.len())?;
    expect_u32(op, &[x.len()])?;
    rec.dispatch(
        &Kernel::new(&super::SILU, "silu_forward"),
        &[x],
        &[y],
        &ElementwiseParams {
            len: x.len() as u32,
        },
        grid(x.len()),
    )
}

/// Records `grad_in = grad_out·(σ(x) + x·σ′(x))` for a stack of gradients: `x` the
/// saved forward input, `grad_out` `V` times as long (`V`-major), `grad_in` like
/// `grad_out` (overwritten).
pub fn silu_backward(
    rec: &mut Recorder,
    x: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "silu backward";
    if x.is_empty() || !grad_out.len().is_multiple_of(x.len()) {
        return Err(Error::gpu(
            op,
            format!(
                "grad_out {:?} must be a stack of gradients shaped like x {:?}",
                grad_out.shape(),
                x.shape()
            ),
        ));
    }
    expect_len(op, "grad_in", grad_in, grad_out.len())?;
    expect_u32(op, &[grad_out.len()])?;
    rec.dispatch(
        &Kernel::new(&super::SILU, "silu_backward"),
        &[x, grad_out],
        &[grad_in],
        &StackedParams {
            len: grad_out.len() as u32,
            x_len: x.len() as u32,
        },
        grid(grad_out.len()),
    )
}
