//! BatchNorm in eval mode and LayerNorm, forward and input backward
//! (`shaders/norm.wgsl`). Neither op's parameters are curvature parameters, so only
//! input gradients are computed.
//!
//! Backward passes take a stack of `V` backpropagated vectors at once: gradients are
//! `[V·B, ...]`, `V`-major, as everywhere in the crate.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder, grid_1d};

/// BatchNorm's eval-mode map `y = (x − running_mean)/√(running_var + eps)·weight + bias`
/// folded into one per-channel `y = x·scale + shift`: `scale = weight/√(running_var +
/// eps)`, `shift = bias − running_mean·scale`, computed in f64 and rounded once to f32.
/// Without affine weights (`affine = false`) `weight` is 1 and `bias` 0. Every slice is
/// `[C]`; returns `(scale, shift)`.
pub fn fold_batch_norm(
    running_mean: &[f32],
    running_var: &[f32],
    affine: Option<(&[f32], &[f32])>,
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let op = "batch_norm fold";
    let c = running_mean.len();
    let mut lengths = vec![("running_var", running_var.len())];
    if let Some((w, b)) = affine {
        lengths.extend([("weight", w.len()), ("bias", b.len())]);
    }
    if let Some((name, len)) = lengths.iter().find(|(_, len)| *len != c) {
        return Err(Error::gpu(
            op,
            format!("{name} has {len} elements, running_mean {c}"),
        ));
    }
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    for ch in 0..c {
        let denominator = f64::from(running_var[ch]) + eps;
        if !(denominator > 0.0 && denominator.is_finite()) {
            return Err(Error::gpu(
                op,
                format!(
                    "channel {ch}: running_var + eps = {denominator} must be positive and finite"
                ),
            ));
        }
        let (w, b) = affine.map_or((1.0, 0.0), |(w, b)| (f64::from(w[ch]), f64::from(b[ch])));
        let s = w / denominator.sqrt();
        scale.push(s as f32);
        shift.push((b - f64::from(running_mean[ch]) * s) as f32);
    }
    Ok((scale, shift))
}

/// The channel count of `t` (`[N, C, ...]`) must be `channels`; returns the elements per
/// channel and example (`H·W`, or 1 for `[N, C]`).
fn channel_layout(op: &str, name: &str, t: &GpuTensor, channels: usize) -> Result<usize> {
    let shape = t.shape();
    if shape.len() < 2 || shape[1] != channels {
        return Err(Error::gpu(
            op,
            format!("{name} must be [N, {channels}, ...], found shape {shape:?}"),
        ));
    }
    Ok(shape[2..].iter().product())
}

fn affine_words(op: &str, t: &GpuTensor, channels: usize, spatial: usize) -> Result<Vec<u32>> {
    expect_u32(op, &[t.len()])?;
    Ok(vec![t.len() as u32, channels as u32, spatial.max(1) as u32])
}

/// Records BatchNorm in eval mode, `y = x·scale[c] + shift[c]`: `x [N, C, H, W]` (or
/// `[N, C]`), `scale` and `shift` `[C]` from [`fold_batch_norm`], `y` shaped like `x`.
pub fn batch_norm_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    scale: &GpuTensor,
    shift: &GpuTensor,
    y: &GpuTensor,
) -> Result<()> {
    let op = "batch_norm forward";
    let c = scale.len();
    expect_len(op, "shift", shift, c)?;
    let spatial = channel_layout(op, "x", x, c)?;
    expect_len(op, "y", y, x.len())?;
    let words = affine_words(op, x, c, spatial)?;
    rec.dispatch(
        &Kernel::new(&super::NORM, "channel_affine_forward"),
        &[x, scale, shift],
        &[y],
        &words,
        grid(x.len()),
    )
}

/// Records BatchNorm's eval-mode input gradient `grad_in = grad_out·scale[c]`:
/// `grad_out [V·B, C, H, W]` (or `[V·B, C]`), `scale [C]`, `grad_in` shaped like
/// `grad_out` (overwritten).
pub fn batch_norm_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    scale: &GpuTensor,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "batch_norm backward";
    let c = scale.len();
    let spatial = channel_layout(op, "grad_out", grad_out, c)?;
    expect_len(op, "grad_in", grad_in, grad_out.len())?;
    let words = affine_words(op, grad_out, c, spatial)?;
    rec.dispatch(
        &Kernel::new(&super::NORM, "channel_affine_backward"),
        &[grad_out, scale],
        &[grad_in],
        &words,
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

fn row_words(op: &str, rows: usize, x_rows: usize, d: usize, eps: f32) -> Result<Vec<u32>> {
    expect_u32(op, &[rows * d])?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::gpu(
            op,
            format!("eps must be finite and ≥ 0, got {eps}"),
        ));
    }
    Ok(vec![rows as u32, x_rows as u32, d as u32, eps.to_bits()])
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
    let words = row_words(op, rows, rows, d, eps)?;
    let workgroups = grid_1d(u32::try_from(rows).unwrap_or(u32::MAX));
    match affine {
        Some((weight, bias)) => {
            expect_len(op, "weight", weight, d)?;
            expect_len(op, "bias", bias, d)?;
            rec.dispatch(
                &Kernel::new(&super::NORM, "layer_norm_forward"),
                &[x, weight, bias],
                &[y],
                &words,
                workgroups,
            )
        }
        None => rec.dispatch(
            &Kernel::new(&super::NORM, "layer_norm_forward_plain"),
            &[x],
            &[y],
            &words,
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
    let words = row_words(op, rows, x_rows, d, eps)?;
    let workgroups = grid_1d(u32::try_from(rows).unwrap_or(u32::MAX));
    match weight {
        Some(weight) => {
            expect_len(op, "weight", weight, d)?;
            rec.dispatch(
                &Kernel::new(&super::NORM, "layer_norm_backward"),
                &[x, weight, grad_out],
                &[grad_in],
                &words,
                workgroups,
            )
        }
        None => rec.dispatch(
            &Kernel::new(&super::NORM, "layer_norm_backward_plain"),
            &[x, grad_out],
            &[grad_in],
            &words,
            workgroups,
        ),
    }
}
