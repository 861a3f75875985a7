//! Losses behind one trait, [`Loss`], one file per loss ([`mse`], [`cross_entropy`],
//! [`bce`]) with its kernel `shaders/loss_<loss>.wgsl`: its value, gradient, the
//! square root of its Hessian and its MC sampling. This module composes them into the
//! backpropagated output-space vectors `V [nv, B, C]` of one batch (SPEC §3.2) with
//! their correction factor κ_b (§3.5), in f64 (the host reference) and on the GPU
//! ([`gpu`]).
//!
//! Outputs are 2-D `[B, C]` (one loss term per example, `R = 1`), so `M_b = B_b`.
//! With `σ_b = 1` (sum) or `1/B_b` (mean) and `c_C = 1` (sum, and always for CE) or
//! `1/C` (mean, MSE/BCE):
//! - type-2 (`nv = C`): `V[c, n, :] = σ_b·S_n[:, c]` with `S_n S_nᵀ = c_C·∇²ℓ_n`;
//!   MSE `S = √(2c_C)·I`, CE `S[:, c] = √p_c (e_c − p)`, BCE `S = diag(√(c_C p(1−p)))`.
//! - empirical (`nv = 1`): the gradient of `γ·L_torch` with `γ = √C` for MSE/BCE mean:
//!   MSE `2(f − y)σ'`, CE `(p − e_y)σ_b`, BCE `(σ(f) − y)σ'`, `σ' = 1` or `1/(B_b√C)`.
//! - MC (`nv = mc`): the empirical vector with labels drawn by [`crate::rng::Philox`] at
//!   global example index `batch_start + n`: MSE `ŷ = f + √0.5·ε`, CE categorical,
//!   BCE Bernoulli.
//! - κ_b = `1/mc` (sum) or `B_b²/(N·mc)` (mean).
//!
//! Adding a loss: a file here implementing [`Loss`], its kernel
//! `shaders/loss_<name>.wgsl` (one `LossKernel` line in [`crate::ops::loss`]), its name
//! in [`LossKind`] and [`of`].

pub mod bce;
pub mod cross_entropy;
pub mod gpu;
pub mod mse;

use crate::curvature::{FisherType, LossKind, Options, Reduction};
use crate::error::{Error, Result};
use crate::ops::loss::LossKernel;
use crate::rng::Philox;

/// The targets of one batch.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices `[B]` (cross-entropy).
    Classes(&'a [usize]),
    /// Row-major `[B, C]` values (MSE, BCE).
    Dense(&'a [f64]),
}

/// The target of one example.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Class(usize),
    Values(&'a [f64]),
}

impl<'a> Target<'a> {
    /// The values of a dense target (MSE, BCE); the loss's targets were checked dense.
    fn values(self) -> &'a [f64] {
        match self {
            Target::Values(y) => y,
            Target::Class(_) => unreachable!("a dense-target loss got a class index"),
        }
    }

    /// The class of a class target (cross-entropy); the targets were checked classes.
    fn class(self) -> usize {
        match self {
            Target::Class(c) => c,
            Target::Values(_) => unreachable!("a class-target loss got dense values"),
        }
    }
}

impl<'a> Targets<'a> {
    /// Example `n`'s target (`outputs` values per example for dense targets).
    pub fn row(&self, n: usize, outputs: usize) -> Target<'a> {
        match *self {
            Targets::Classes(y) => Target::Class(y[n]),
            Targets::Dense(y) => Target::Values(&y[n * outputs..(n + 1) * outputs]),
        }
    }
}

/// The target drawn for one example in one MC sample.
#[derive(Clone, Debug, PartialEq)]
pub enum SampledTarget {
    Class(usize),
    Values(Vec<f64>),
}

/// One loss `ℓ(f, y)` of a network output `f ∈ R^C` (one example).
pub trait Loss: Sync {
    /// Its option value.
    fn kind(&self) -> LossKind;

    /// Whether its targets are class indices (else `[B, C]` values).
    fn class_targets(&self) -> bool;

    /// `C'`, the mean reduction's normaliser besides `N`: 1 (CE) or `C` (MSE, BCE).
    fn mean_normaliser(&self, outputs: usize) -> f64;

    /// Checks dense targets for the Fisher type beyond finiteness (BCE type-2: binary).
    fn check_values(&self, _fisher: FisherType, _y: &[f64]) -> Result<()> {
        Ok(())
    }

    /// `ℓ(f, y)`.
    fn value(&self, f: &[f64], y: Target) -> f64;

    /// Appends `s·∇_f ℓ(f, y)` (MSE `2(f − y)`, CE `p − e_y`, BCE `σ(f) − y`) to `out`.
    fn push_gradient(&self, f: &[f64], y: Target, s: f64, out: &mut Vec<f64>);

    /// Writes column `c` of `σ_b·S` (`S Sᵀ = c_C·∇²ℓ`) into `column` (zeros given).
    fn hessian_sqrt_column(&self, f: &[f64], c: usize, sigma_b: f64, c_c: f64, column: &mut [f64]);

    /// The target of MC sample `m` of global example `n`: the contract of [`crate::rng`].
    fn sample(&self, f: &[f64], rng: &Philox, n: u32, m: u32) -> SampledTarget;

    /// `σ_b` (CE) or `σ'` (MSE, BCE) of the empirical gradient: 1 for sum, `1/B` (CE
    /// mean) or `1/(B√C)` (MSE/BCE mean).
    fn gradient_scale(&self, reduction: Reduction, batch: usize, outputs: usize) -> f64 {
        match reduction {
            Reduction::Sum => 1.0,
            Reduction::Mean => 1.0 / (batch as f64 * (outputs as f64).sqrt()),
        }
    }

    /// The factor the GPU kernel multiplies its vectors with (see `shaders/`): type-2
    /// `σ_b·√(2c_C)` (MSE), `σ_b` (CE), `σ_b·√c_C` (BCE); empirical and MC `2σ'`
    /// (MSE), `σ_b` (CE), `σ'` (BCE).
    fn kernel_scale(
        &self,
        fisher: FisherType,
        reduction: Reduction,
        batch: usize,
        outputs: usize,
    ) -> f64;

    /// Its GPU kernel.
    fn kernel(&self) -> LossKernel;
}

/// The loss of `kind`.
pub fn of(kind: LossKind) -> &'static dyn Loss {
    match kind {
        LossKind::Mse => &mse::Mse,
        LossKind::CrossEntropy => &cross_entropy::CrossEntropy,
        LossKind::BceWithLogits => &bce::Bce,
    }
}

/// `σ_b` and `c_C` of a batch.
fn type2_scales(loss: &dyn Loss, reduction: Reduction, batch: usize, outputs: usize) -> (f64, f64) {
    match reduction {
        Reduction::Sum => (1.0, 1.0),
        Reduction::Mean => (1.0 / batch as f64, 1.0 / loss.mean_normaliser(outputs)),
    }
}

/// [`Loss::kernel_scale`] of a loss with dense targets whose gradient carries the
/// factor `k` (MSE `2(f − y)`: 2, BCE `σ(f) − y`: 1) and whose Hessian square root is
/// `√k` times that of `c_C`: type-2 `σ_b·√(k·c_C)`, empirical and MC `k·σ'`.
fn dense_kernel_scale(
    loss: &dyn Loss,
    fisher: FisherType,
    reduction: Reduction,
    batch: usize,
    outputs: usize,
    k: f64,
) -> f64 {
    if fisher == FisherType::Type2 {
        let (sigma_b, c_c) = type2_scales(loss, reduction, batch, outputs);
        sigma_b * (k * c_c).sqrt()
    } else {
        k * loss.gradient_scale(reduction, batch, outputs)
    }
}

/// The backpropagated vectors of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchVectors {
    /// `nv`: `C` (type-2), `mc` (MC), 1 (empirical), 0 (forward-only).
    pub num_vectors: usize,
    pub batch: usize,
    pub outputs: usize,
    /// Row-major `[nv, B, C]`.
    pub values: Vec<f64>,
    /// κ_b, the factor every outer product of these vectors is scaled with.
    pub kappa: f64,
}

/// κ_b of SPEC §3.5 for `R = 1`: `1/mc` (sum) or `B_b²/(N·mc)` (mean).
pub fn kappa(reduction: Reduction, batch: usize, num_data: usize, mc_samples: usize) -> f64 {
    let mc = mc_samples as f64;
    match reduction {
        Reduction::Sum => 1.0 / mc,
        Reduction::Mean => (batch as f64).powi(2) / (num_data as f64 * mc),
    }
}

/// Row-wise softmax of `f` (numerically stable).
pub fn softmax(f: &[f64]) -> Vec<f64> {
    let max = f.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = f.iter().map(|&x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Checks targets against the loss, the batch shape and the Fisher type: class indices
/// below `C` for CE, `B·C` finite values for MSE/BCE, and values in {0, 1} for BCE with
/// type-2 (as curvlinops 3.0.1).
pub fn check_targets(
    loss: LossKind,
    fisher: FisherType,
    targets: Targets<'_>,
    batch: usize,
    outputs: usize,
) -> Result<()> {
    let l = of(loss);
    match (l.class_targets(), targets) {
        (true, Targets::Classes(y)) => {
            if y.len() != batch {
                return Err(Error::Options(format!(
                    "{loss}: expected {batch} class indices, found {}",
                    y.len()
                )));
            }
            if let Some((n, &c)) = y.iter().enumerate().find(|&(_, &c)| c >= outputs) {
                return Err(Error::Options(format!(
                    "{loss}: label {c} of example {n} is out of range for {outputs} classes"
                )));
            }
        }
        (false, Targets::Dense(y)) => {
            if y.len() != batch * outputs {
                return Err(Error::Options(format!(
                    "{loss}: expected {batch}×{outputs} targets, found {}",
                    y.len()
                )));
            }
            if let Some(i) = y.iter().position(|v| !v.is_finite()) {
                return Err(Error::Options(format!(
                    "{loss}: target {i} is not finite ({})",
                    y[i]
                )));
            }
            l.check_values(fisher, y)?;
        }
        (true, Targets::Dense(_)) => {
            return Err(Error::Options(format!(
                "{loss} needs class-index targets, found dense values"
            )));
        }
        (false, Targets::Classes(_)) => {
            return Err(Error::Options(format!(
                "{loss} needs dense [B, C] targets, found class indices"
            )));
        }
    }
    Ok(())
}

/// This batch's contribution to the objective `L` of SPEC §0: `Σ_n ℓ_n` (sum) or
/// `Σ_n ℓ_n / (N·C')` (mean). `logits` is row-major `[B, C]`.
pub fn loss_value(
    loss: LossKind,
    reduction: Reduction,
    logits: &[f64],
    targets: Targets<'_>,
    outputs: usize,
    num_data: usize,
) -> Result<f64> {
    let batch = logits.len() / outputs.max(1);
    check_targets(loss, FisherType::Empirical, targets, batch, outputs)?;
    let l = of(loss);
    let total: f64 = logits
        .chunks_exact(outputs)
        .enumerate()
        .map(|(n, f)| l.value(f, targets.row(n, outputs)))
        .sum();
    Ok(match reduction {
        Reduction::Sum => total,
        Reduction::Mean => total / (num_data as f64 * l.mean_normaliser(outputs)),
    })
}

/// Labels drawn for MC sample `m` of one batch (global example index `batch_start + n`).
#[derive(Clone, Debug, PartialEq)]
pub enum SampledTargets {
    Classes(Vec<usize>),
    Dense(Vec<f64>),
}

impl SampledTargets {
    pub fn as_targets(&self) -> Targets<'_> {
        match self {
            SampledTargets::Classes(y) => Targets::Classes(y),
            SampledTargets::Dense(y) => Targets::Dense(y),
        }
    }
}

/// The labels of MC sample `m` for the batch `logits [B, C]` starting at global example
/// `batch_start` (the [`crate::rng`] contract): MSE `f + √0.5·ε`, CE categorical of
/// `softmax(f)`, BCE Bernoulli of `σ(f)`.
pub fn sample_targets(
    loss: LossKind,
    logits: &[f64],
    outputs: usize,
    seed: u64,
    batch_start: usize,
    m: usize,
) -> SampledTargets {
    let rng = Philox::new(seed);
    let l = of(loss);
    let rows = logits
        .chunks_exact(outputs)
        .enumerate()
        .map(|(n, f)| l.sample(f, &rng, (batch_start + n) as u32, m as u32));
    if l.class_targets() {
        SampledTargets::Classes(
            rows.map(|t| match t {
                SampledTarget::Class(c) => c,
                SampledTarget::Values(_) => unreachable!("a class loss samples classes"),
            })
            .collect(),
        )
    } else {
        SampledTargets::Dense(
            rows.flat_map(|t| match t {
                SampledTarget::Values(v) => v,
                SampledTarget::Class(_) => unreachable!("a dense loss samples values"),
            })
            .collect(),
        )
    }
}

/// The empirical vector `[B, C]` of one batch for the given (true or sampled) labels,
/// appended to `out`.
fn push_gradients(
    l: &dyn Loss,
    reduction: Reduction,
    logits: &[f64],
    targets: Targets<'_>,
    outputs: usize,
    out: &mut Vec<f64>,
) {
    let batch = logits.len() / outputs;
    let s = l.gradient_scale(reduction, batch, outputs);
    for (n, f) in logits.chunks_exact(outputs).enumerate() {
        l.push_gradient(f, targets.row(n, outputs), s, out);
    }
}

/// The backpropagated vectors `[nv, B, C]` and κ_b of the batch `logits [B, C]` whose
/// first example has global index `batch_start`, for a dataset of `num_data` examples.
pub fn backprop_vectors(
    opts: &Options,
    logits: &[f64],
    outputs: usize,
    targets: Targets<'_>,
    batch_start: usize,
    num_data: usize,
) -> Result<BatchVectors> {
    if outputs == 0 || !logits.len().is_multiple_of(outputs) {
        return Err(Error::Options(format!(
            "logits of length {} do not form rows of {outputs} outputs",
            logits.len()
        )));
    }
    let batch = logits.len() / outputs;
    check_targets(opts.loss, opts.fisher, targets, batch, outputs)?;
    let l = of(opts.loss);
    let nv = opts.num_vectors(outputs);
    let mut values = Vec::with_capacity(nv * batch * outputs);
    match opts.fisher {
        FisherType::ForwardOnly => {}
        FisherType::Empirical => {
            push_gradients(l, opts.reduction, logits, targets, outputs, &mut values)
        }
        FisherType::Mc => {
            for m in 0..opts.mc_samples {
                let y = sample_targets(opts.loss, logits, outputs, opts.seed, batch_start, m);
                push_gradients(
                    l,
                    opts.reduction,
                    logits,
                    y.as_targets(),
                    outputs,
                    &mut values,
                );
            }
        }
        FisherType::Type2 => {
            values.resize(nv * batch * outputs, 0.0);
            let (sigma_b, c_c) = type2_scales(l, opts.reduction, batch, outputs);
            for (n, f) in logits.chunks_exact(outputs).enumerate() {
                for c in 0..outputs {
                    let at = (c * batch + n) * outputs;
                    l.hessian_sqrt_column(f, c, sigma_b, c_c, &mut values[at..at + outputs]);
                }
            }
        }
    }
    Ok(BatchVectors {
        num_vectors: nv,
        batch,
        outputs,
        values,
        kappa: kappa(opts.reduction, batch, num_data, opts.mc_samples),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(loss: LossKind, reduction: Reduction, fisher: FisherType) -> Options {
        Options {
            loss,
            reduction,
            fisher,
            ..Options::default()
        }
    }

    /// Σ_v V_v V_vᵀ of one row, scaled by κ, against the closed form of SPEC §3.6:
    /// the loss Hessian / (N·C') for type-2.
    #[test]
    fn type2_vectors_square_to_the_hessian() {
        let f = [0.3, -1.2, 0.7];
        let (b, c, n_data) = (1, 3, 5);
        for (loss, t) in [
            (LossKind::Mse, Targets::Dense(&[0.0, 1.0, 0.0])),
            (LossKind::BceWithLogits, Targets::Dense(&[0.0, 1.0, 1.0])),
            (LossKind::CrossEntropy, Targets::Classes(&[2])),
        ] {
            for red in [Reduction::Sum, Reduction::Mean] {
                let v = backprop_vectors(&opts(loss, red, FisherType::Type2), &f, c, t, 0, n_data)
                    .unwrap();
                assert_eq!((v.num_vectors, v.batch), (c, b));
                let p = softmax(&f);
                let hess = |i: usize, j: usize| -> f64 {
                    let d = f64::from(u8::from(i == j));
                    match loss {
                        LossKind::Mse => 2.0 * d,
                        LossKind::BceWithLogits => {
                            let s = sigmoid(f[i]);
                            d * s * (1.0 - s)
                        }
                        LossKind::CrossEntropy => d * p[i] - p[i] * p[j],
                    }
                };
                let norm = match (red, loss) {
                    (Reduction::Sum, _) => 1.0,
                    (Reduction::Mean, LossKind::CrossEntropy) => 1.0 / n_data as f64,
                    (Reduction::Mean, _) => 1.0 / (n_data * c) as f64,
                };
                for i in 0..c {
                    for j in 0..c {
                        let got: f64 = (0..c)
                            .map(|k| v.values[k * c + i] * v.values[k * c + j])
                            .sum::<f64>()
                            * v.kappa;
                        let want = hess(i, j) * norm;
                        assert!((got - want).abs() < 1e-15, "{loss} {red}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// E2: the √C rule for the empirical Fisher with MSE.
    #[test]
    fn e2_sqrt_c_rule() {
        let f = [1.0, 2.0, 3.0];
        let y = [0.0; 3];
        for (red, scale) in [(Reduction::Sum, 4.0), (Reduction::Mean, 4.0 / 3.0)] {
            let v = backprop_vectors(
                &opts(LossKind::Mse, red, FisherType::Empirical),
                &f,
                3,
                Targets::Dense(&y),
                0,
                1,
            )
            .unwrap();
            for i in 0..3 {
                for j in 0..3 {
                    let got = v.kappa * v.values[i] * v.values[j];
                    let want = scale * f[i] * f[j];
                    assert!((got - want).abs() < 1e-14, "{red}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn bce_type2_needs_binary_targets() {
        let o = opts(LossKind::BceWithLogits, Reduction::Mean, FisherType::Type2);
        let err = backprop_vectors(&o, &[0.1, 0.2], 2, Targets::Dense(&[0.5, 1.0]), 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("binary"), "{err}");
        let o = Options {
            fisher: FisherType::Empirical,
            ..o
        };
        assert!(backprop_vectors(&o, &[0.1, 0.2], 2, Targets::Dense(&[0.5, 1.0]), 0, 1).is_ok());
    }

    #[test]
    fn labels_out_of_range_are_errors() {
        let o = opts(
            LossKind::CrossEntropy,
            Reduction::Sum,
            FisherType::Empirical,
        );
        let err = backprop_vectors(&o, &[0.1, 0.2], 2, Targets::Classes(&[2]), 0, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    /// Samples are a function of the global example index only: splitting a batch gives
    /// the same vectors.
    #[test]
    fn mc_samples_do_not_depend_on_batching() {
        let logits: Vec<f64> = (0..12).map(|i| (i as f64 * 0.37).sin()).collect();
        for loss in [
            LossKind::Mse,
            LossKind::CrossEntropy,
            LossKind::BceWithLogits,
        ] {
            let o = Options {
                mc_samples: 3,
                ..opts(loss, Reduction::Sum, FisherType::Mc)
            };
            let whole = (0..3).map(|m| sample_targets(loss, &logits, 3, o.seed, 10, m));
            for (m, w) in whole.enumerate() {
                let a = sample_targets(loss, &logits[..6], 3, o.seed, 10, m);
                let b = sample_targets(loss, &logits[6..], 3, o.seed, 12, m);
                let joined = match (a, b) {
                    (SampledTargets::Classes(mut a), SampledTargets::Classes(b)) => {
                        a.extend(b);
                        SampledTargets::Classes(a)
                    }
                    (SampledTargets::Dense(mut a), SampledTargets::Dense(b)) => {
                        a.extend(b);
                        SampledTargets::Dense(a)
                    }
                    _ => unreachable!(),
                };
                assert_eq!(joined, w);
            }
        }
    }

    #[test]
    fn loss_values() {
        let f = [0.0, 2f64.ln(), 3f64.ln()];
        let l = loss_value(
            LossKind::CrossEntropy,
            Reduction::Mean,
            &f,
            Targets::Classes(&[2]),
            3,
            2,
        )
        .unwrap();
        assert!((l - (-(0.5f64).ln() / 2.0)).abs() < 1e-15);
        let l = loss_value(
            LossKind::BceWithLogits,
            Reduction::Sum,
            &[0.0, 0.0],
            Targets::Dense(&[1.0, 0.0]),
            2,
            1,
        )
        .unwrap();
        assert!((l - 2.0 * 2f64.ln()).abs() < 1e-15);
    }
}
