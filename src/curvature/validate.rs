//! Checks of curvature tensors on the GPU: the eigenbases of a state read from a file
//! (`apply`, `--init-state`) and the Kronecker factors a fit accumulated.
//!
//! **Eigenvectors.** A state file's `Q` must be orthonormal. Rather than forming
//! `QᵀQ` (an `n³` product), [`check_eigenvectors`] multiplies [`PROBES`] fixed
//! pseudo-random columns `X` (`[n, 8]`, entries in `[-1, 1)`) by `Qᵀ` and then by `Q`
//! with two GEMMs on the GPU and requires
//! `‖Q Qᵀ X − X‖_F ≤ ORTHONORMALITY_TOLERANCE · ‖X‖_F`, which holds for square `Q`
//! exactly when `Q Qᵀ = I` (up to the tolerance, with probability one over `X`). The
//! tolerance, 1e-3, is 25× the orthogonality error `‖VᵀV − I‖_F = 3.9e-5` of our own
//! Jacobi at n = 2048 (README), while an eigenvector that is zero, scaled or a copy of
//! another is off by O(1/√n) at least (1e-2 at n = 10⁴, our largest factor).
//!
//! **Factors.** [`check_factors_finite`] forms the row sums `A·1` of every factor by a
//! GEMM and reads back `n` values per factor: a NaN or ±Inf anywhere in a row makes its
//! sum non-finite. It runs between the accumulation and the eigendecomposition, so an
//! overflow is reported with the layer and what overflowed (the inputs for `A`, the
//! backpropagated gradients for `G`) instead of as a failed eigendecomposition.

use crate::curvature::options::FisherType;
use crate::curvature::state::CurvatureState;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::ops::gemm::{Gemm, gemm};

/// Number of random columns multiplied by `Q Qᵀ`.
pub const PROBES: usize = 8;
/// Largest accepted `‖Q Qᵀ X − X‖_F / ‖X‖_F`.
pub const ORTHONORMALITY_TOLERANCE: f64 = 1e-3;

/// The fixed probe columns `[n, PROBES]`, row-major, entries in `[-1, 1)`.
fn probes(n: usize) -> Vec<f32> {
    (0..n * PROBES)
        .map(|i| {
            // SplitMix64 of the index.
            let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `‖Q Qᵀ X − X‖_F / ‖X‖_F` for the row-major `[n, n]` matrix `q`, on the GPU.
pub fn orthonormality_residual(ctx: &GpuContext, q: &[f32], n: usize) -> Result<f64> {
    let x_host = probes(n);
    let q = ctx.upload(q, &[n, n])?;
    let x = ctx.upload(&x_host, &[n, PROBES])?;
    let y = ctx.zeros(&[n, PROBES])?;
    let z = ctx.zeros(&[n, PROBES])?;
    let mut rec = ctx.recorder();
    gemm(&mut rec, &Gemm::new(n, PROBES, n, true, false), &q, &x, &y)?;
    gemm(&mut rec, &Gemm::new(n, PROBES, n, false, false), &q, &y, &z)?;
    rec.submit()?;
    let z = ctx.read(&z)?;
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&zi, &xi) in z.iter().zip(&x_host) {
        diff += (f64::from(zi) - f64::from(xi)).powi(2);
        norm += f64::from(xi).powi(2);
    }
    Ok((diff / norm.max(f64::MIN_POSITIVE)).sqrt())
}

/// Checks that every eigenvector matrix of `state` is orthonormal (see the module
/// doc); errors name `origin` and the tensor.
pub fn check_eigenvectors(ctx: &GpuContext, state: &CurvatureState, origin: &str) -> Result<()> {
    let forward_only = state.meta.options.fisher == FisherType::ForwardOnly;
    for (layer, factors) in state.layout.layers.iter().zip(&state.layers) {
        let mut matrices = Vec::new();
        if let Some(a) = &factors.input {
            matrices.push(("input_eigenvectors", a));
        }
        if !forward_only {
            matrices.push(("gradient_eigenvectors", &factors.gradient));
        }
        for (suffix, e) in matrices {
            let residual = orthonormality_residual(ctx, &e.vectors, e.dim())?;
            if residual > ORTHONORMALITY_TOLERANCE || residual.is_nan() {
                return Err(Error::input(
                    origin,
                    format!(
                        "\"{}.{suffix}\": the eigenvectors are not orthonormal: \
                         ‖Q Qᵀ X − X‖_F / ‖X‖_F = {residual:.3e} for {PROBES} random columns X, \
                         more than the tolerance {ORTHONORMALITY_TOLERANCE:e}",
                        layer.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that the accumulated Kronecker factors of every curvature layer — (name,
/// `A` if any, `G` if any), each `[n, n]` — are finite; the error names the layer and
/// whether its inputs or its output gradients were too large. One submission, one
/// readback of `n` values per factor.
pub fn check_factors_finite<'a>(
    ctx: &GpuContext,
    layers: impl IntoIterator<Item = (&'a str, Option<&'a GpuTensor>, Option<&'a GpuTensor>)>,
) -> Result<()> {
    let mut factors = Vec::new();
    for (name, input, gradient) in layers {
        factors.extend(input.map(|a| (name, true, a)));
        factors.extend(gradient.map(|g| (name, false, g)));
    }
    let Some(largest) = factors.iter().map(|(_, _, f)| f.shape()[0]).max() else {
        return Ok(());
    };
    let ones = ctx.upload(&vec![1.0; largest], &[largest, 1])?;
    let sums = factors
        .iter()
        .map(|(_, _, f)| ctx.zeros(&[f.shape()[0], 1]))
        .collect::<Result<Vec<_>>>()?;
    let mut rec = ctx.recorder();
    for ((_, _, factor), sum) in factors.iter().zip(&sums) {
        let n = factor.shape()[0];
        gemm(
            &mut rec,
            &Gemm::new(n, 1, n, false, false),
            factor,
            &ones,
            sum,
        )?;
    }
    rec.submit()?;
    for ((name, is_input, _), sum) in factors.iter().zip(&sums) {
        let row_sums = ctx.read(sum)?;
        let Some(row) = row_sums.iter().position(|v| !v.is_finite()) else {
            continue;
        };
        let (factor, culprit) = if *is_input {
            (
                "input covariance A",
                "its inputs (the data, or the activations feeding it) are too large",
            )
        } else {
            (
                "gradient covariance G",
                "its backpropagated output gradients are too large (large weights, \
                 activations or targets)",
            )
        };
        return Err(Error::model(
            name,
            format!(
                "the {factor} is not finite after accumulating the data (row {row} sums to \
                 {}): {culprit} for f32, whose products overflow above about 1.8e19; \
                 rescale the data or the weights",
                row_sums[row]
            ),
        ));
    }
    Ok(())
}
