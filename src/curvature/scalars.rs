//! Scalar properties of KFAC and EKFAC from eigenvalues, reduced in f64 on the host
//! (shared by the CPU reference and the GPU path, whose eigenvalues are f32 read back).
//!
//! | | KFAC weight/joint block | KFAC bias block | EKFAC block |
//! |---|---|---|---|
//! | trace | `Σλ_G·Σλ_A` | `Σλ_G` | `ΣΛ` |
//! | logdet | `D·Σlog λ_G + d_out·Σlog λ_A` | `Σlog λ_G` | `Σlog Λ` |
//! | ‖·‖_F | `√Σλ_G²·√Σλ_A²` | `√Σλ_G²` | `√ΣΛ²` |
//! | `log det(X+δI)` | `Σ_{k,l} log(λ_G,k λ_A,l + δ)` | `Σ log(λ_G + δ)` | `Σ log(Λ + δ)` |
//!
//! `det = exp(logdet)`. Totals add traces, logdets and squared Frobenius norms over blocks.
//!
//! **Zero eigenvalues.** f32 eigensolvers cannot resolve eigenvalues far below the
//! largest one, so an eigenvalue *counts as zero* when it is at most
//! [`KFAC_ZERO_THRESHOLD`] × the largest eigenvalue of its own Kronecker factor (KFAC) or
//! [`EKFAC_ZERO_THRESHOLD`] × the largest corrected eigenvalue of its block (EKFAC). A
//! block with such an eigenvalue has `logdet = −∞` and `det = 0`;
//! [`Scalars::zero_eigenvalues`] counts the block operator's eigenvalues that are zero
//! (for KFAC, `d_out·D − n_G·n_A` with `n_G`, `n_A` the non-zero factor eigenvalues).
//! In the damped logdet such eigenvalues enter as exactly 0 (so as `log δ`).

use serde::{Deserialize, Serialize};

/// Relative threshold under which a Kronecker-factor eigenvalue counts as zero.
pub const KFAC_ZERO_THRESHOLD: f64 = 1e-6;
/// Relative threshold under which a corrected EKFAC eigenvalue counts as zero.
pub const EKFAC_ZERO_THRESHOLD: f64 = 1e-10;

/// Trace, determinant, log-determinant, damped log-determinant and Frobenius norm of one
/// block or of the whole operator.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scalars {
    pub trace: f64,
    pub det: f64,
    pub logdet: f64,
    /// `log det(X + δI)` for the damping δ it was computed with.
    pub logdet_damped: f64,
    pub frobenius_norm: f64,
    /// Eigenvalues of the operator that count as zero (see the module doc).
    pub zero_eigenvalues: usize,
}

/// Eigenvalues with the counted-as-zero ones replaced by 0, and the number of them.
fn clean(eigenvalues: &[f64], threshold: f64) -> (Vec<f64>, usize) {
    let max = eigenvalues.iter().copied().fold(0.0, f64::max);
    let mut zeros = 0;
    let cleaned = eigenvalues
        .iter()
        .map(|&l| {
            if l <= threshold * max {
                zeros += 1;
                0.0
            } else {
                l
            }
        })
        .collect();
    (cleaned, zeros)
}

fn sum(x: &[f64]) -> f64 {
    x.iter().sum()
}

fn sum_sq(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

fn sum_log(x: &[f64]) -> f64 {
    x.iter().map(|v| v.ln()).sum()
}

/// Scalars of a KFAC block from the eigenvalues of `G` (`d_out`) and, for weight and
/// joint blocks, of `A` (`D`; `None` for a bias block). `damping` is δ of the damped
/// logdet (exact damping `(G⊗A + δI)`).
pub fn kfac_block(g_eigenvalues: &[f64], a_eigenvalues: Option<&[f64]>, damping: f64) -> Scalars {
    let (lg, zg) = clean(g_eigenvalues, KFAC_ZERO_THRESHOLD);
    let d_out = lg.len();
    match a_eigenvalues {
        None => {
            let logdet = if zg > 0 {
                f64::NEG_INFINITY
            } else {
                sum_log(&lg)
            };
            Scalars {
                trace: sum(g_eigenvalues),
                det: logdet.exp(),
                logdet,
                logdet_damped: lg.iter().map(|l| (l + damping).ln()).sum(),
                frobenius_norm: sum_sq(g_eigenvalues).sqrt(),
                zero_eigenvalues: zg,
            }
        }
        Some(a) => {
            let (la, za) = clean(a, KFAC_ZERO_THRESHOLD);
            let d = la.len();
            let logdet = if zg > 0 || za > 0 {
                f64::NEG_INFINITY
            } else {
                d as f64 * sum_log(&lg) + d_out as f64 * sum_log(&la)
            };
            let logdet_damped = lg
                .iter()
                .flat_map(|&g| la.iter().map(move |&a| (g * a + damping).ln()))
                .sum();
            Scalars {
                trace: sum(g_eigenvalues) * sum(a),
                det: logdet.exp(),
                logdet,
                logdet_damped,
                frobenius_norm: (sum_sq(g_eigenvalues) * sum_sq(a)).sqrt(),
                zero_eigenvalues: d_out * d - (d_out - zg) * (d - za),
            }
        }
    }
}

/// Scalars of an EKFAC block from its corrected eigenvalues Λ (any layout).
pub fn ekfac_block(corrected: &[f64], damping: f64) -> Scalars {
    let (l, z) = clean(corrected, EKFAC_ZERO_THRESHOLD);
    let logdet = if z > 0 {
        f64::NEG_INFINITY
    } else {
        sum_log(&l)
    };
    Scalars {
        trace: sum(corrected),
        det: logdet.exp(),
        logdet,
        logdet_damped: l.iter().map(|v| (v + damping).ln()).sum(),
        frobenius_norm: sum_sq(corrected).sqrt(),
        zero_eigenvalues: z,
    }
}

/// The scalars of the block-diagonal operator made of `blocks`.
pub fn total(blocks: &[Scalars]) -> Scalars {
    let logdet: f64 = blocks.iter().map(|s| s.logdet).sum();
    Scalars {
        trace: blocks.iter().map(|s| s.trace).sum(),
        det: logdet.exp(),
        logdet,
        logdet_damped: blocks.iter().map(|s| s.logdet_damped).sum(),
        frobenius_norm: blocks
            .iter()
            .map(|s| s.frobenius_norm.powi(2))
            .sum::<f64>()
            .sqrt(),
        zero_eigenvalues: blocks.iter().map(|s| s.zero_eigenvalues).sum(),
    }
}
