//! Mean squared error `ℓ(f, y) = Σ_i (f_i − y_i)²` (PyTorch's `MSELoss`, `C' = C` for
//! the mean): gradient `2(f − y)`, Hessian `2I`, MC targets `f + √0.5·ε`
//! (`shaders/loss_mse.wgsl`).

use super::{Loss, SampledTarget, Target, dense_kernel_scale};
use crate::curvature::{FisherType, LossKind, Reduction};
use crate::ops::loss::LossKernel;
use crate::rng::Philox;

/// The mean squared error.
pub struct Mse;

impl Loss for Mse {
    fn kind(&self) -> LossKind {
        LossKind::Mse
    }

    fn class_targets(&self) -> bool {
        false
    }

    fn mean_normaliser(&self, outputs: usize) -> f64 {
        outputs as f64
    }

    fn value(&self, f: &[f64], y: Target) -> f64 {
        f.iter().zip(y.values()).map(|(a, b)| (a - b).powi(2)).sum()
    }

    fn push_gradient(&self, f: &[f64], y: Target, s: f64, out: &mut Vec<f64>) {
        out.extend(f.iter().zip(y.values()).map(|(&x, &t)| 2.0 * (x - t) * s));
    }

    fn hessian_sqrt_column(&self, _: &[f64], c: usize, sigma_b: f64, c_c: f64, column: &mut [f64]) {
        column[c] = sigma_b * (2.0 * c_c).sqrt();
    }

    fn sample(&self, f: &[f64], rng: &Philox, n: u32, m: u32) -> SampledTarget {
        SampledTarget::Values(
            f.iter()
                .enumerate()
                .map(|(c, &x)| x + 0.5f64.sqrt() * rng.gaussian(n, m, c as u32))
                .collect(),
        )
    }

    fn kernel_scale(
        &self,
        fisher: FisherType,
        reduction: Reduction,
        batch: usize,
        outputs: usize,
    ) -> f64 {
        dense_kernel_scale(self, fisher, reduction, batch, outputs, 2.0)
    }

    fn kernel(&self) -> LossKernel {
        LossKernel::Mse
    }
}
