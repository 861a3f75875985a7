//! Nearest-neighbour upsampling by integer factors and adaptive average pooling,
//! forward and backward (`shaders/resample.wgsl`), on NCHW tensors whose shapes give
//! the sizes: input `[N, C, H, W]`, output `[N, C, OH, OW]`. Backward passes take
//! `N = V·B` (a stack of backpropagated vectors) like any batch.

use super::check::{expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Every entry point of `shaders/resample.wgsl`: `planes = N·C` planes, input
    /// `h × w`, output `oh × ow`.
    pub struct ResampleParams {
        planes: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
    }
}

/// `t`'s shape as `[N, C, H, W]`.
fn nchw(op: &str, name: &str, t: &GpuTensor) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape()).map_err(|_| {
        Error::gpu(
            op,
            format!("{name} must be [N, C, H, W], found {:?}", t.shape()),
        )
    })
}

/// Checks that `input` and `output` share `N` and `C` and have non-empty planes, and
/// that every index fits 32 bits; returns the kernels' parameters.
fn plane_params(
    op: &str,
    (input_name, input): (&str, &GpuTensor),
    (output_name, output): (&str, &GpuTensor),
) -> Result<ResampleParams> {
    let [n, c, h, w] = nchw(op, input_name, input)?;
    let [on, oc, oh, ow] = nchw(op, output_name, output)?;
    if (on, oc) != (n, c) || h * w == 0 || oh * ow == 0 {
        return Err(Error::gpu(
            op,
            format!(
                "{input_name} {:?} and {output_name} {:?} must share N and C and have \
                 non-empty planes",
                input.shape(),
                output.shape()
            ),
        ));
    }
    // The adaptive windows compute (o + 1)·H along each axis.
    expect_u32(op, &[input.len(), output.len(), (oh + 1) * h, (ow + 1) * w])?;
    let u = |v: usize| v as u32;
    Ok(ResampleParams {
        planes: u(n * c),
        h: u(h),
        w: u(w),
        oh: u(oh),
        ow: u(ow),
    })
}

/// Errors unless the output plane of `p` is its input plane scaled by `factor` (each
/// factor ≥ 1).
fn expect_scaled(op: &str, p: &ResampleParams, factor: [usize; 2]) -> Result<()> {
    let in_plane = [p.h as usize, p.w as usize];
    let out_plane = [p.oh as usize, p.ow as usize];
    let want = [in_plane[0] * factor[0], in_plane[1] * factor[1]];
    if factor.contains(&0) || out_plane != want {
        return Err(Error::gpu(
            op,
            format!(
                "a {in_plane:?} plane upsampled by {factor:?} is {want:?} (factors ≥ 1), \
                 found {out_plane:?}"
            ),
        ));
    }
    Ok(())
}

/// Records nearest upsampling by `factor = [SH, SW]`: `x [N, C, H, W]` →
/// `y [N, C, H·SH, W·SW]` with `y[.., oh, ow] = x[.., oh/SH, ow/SW]`.
pub fn upsample_nearest2d_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    factor: [usize; 2],
    y: &GpuTensor,
) -> Result<()> {
    let op = "upsample_nearest2d forward";
    let p = plane_params(op, ("x", x), ("y", y))?;
    expect_scaled(op, &p, factor)?;
    rec.dispatch(
        &Kernel::new(&super::RESAMPLE, "upsample_nearest_forward"),
        &[x],
        &[y],
        &p,
        grid(y.len()),
    )
}

/// Records the backward of nearest upsampling by `factor`: `grad_out [N, C, H·SH,
/// W·SW]` → `grad_in [N, C, H, W]` (overwritten), each element the sum of its
/// `SH×SW` block.
pub fn upsample_nearest2d_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    factor: [usize; 2],
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "upsample_nearest2d backward";
    let p = plane_params(op, ("grad_in", grad_in), ("grad_out", grad_out))?;
    expect_scaled(op, &p, factor)?;
    rec.dispatch(
        &Kernel::new(&super::RESAMPLE, "upsample_nearest_backward"),
        &[grad_out],
        &[grad_in],
        &p,
        grid(grad_in.len()),
    )
}

/// Records adaptive average pooling to `y`'s plane size: `x [N, C, H, W]` →
/// `y [N, C, OH, OW]`, output `(oh, ow)` averaging input rows `⌊oh·H/OH⌋ ..
/// ⌈(oh+1)·H/OH⌉` and the columns likewise (PyTorch's windows; any `OH, OW ≥ 1`,
/// larger than the input too).
pub fn adaptive_avg_pool2d_forward(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let p = plane_params("adaptive_avg_pool2d forward", ("x", x), ("y", y))?;
    rec.dispatch(
        &Kernel::new(&super::RESAMPLE, "adaptive_avg_pool_forward"),
        &[x],
        &[y],
        &p,
        grid(y.len()),
    )
}

/// Records the backward of adaptive average pooling: `grad_out [N, C, OH, OW]` →
/// `grad_in [N, C, H, W]` (overwritten), each element summing `grad/(window size)`
/// over the outputs whose window holds it.
pub fn adaptive_avg_pool2d_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let p = plane_params(
        "adaptive_avg_pool2d backward",
        ("grad_in", grad_in),
        ("grad_out", grad_out),
    )?;
    rec.dispatch(
        &Kernel::new(&super::RESAMPLE, "adaptive_avg_pool_backward"),
        &[grad_out],
        &[grad_in],
        &p,
        grid(grad_in.len()),
    )
}
