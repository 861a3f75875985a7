//! Linear layers as GEMMs (`shaders/gemm.wgsl`) plus the bias kernels of
//! `shaders/conv.wgsl` (a linear layer is a conv with one position per example).
//!
//! Shapes (PyTorch's): input `x [B, in]`, weight `W [out, in]`, bias `[out]`, output
//! `y [B, out]`, all row-major f32: `y = x·Wᵀ + b`, `dx = dY·W`, `dW = dYᵀ·x`,
//! `db = Σ_b dY[b]`.

use super::check::expect_len;
use super::conv::{WeightedBackward, add_bias, bias_grad};
use super::gemm::{Gemm, gemm};
use crate::error::Result;
use crate::geometry::LinearGeometry;
use crate::gpu::{GpuTensor, Recorder};

/// Records `y = x·Wᵀ (+ bias)`: `x [B, in]`, `weight [out, in]`, `bias [out]`,
/// `y [B, out]` (overwritten).
pub fn linear_forward(
    rec: &mut Recorder,
    geo: &LinearGeometry,
    x: &GpuTensor,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
) -> Result<()> {
    let op = "linear forward";
    let LinearGeometry {
        batch,
        in_features,
        out_features,
    } = *geo;
    expect_len(op, "x", x, batch * in_features)?;
    expect_len(op, "weight", weight, out_features * in_features)?;
    expect_len(op, "y", y, batch * out_features)?;
    gemm(
        rec,
        &Gemm::new(batch, out_features, in_features, false, true),
        x,
        weight,
        y,
    )?;
    if let Some(b) = bias {
        add_bias(rec, out_features, 1, b, y)?;
    }
    Ok(())
}

/// Records the linear backward pass: the gradients `args` asks for.
pub fn linear_backward(
    rec: &mut Recorder,
    geo: &LinearGeometry,
    args: &WeightedBackward,
) -> Result<()> {
    let op = "linear backward";
    let LinearGeometry {
        batch,
        in_features,
        out_features,
    } = *geo;
    expect_len(op, "grad_out", args.grad_out, batch * out_features)?;
    if let Some(grad_in) = args.grad_in {
        let weight = args.weight_for_grad_in(op)?;
        expect_len(op, "weight", weight, out_features * in_features)?;
        expect_len(op, "grad_in", grad_in, batch * in_features)?;
        let g = Gemm::new(batch, in_features, out_features, false, false);
        gemm(rec, &g, args.grad_out, weight, grad_in)?;
    }
    if let Some(dw) = args.grad_weight {
        let x = args.x_for_grad_weight(op)?;
        expect_len(op, "x", x, batch * in_features)?;
        expect_len(op, "grad_weight", dw, out_features * in_features)?;
        let beta = if args.accumulate { 1.0 } else { 0.0 };
        let g = Gemm::new(out_features, in_features, batch, true, false).scaled(1.0, beta);
        gemm(rec, &g, args.grad_out, x, dw)?;
    }
    if let Some(db) = args.grad_bias {
        bias_grad(rec, out_features, 1, args.grad_out, db, args.accumulate)?;
    }
    Ok(())
}
