//! Argument checks shared by the kernel wrappers: shapes, element counts and 32-bit
//! indices.

use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, grid_1d};

/// Errors unless `t` has exactly `len` elements.
pub(crate) fn expect_len(op: &str, name: &str, t: &GpuTensor, len: usize) -> Result<()> {
    if t.len() != len {
        return Err(Error::gpu(
            op,
            format!(
                "{name} must have {len} elements, found shape {:?} ({} elements)",
                t.shape(),
                t.len()
            ),
        ));
    }
    Ok(())
}

/// Errors unless each `(name, tensor, len)` has `len` elements, naming `shape` (the
/// problem the lengths follow from) otherwise.
pub(crate) fn expect_lens(
    op: &str,
    shape: &impl std::fmt::Debug,
    tensors: &[(&str, &GpuTensor, usize)],
) -> Result<()> {
    for (name, t, len) in tensors {
        if t.len() != *len {
            return Err(Error::gpu(
                op,
                format!(
                    "{name} must have {len} elements for {shape:?}, found shape {:?}",
                    t.shape()
                ),
            ));
        }
    }
    Ok(())
}

/// Errors unless `t` has at least `len` elements (scratch buffers may be larger).
pub(crate) fn expect_at_least(op: &str, name: &str, t: &GpuTensor, len: usize) -> Result<()> {
    if t.len() < len {
        return Err(Error::gpu(
            op,
            format!(
                "{name} needs at least {len} elements, found shape {:?} ({} elements)",
                t.shape(),
                t.len()
            ),
        ));
    }
    Ok(())
}

/// `(batch, n)` of a tensor of square matrices, `[n, n]` (batch 1) or `[batch, n, n]`;
/// an error naming `op` otherwise.
pub(crate) fn square_batch(op: &str, t: &GpuTensor) -> Result<(usize, usize)> {
    match *t.shape() {
        [r, c] if r == c => Ok((1, r)),
        [b, r, c] if r == c => Ok((b, r)),
        ref s => Err(Error::gpu(
            op,
            format!("expected a [n, n] or [batch, n, n] matrix, found shape {s:?}"),
        )),
    }
}

/// Errors unless every count fits the kernels' 32-bit index arithmetic (with room for
/// one more workgroup of 256).
pub(crate) fn expect_u32(op: &str, counts: &[usize]) -> Result<()> {
    if let Some(n) = counts.iter().find(|&&n| n > u32::MAX as usize - 256) {
        return Err(Error::gpu(
            op,
            format!("{n} elements exceed the kernels' 32-bit indices"),
        ));
    }
    Ok(())
}

/// Invocations per row of the row kernels (softmax, layer norm) for rows of `n` values:
/// `n` rounded up to a power of two, at most 256; a workgroup of 256 handles
/// `256 / lanes` rows.
pub(crate) fn row_lanes(n: usize) -> usize {
    n.next_power_of_two().min(256)
}

/// The workgroup grid of the row kernels for `rows` rows of `n` values.
pub(crate) fn row_grid(rows: usize, n: usize) -> [u32; 3] {
    let groups = rows.div_ceil(256 / row_lanes(n));
    grid_1d(u32::try_from(groups).unwrap_or(u32::MAX))
}

/// Workgroups of 256 covering `len` elements, as a grid that respects the
/// per-dimension limit.
pub(crate) fn grid(len: usize) -> [u32; 3] {
    grid_1d(len.div_ceil(256) as u32)
}
