//! BatchNorm in eval mode and LayerNorm, forward and input backward
//! (`shaders/norm.wgsl`). Neither op's parameters are curvature parameters, so only
//! input gradients are computed.
//!
//! Backward passes take a stack of `V` backpropagated vectors at once: gradients are
//! `[V·B, ...]`, `V`-major, as everywhere in the crate.

use super::check::{expect_len, expect_u32, grid, row_grid, row_lanes};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// The BatchNorm entry points: `len` elements of `[N, channels, spatial]`.
    pub struct ChannelParams {
        len: u32,
        channels: u32,
        spatial: u32,
        eps: f32,
    }
}

kernel_params! {
    /// The LayerNorm entry points: `rows` rows of `d` elements written, read against
    /// `x_rows` rows of the saved input (`rows = V·x_rows` in backward).
    pub struct RowParams {
        rows: u32,
        x_rows: u32,
        d: u32,
        eps: f32,
        /// Invocations per row: a power of two, at most 256.
        lanes: u32,
    }
}

/// BatchNorm's eval-mode parameters and buffers on the GPU, each `[C]`.
pub struct BatchNormParams<'a> {
    pub running_mean: &'a GpuTensor,
    pub running_var: &'a GpuTensor,
    /// `(weight, bias)`, or `None` without affine parameters (`affine = false`).
    pub affine: Option<(&'a GpuTensor, &'a GpuTensor)>,
    pub eps: f32,
}

impl BatchNormParams<'_> {
    /// Checks every tensor has `C = running_mean.len()` elements and `t` (`[N, C,
    /// ...]`) has `C` channels; returns the kernels' parameters (`spatial`: the elements
    /// per channel and example, `H·W`, or 1 for `[N, C]`).
    fn kernel_params(&self, op: &str, name: &str, t: &GpuTensor) -> Result<ChannelParams> {
        let c = self.running_mean.len();
        expect_len(op, "running_var", self.running_var, c)?;
        if let Some((w, b)) = self.affine {
            expect_len(op, "weight", w, c)?;
            expect_len(op, "bias", b, c)?;
        }
        let shape = t.shape();
        if shape.len() < 2 || shape[1] != c || c == 0 {
            return Err(Error::gpu(
                op,
                format!("{name} must be [N, {c}, ...], found shape {shape:?}"),
            ));
        }
        expect_u32(op, &[t.len()])?;
        check_eps(op, self.eps)?;
        let spatial: usize = shape[2..].iter().product();
        Ok(ChannelParams {
            len: t.len() as u32,
            channels: c as u32,
            spatial: spatial.max(1) as u32,
            eps: self.eps,
        })
    }
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::gpu(
            op,
            format!("eps must be finite and ≥ 0, got {eps}"),
        ));
    }
    Ok(())
}

/// Records BatchNorm in eval mode, `y = (x − running_mean)/√(running_var + eps)·weight
/// + bias` per channel: `x [N, C, H, W]` (or `[N, C]`), `y` shaped like `x`.
pub fn batch_norm_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    params: &BatchNormParams,
    y: &GpuTensor,
) -> Result<()> {
    let op = "batch_norm forward";
    let kernel_params = params.kernel_params(op, "x", x)?;
    expect_len(op, "y", y, x.len())?;
    let (mean, var) = (params.running_mean, params.running_var);
    // Without affine parameters `mean` stands in for them; the kernel never reads it.
    let ((w, b), affine) = match params.affine {
        Some(wb) => (wb, 1.0),
        None => ((mean, mean), 0.0),
    };
    rec.dispatch(
        &Kernel::new(&super::NORM, "batch_norm_forward").with("AFFINE", affine),
        &[x, mean, var, w, b],
        &[y],
        &kernel_params,
        grid(x.len()),
    )
}

/// Records BatchNorm's eval-mode input gradient `grad_in = grad_out·weight/√(running_var
/// + eps)` per channel: `grad_out [V·B, C, H, W]` (or `[V·B, C]`), `grad_in` shaped
/// like `grad_out` (overwritten).
pub fn batch_norm_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    params: &BatchNormParams,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "batch_norm backward";
    let kernel_params = params.kernel_params(op, "grad_out", grad_out)?;
    expect_len(op, "grad_in", grad_in, grad_out.len())?;
    let var = params.running_var;
    // Without affine parameters `var` stands in for the weight; the kernel never reads it.
    let (w, affine) = match params.affine {
        Some((w, _)) => (w, 1.0),
        None => (var, 0.0),
    };
    rec.dispatch(
        &Kernel::new(&super::NORM, "batch_norm_backward").with("AFFINE", affine),
        &[grad_out, w, var],
        &[grad_in],
        &kernel_params,
        grid(grad_out.len()),
    )
}

/// The normalised size `D` (the last dimension of `x`) and the row count of `x`.
fn rows(op: &str, x: &GpuTensor) -> Result<(usize, usize)> {
    let d = x.shape().last().copied().unwrap_or(0);
    if d == 0 {
        return Err(Error::gpu(
            op,
            format!(
                "x must have a non-empty last dimension, found shape {:?}",
                x.shape()
            ),
        ));
    }
    Ok((x.len() / d, d))
}

fn row_params(op: &str, rows: usize, x_rows: usize, d: usize, eps: f32) -> Result<RowParams> {
    expect_u32(op, &[rows * d])?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::gpu(
            op,
            format!("eps must be finite and ≥ 0, got {eps}"),
        ));
    }
    Ok(RowParams {
        rows: rows as u32,
        x_rows: x_rows as u32,
        d: d as u32,
        eps,
        lanes: row_lanes(d) as u32,
    })
}

/// Records LayerNorm over the last dimension `D` of `x [..., D]`:
/// `y = (x − mean)/√(var + eps)·weight + bias` with each row's mean and biased variance;
/// `affine` is `(weight, bias)`, each `[D]`, or `None` (`elementwise_affine = false`).
/// `y` is shaped like `x`.
pub fn layer_norm_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    affine: Option<(&GpuTensor, &GpuTensor)>,
    eps: f32,
    y: &GpuTensor,
) -> Result<()> {
    let op = "layer_norm forward";
    let (rows, d) = rows(op, x)?;
    expect_len(op, "y", y, x.len())?;
    let kernel_params = row_params(op, rows, rows, d, eps)?;
    let workgroups = row_grid(rows, d);
    match affine {
        Some((weight, bias)) => {
            expect_len(op, "weight", weight, d)?;
            expect_len(op, "bias", bias, d)?;
            rec.dispatch(
                &Kernel::new(&super::NORM, "layer_norm_forward"),
                &[x, weight, bias],
                &[y],
                &kernel_params,
                workgroups,
            )
        }
        None => rec.dispatch(
            &Kernel::new(&super::NORM, "layer_norm_forward_plain"),
            &[x],
            &[y],
            &kernel_params,
            workgroups,
        ),
    }
}

/// Records LayerNorm's input gradient for a stack of `V` backpropagated vectors: `x
/// [..., D]` is the saved forward input (`R` rows), `grad_out [V·R·D]` (`V`-major, any
/// shape ending in `D`), `weight [D]` or `None`, `grad_in` shaped like `grad_out`
/// (overwritten). Row statistics are recomputed from `x`; with `g = grad_out·weight`
/// and `x̂` the normalised input, `grad_in = (g − mean(g) − x̂·mean(g·x̂))/√(var + eps)`.
pub fn layer_norm_backward(
    rec: &mut Recorder,
    x: &GpuTensor,
    weight: Option<&GpuTensor>,
    eps: f32,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "layer_norm backward";
    let (x_rows, d) = rows(op, x)?;
    if !grad_out.len().is_multiple_of(x.len()) || grad_out.shape().last() != Some(&d) {
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
    let rows = grad_out.len() / d;
    let kernel_params = row_params(op, rows, x_rows, d, eps)?;
    let workgroups = row_grid(rows, d);
    // Without affine parameters `x` stands in for the weight, which the kernel never reads.
    let (weight, affine) = match weight {
        Some(weight) => {
            expect_len(op, "weight", weight, d)?;
            (weight, 1.0)
        }
        None => (x, 0.0),
    };
    rec.dispatch(
        &Kernel::new(&super::NORM, "layer_norm_backward").with("AFFINE", affine),
        &[x, weight, grad_out],
        &[grad_in],
        &kernel_params,
        workgroups,
    )
}
