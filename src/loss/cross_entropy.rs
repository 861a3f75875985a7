//! Cross-entropy of logits and a class index, `ℓ(f, y) = logsumexp(f) − f_y`
//! (PyTorch's `CrossEntropyLoss`, `C' = 1`): gradient `p − e_y` with `p = softmax(f)`,
//! Hessian square root `S[:, c] = √p_c (e_c − p)`, MC labels categorical of `p`
//! (`shaders/loss_cross_entropy.wgsl`).

use super::{Loss, SampledTarget, Target, softmax};
use crate::curvature::{FisherType, LossKind, Reduction};
use crate::ops::loss::LossKernel;
use crate::rng::Philox;

/// The cross-entropy.
pub struct CrossEntropy;

impl Loss for CrossEntropy {
    fn kind(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn class_targets(&self) -> bool {
        true
    }

    fn mean_normaliser(&self, _: usize) -> f64 {
        1.0
    }

    fn value(&self, f: &[f64], y: Target) -> f64 {
        let max = f.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + f.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        lse - f[y.class()]
    }

    fn push_gradient(&self, f: &[f64], y: Target, s: f64, out: &mut Vec<f64>) {
        let y = y.class();
        let p = softmax(f);
        out.extend(
            p.iter()
                .enumerate()
                .map(|(c, &pc)| (pc - f64::from(u8::from(c == y))) * s),
        );
    }

    fn hessian_sqrt_column(&self, f: &[f64], c: usize, sigma_b: f64, _: f64, column: &mut [f64]) {
        let p = softmax(f);
        let sp = p[c].sqrt();
        for (i, v) in column.iter_mut().enumerate() {
            let e = f64::from(u8::from(i == c));
            *v = sigma_b * sp * (e - p[i]);
        }
    }

    fn sample(&self, f: &[f64], rng: &Philox, n: u32, m: u32) -> SampledTarget {
        SampledTarget::Class(rng.categorical(n, m, &softmax(f)))
    }

    fn gradient_scale(&self, reduction: Reduction, batch: usize, _: usize) -> f64 {
        match reduction {
            Reduction::Sum => 1.0,
            Reduction::Mean => 1.0 / batch as f64,
        }
    }

    fn kernel_scale(&self, _: FisherType, reduction: Reduction, batch: usize, _: usize) -> f64 {
        if reduction == Reduction::Mean {
            1.0 / batch as f64
        } else {
            1.0
        }
    }

    fn kernel(&self) -> LossKernel {
        LossKernel::CrossEntropy
    }
}
