//! Binary cross-entropy with logits, `ℓ(f, y) = Σ_i max(f_i, 0) − f_i y_i +
//! log(1 + e^{−|f_i|})` (PyTorch's `BCEWithLogitsLoss`, `C' = C` for the mean):
//! gradient `σ(f) − y`, Hessian square root `diag(√(σ(f)(1 − σ(f))))`, MC targets
//! Bernoulli of `σ(f)` (`shaders/loss_bce.wgsl`). Type-2 needs binary targets, as in
//! curvlinops 3.0.1.

use super::{Loss, SampledTarget, Target, dense_kernel_scale, sigmoid};
use crate::curvature::{FisherType, LossKind, Reduction};
use crate::error::{Error, Result};
use crate::ops::loss::LossKernel;
use crate::rng::Philox;

/// Binary cross-entropy with logits.
pub struct Bce;

impl Loss for Bce {
    fn kind(&self) -> LossKind {
        LossKind::BceWithLogits
    }

    fn class_targets(&self) -> bool {
        false
    }

    fn mean_normaliser(&self, outputs: usize) -> f64 {
        outputs as f64
    }

    fn check_values(&self, fisher: FisherType, y: &[f64]) -> Result<()> {
        if fisher == FisherType::Type2
            && let Some(i) = y.iter().position(|&v| v != 0.0 && v != 1.0)
        {
            return Err(Error::Options(format!(
                "bce_with_logits with fisher type 'type-2' needs binary targets (0 or 1); \
                 target {i} is {}",
                y[i]
            )));
        }
        Ok(())
    }

    fn value(&self, f: &[f64], y: Target) -> f64 {
        f.iter()
            .zip(y.values())
            .map(|(&x, &t)| x.max(0.0) - x * t + (-x.abs()).exp().ln_1p())
            .sum()
    }

    fn push_gradient(&self, f: &[f64], y: Target, s: f64, out: &mut Vec<f64>) {
        out.extend(
            f.iter()
                .zip(y.values())
                .map(|(&x, &t)| (sigmoid(x) - t) * s),
        );
    }

    fn hessian_sqrt_column(&self, f: &[f64], c: usize, sigma_b: f64, c_c: f64, column: &mut [f64]) {
        let p = sigmoid(f[c]);
        column[c] = sigma_b * (c_c * p * (1.0 - p)).sqrt();
    }

    fn sample(&self, f: &[f64], rng: &Philox, n: u32, m: u32) -> SampledTarget {
        SampledTarget::Values(
            f.iter()
                .enumerate()
                .map(|(c, &x)| rng.bernoulli(n, m, c as u32, sigmoid(x)))
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
        dense_kernel_scale(self, fisher, reduction, batch, outputs, 1.0)
    }

    fn kernel(&self) -> LossKernel {
        LossKernel::Bce
    }
}
