//! `masked_fill` with a constant mask (`shaders/masked_fill.wgsl`): `y = value` where
//! the mask is 1, `x` elsewhere; backward zeroes the gradient where filled. The mask is
//! a period of u32 words repeating over the flat tensor (a mask over its trailing
//! dims), so one mask serves every example and every stacked vector.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Both entry points: `len` elements, element `i` reads mask word `i mod mask_len`.
    pub struct MaskedFillParams {
        len: u32,
        mask_len: u32,
        /// The fill value (forward; may be ±inf).
        value: f32,
    }
}

fn dispatch(
    rec: &mut Recorder,
    entry: &'static str,
    src: &GpuTensor,
    mask: &GpuTensor,
    out: &GpuTensor,
    value: f32,
) -> Result<()> {
    let op = entry;
    expect_len(op, "output", out, src.len())?;
    if mask.is_empty() || !src.len().is_multiple_of(mask.len()) {
        return Err(Error::gpu(
            op,
            format!(
                "a mask of {} words does not tile {:?}",
                mask.len(),
                src.shape()
            ),
        ));
    }
    expect_u32(op, &[src.len()])?;
    rec.dispatch(
        &Kernel::new(&super::MASKED_FILL, entry),
        &[src, mask],
        &[out],
        &MaskedFillParams {
            len: src.len() as u32,
            mask_len: mask.len() as u32,
            value,
        },
        grid(src.len()),
    )
}

/// Records `y = mask ? value : x`; `mask` (u32 words, 1 = fill) repeats over `x`.
pub fn masked_fill_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    mask: &GpuTensor,
    value: f32,
    y: &GpuTensor,
) -> Result<()> {
    dispatch(rec, "masked_fill_forward", x, mask, y, value)
}

/// Records `grad_in = mask ? 0 : grad_out` (any stack of gradients).
pub fn masked_fill_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    mask: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    dispatch(rec, "masked_fill_backward", grad_out, mask, grad_in, 0.0)
}
