//! max_pool2d and avg_pool2d forward and backward (`shaders/pool.wgsl`) on NCHW
//! tensors, `ceil_mode = false`. Sizes come from a [`Pool2dGeometry`]: input
//! `[B, C, H, W]`, output `[B, C, OH, OW]`.

use super::check::{expect_len, expect_u32, grid};
use crate::error::Result;
use crate::geometry::Pool2dGeometry;
use crate::gpu::{GpuTensor, Kernel, Recorder};

/// The kernels' parameter words, after checking the geometry fits 32-bit indices.
fn params(op: &str, geo: &Pool2dGeometry) -> Result<Vec<u32>> {
    let [oh, ow] = geo.out_size();
    expect_u32(op, &[geo.input_len(), geo.output_len()])?;
    Ok([
        geo.batch * geo.channels,
        geo.in_size[0],
        geo.in_size[1],
        oh,
        ow,
        geo.kernel_size[0],
        geo.kernel_size[1],
        geo.stride[0],
        geo.stride[1],
        geo.padding[0],
        geo.padding[1],
    ]
    .map(|v| v as u32)
    .to_vec())
}

/// Records max pooling: `x [B, C, H, W]` → `y [B, C, OH, OW]` and `argmax` (u32,
/// `[B, C, OH, OW]`, the in-plane index `h·W + w` of each window's first maximum in
/// row-major order). Padding counts as −∞; NaN is not propagated.
pub fn max_pool2d_forward(
    rec: &mut Recorder,
    geo: &Pool2dGeometry,
    x: &GpuTensor,
    y: &GpuTensor,
    argmax: &GpuTensor,
) -> Result<()> {
    let op = "max_pool2d forward";
    expect_len(op, "x", x, geo.input_len())?;
    expect_len(op, "y", y, geo.output_len())?;
    expect_len(op, "argmax", argmax, geo.output_len())?;
    let words = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "max_pool_forward"),
        &[x],
        &[y, argmax],
        &words,
        grid(geo.output_len()),
    )
}

/// Records the max-pooling input gradient: each input element receives the sum of
/// `grad_out [B, C, OH, OW]` over the outputs whose `argmax` it is →
/// `grad_in [B, C, H, W]` (overwritten).
pub fn max_pool2d_backward(
    rec: &mut Recorder,
    geo: &Pool2dGeometry,
    grad_out: &GpuTensor,
    argmax: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "max_pool2d backward";
    expect_len(op, "grad_out", grad_out, geo.output_len())?;
    expect_len(op, "argmax", argmax, geo.output_len())?;
    expect_len(op, "grad_in", grad_in, geo.input_len())?;
    let words = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "max_pool_backward"),
        &[grad_out, argmax],
        &[grad_in],
        &words,
        grid(geo.input_len()),
    )
}

/// Records average pooling with zero padding counted in the divisor
/// (`count_include_pad = true`, divisor `KH·KW`): `x [B, C, H, W]` → `y [B, C, OH, OW]`.
pub fn avg_pool2d_forward(
    rec: &mut Recorder,
    geo: &Pool2dGeometry,
    x: &GpuTensor,
    y: &GpuTensor,
) -> Result<()> {
    let op = "avg_pool2d forward";
    expect_len(op, "x", x, geo.input_len())?;
    expect_len(op, "y", y, geo.output_len())?;
    let words = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "avg_pool_forward"),
        &[x],
        &[y],
        &words,
        grid(geo.output_len()),
    )
}

/// Records the average-pooling input gradient: `grad_out [B, C, OH, OW]` →
/// `grad_in [B, C, H, W]` (overwritten), each element summing `grad/(KH·KW)` over the
/// windows that hold it.
pub fn avg_pool2d_backward(
    rec: &mut Recorder,
    geo: &Pool2dGeometry,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "avg_pool2d backward";
    expect_len(op, "grad_out", grad_out, geo.output_len())?;
    expect_len(op, "grad_in", grad_in, geo.input_len())?;
    let words = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "avg_pool_backward"),
        &[grad_out],
        &[grad_in],
        &words,
        grid(geo.input_len()),
    )
}
