//! The curvature-layer trait: what KFAC and EKFAC need of a layer they approximate
//! (SPEC §2–§3). Factors, correction and the parameter layout use only this trait; a
//! layer type that implements it (linear, conv2d) takes part in the curvature.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::layers::Pass;

/// A layer `y_s = W a_s (+ b)` applied at `S` weight-sharing positions per example.
/// Rows are the inputs `a_s` (`D` features) and the output gradients `g_s`
/// (`d_out` features) of one position.
pub trait CurvatureLayer {
    /// `d_out`: output features / channels.
    fn out_features(&self) -> usize;

    /// `D` of the weight: `in_features` or `(C_in/groups)·KH·KW` (no ones column).
    fn in_features(&self) -> usize;

    /// `S`, weight-sharing positions per example (1 without sharing).
    fn positions(&self) -> usize;

    /// Whether the layer has a bias.
    fn has_bias(&self) -> bool;

    /// The weight's PyTorch shape; its row-major flattening is `o·D + j` with `j` the
    /// expand-format input feature.
    fn weight_shape(&self) -> Vec<usize>;

    /// Expand-format inputs `[B·S, D]` from the layer input `[B, *in]`.
    fn expand_inputs(&self, pass: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor>;

    /// Reduce-format inputs, the mean over positions, `[B, D]`.
    fn reduce_inputs(&self, pass: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor>;

    /// `G`, channel groups of the weight: output feature `o` reads only the inputs of
    /// group `o / (d_out/G)` (1 except for grouped convolutions).
    fn groups(&self) -> usize {
        1
    }

    /// The inputs per group that the true gradient reads, `[G, B·S, D]`:
    /// `∇_W ℓ[o, :] = Σ_s g_{s,o} a^{(group of o)}_sᵀ`. For `G = 1` the expand-format
    /// inputs; for `G > 1` they differ from [`Self::expand_inputs`], which average the
    /// groups as curvlinops' factors do (SPEC §2.2).
    fn gradient_inputs(
        &self,
        pass: &mut Pass,
        input: &GpuTensor,
        batch: usize,
    ) -> Result<GpuTensor> {
        self.expand_inputs(pass, input, batch)
    }

    /// Output gradients as rows, `[V·B·S, d_out]`, from `[V·B, *out]`.
    fn expand_grads(&self, pass: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor>;

    /// Output gradients summed over positions, `[V·B, d_out]`.
    fn summed_grads(&self, pass: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor>;

    /// f64 expand-format inputs `[B·S, D]`.
    fn reference_expand_inputs(&self, input: &[f64], batch: usize) -> Vec<f64>;

    /// f64 output gradients as rows `[V·B·S, d_out]` from `[V·B, *out]`.
    fn reference_expand_grads(&self, grads: &[f64]) -> Vec<f64>;
}
