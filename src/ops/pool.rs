//! max_pool2d and avg_pool2d forward and backward (`shaders/pool.wgsl`) on NCHW
//! tensors, `ceil_mode = false`. Sizes come from a [`Pool2dGeometry`]: input
//! `[B, C, H, W]`, output `[B, C, OH, OW]`.

use super::check::{expect_len, expect_u32, grid};
use crate::error::Result;
use crate::geometry::Pool2dGeometry;
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Every entry point of `shaders/pool.wgsl`: `planes = B·C` planes `h × w` pooled
    /// to `oh × ow` by `kh × kw` windows with stride `sh, sw` and padding `ph, pw`.
    pub struct PoolParams {
        planes: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        kh: u32,
        kw: u32,
        sh: u32,
        sw: u32,
        ph: u32,
        pw: u32,
    }
}

/// The kernels' parameters, after checking the geometry fits 32-bit indices.
fn params(op: &str, geo: &Pool2dGeometry) -> Result<PoolParams> {
    let [oh, ow] = geo.out_size();
    expect_u32(op, &[geo.input_len(), geo.output_len()])?;
    let u = |v: usize| v as u32;
    Ok(PoolParams {
        planes: u(geo.batch * geo.channels),
        h: u(geo.in_size[0]),
        w: u(geo.in_size[1]),
        oh: u(oh),
        ow: u(ow),
        kh: u(geo.kernel_size[0]),
        kw: u(geo.kernel_size[1]),
        sh: u(geo.stride[0]),
        sw: u(geo.stride[1]),
        ph: u(geo.padding[0]),
        pw: u(geo.padding[1]),
    })
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
    let params = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "max_pool_forward"),
        &[x],
        &[y, argmax],
        &params,
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
    let params = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "max_pool_backward"),
        &[grad_out, argmax],
        &[grad_in],
        &params,
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
    let params = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "avg_pool_forward"),
        &[x],
        &[y],
        &params,
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
    let params = params(op, geo)?;
    rec.dispatch(
        &Kernel::new(&super::POOL, "avg_pool_backward"),
        &[grad_out],
        &[grad_in],
        &params,
        grid(geo.input_len()),
    )
}
