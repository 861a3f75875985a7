//! Products of KFAC, EKFAC and their damped inverses with `[P, K]` matrices on the GPU.
//!
//! Every mode is the same computation in the Kronecker eigenbasis of a block,
//! `V ↦ Q_G (M ∘ (Q_Gᵀ V Q_A)) Q_Aᵀ` for `V` the block's `[d_out, D]` slice of one
//! column, with a mode-specific `M ∈ R^{d_out×D}` ([`eigenbasis_scaling`]):
//!
//! | mode | `M[k, l]` (weight or joint block) | bias block |
//! |---|---|---|
//! | KFAC | `λ_G,k λ_A,l` | `λ_G,k` |
//! | EKFAC | `Λ[k, l]` | `Λ[k]` |
//! | KFAC exact inverse | `1/(λ_G,k λ_A,l + δ)` | `1/(λ_G,k + δ)` |
//! | KFAC plain inverse | `1/((λ_G,k + δ)(λ_A,l + δ))` | `1/(λ_G,k + δ)` |
//! | KFAC heuristic inverse | `1/((λ_G,k + δ_G)(λ_A,l + δ_A))` | `1/(λ_G,k + δ_G)` |
//! | EKFAC inverse | `1/(Λ[k, l] + δ)` | `1/(Λ[k] + δ)` |
//!
//! Plain damping is curvlinops' `(G+δI)⁻¹ ⊗ (A+δI)⁻¹`, computed through the factors'
//! eigenbases rather than Cholesky (the same matrix). Heuristic damping follows
//! curvlinops 3.0.1 (Martens & Grosse 2015, §6.3): per layer `π = √(mean λ_A / mean λ_G)`
//! (`mean diag = tr/n`), `δ_A = max(√δ·π, min_damping)`, `δ_G = max(√δ/π, min_damping)`,
//! applied when the layer has `A`, `mean λ_A ≥ 0` and `mean λ_G > 0`, otherwise
//! `δ_A = δ_G = δ`; a separately treated bias reuses its layer's `δ_G`.

use crate::curvature::layout::BlockKind;
use crate::curvature::options::{DampingMode, MIN_DAMPING};
use crate::curvature::scalars::{EKFAC_ZERO_THRESHOLD, KFAC_ZERO_THRESHOLD};
use crate::curvature::state::CurvatureState;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::ops::eigencorrect::scale_broadcast;
use crate::ops::gemm::{Gemm, gemm};

/// Which approximation a product or scalar refers to (on the GPU and in the CPU
/// reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approximation {
    Kfac,
    Ekfac,
}

/// The operator itself or its damped inverse.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transform {
    Forward,
    Inverse { damping: f64, mode: DampingMode },
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64
}

/// `M` of every block (row-major `[d_out, D]`, see the module doc), computed in f64 and
/// rounded to f32.
pub fn eigenbasis_scaling(
    state: &CurvatureState,
    approx: Approximation,
    transform: Transform,
) -> Result<Vec<Vec<f32>>> {
    if let Transform::Inverse { damping, .. } = transform
        && !(damping.is_finite() && damping >= 0.0)
    {
        return Err(Error::Options(format!(
            "damping must be a finite non-negative number, found {damping}"
        )));
    }
    let corrected = match approx {
        Approximation::Ekfac => Some(state.corrected.as_ref().ok_or_else(|| {
            Error::Options(
                "this state has no EKFAC (fitted with fisher forward-only); use KFAC".into(),
            )
        })?),
        Approximation::Kfac => None,
    };
    let mut out = vec![Vec::new(); state.layout.blocks.len()];
    for (layer, factors) in state.layout.layers.iter().zip(&state.layers) {
        let lambda_g = &factors.gradient.values;
        let ones = [1.0f32];
        let lambda_a: &[f32] = factors.input.as_ref().map_or(&ones, |a| &a.values);
        let (max_g, max_a) = (largest(lambda_g), largest(lambda_a));
        let (delta_a, delta_g) = match transform {
            Transform::Inverse {
                damping,
                mode: DampingMode::Heuristic,
            } => {
                let (m_a, m_g) = (mean(lambda_a), mean(lambda_g));
                if factors.input.is_some() && m_a >= 0.0 && m_g > 0.0 {
                    let pi = (m_a / m_g).sqrt();
                    (
                        (damping.sqrt() * pi).max(MIN_DAMPING),
                        (damping.sqrt() / pi).max(MIN_DAMPING),
                    )
                } else {
                    (damping, damping)
                }
            }
            Transform::Inverse { damping, .. } => (damping, damping),
            Transform::Forward => (0.0, 0.0),
        };
        for &b in &layer.blocks {
            let block = &state.layout.blocks[b];
            let a: &[f32] = if block.kind == BlockKind::Bias {
                &ones
            } else {
                lambda_a
            };
            let max_a = if block.kind == BlockKind::Bias {
                1.0
            } else {
                max_a
            };
            let max_corrected = corrected.map_or(0.0, |c| largest(&c[b]));
            let mut singular = Singular::default();
            let mut m = Vec::with_capacity(block.len());
            for (k, &g) in lambda_g.iter().enumerate() {
                for (l, &a_l) in a.iter().enumerate() {
                    let (g, a_l) = (f64::from(g), f64::from(a_l));
                    let value = match (approx, transform) {
                        (Approximation::Kfac, Transform::Forward) => g * a_l,
                        (Approximation::Ekfac, Transform::Forward) => {
                            f64::from(corrected.expect("EKFAC")[b][k * block.d_in + l])
                        }
                        (Approximation::Ekfac, Transform::Inverse { damping, mode }) => {
                            if mode != DampingMode::Exact {
                                return Err(Error::Options(
                                    "only exact damping is supported for EKFAC".into(),
                                ));
                            }
                            let lambda =
                                f64::from(corrected.expect("EKFAC")[b][k * block.d_in + l]);
                            let threshold = EKFAC_ZERO_THRESHOLD * max_corrected;
                            singular.check(lambda <= threshold, lambda + damping, threshold);
                            1.0 / (lambda + damping)
                        }
                        (Approximation::Kfac, Transform::Inverse { damping, mode }) => {
                            let zero_g = g <= KFAC_ZERO_THRESHOLD * max_g;
                            let zero_a = a_l <= KFAC_ZERO_THRESHOLD * max_a;
                            match (mode, block.kind) {
                                (DampingMode::Exact, _) => {
                                    let threshold = KFAC_ZERO_THRESHOLD * max_g * max_a;
                                    singular.check(zero_g || zero_a, g * a_l + damping, threshold);
                                    1.0 / (g * a_l + damping)
                                }
                                (_, BlockKind::Bias) => {
                                    let threshold = KFAC_ZERO_THRESHOLD * max_g;
                                    singular.check(zero_g, g + delta_g, threshold);
                                    1.0 / (g + delta_g)
                                }
                                _ => {
                                    let (t_g, t_a) =
                                        (KFAC_ZERO_THRESHOLD * max_g, KFAC_ZERO_THRESHOLD * max_a);
                                    singular.check(zero_g, g + delta_g, t_g);
                                    singular.check(zero_a, a_l + delta_a, t_a);
                                    1.0 / ((g + delta_g) * (a_l + delta_a))
                                }
                            }
                        }
                    };
                    m.push(value as f32);
                }
            }
            if singular.count > 0 {
                let (what, rule, largest) = match approx {
                    Approximation::Kfac => (
                        "KFAC",
                        "1e-6 of the largest eigenvalue of its Kronecker factor",
                        max_g * max_a,
                    ),
                    Approximation::Ekfac => (
                        "EKFAC",
                        "1e-10 of the block's largest corrected eigenvalue",
                        max_corrected,
                    ),
                };
                let (damping, mode) = match transform {
                    Transform::Inverse { damping, mode } => (damping, mode),
                    Transform::Forward => unreachable!("only inverses divide"),
                };
                return Err(Error::model(
                    &layer.name,
                    format!(
                        "the damped inverse of {what} ({} damping, δ = {damping}) would \
                         divide by {} eigenvalue(s) of the {} block that count as zero (at most \
                         {rule}), leaving (eigenvalue + damping) ≤ {:.3e}; pass a damping \
                         above that, e.g. --damping {:.1e}",
                        format!("{mode:?}").to_lowercase(),
                        crate::io::thousands(singular.count),
                        block_suffix(block.kind),
                        singular.threshold,
                        suggested_damping(largest, singular.threshold)
                    ),
                ));
            }
            out[b] = m;
        }
    }
    Ok(out)
}

/// GPU memory [`Operator::columns_per_chunk`] keeps free for a submission's parameter
/// buffer (256 bytes per dispatch at most) and small temporaries.
const SUBMISSION_RESERVE_BYTES: u64 = 64 << 10;

/// The largest of `values` in f64 (0 when there are none or all are negative).
fn largest(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v)).fold(0.0, f64::max)
}

/// A damping to suggest: 1e-3 of the block's largest eigenvalue (the crate's default
/// damping relative to it), at least ten times the zero threshold, at least 1e-8.
fn suggested_damping(largest: f64, threshold: f64) -> f64 {
    (1e-3 * largest).max(10.0 * threshold).max(1e-8)
}

/// Eigenvalues that count as zero whose damped denominator is no larger than the zero
/// threshold: an inverse would divide by (almost) nothing.
#[derive(Default)]
struct Singular {
    count: usize,
    threshold: f64,
}

impl Singular {
    /// Records a direction that counts as zero (`zero`) whose denominator is at most
    /// `threshold`.
    fn check(&mut self, zero: bool, denominator: f64, threshold: f64) {
        if zero && (denominator <= threshold || denominator.is_nan()) {
            self.count += 1;
            self.threshold = self.threshold.max(threshold);
        }
    }
}

fn block_suffix(kind: BlockKind) -> &'static str {
    match kind {
        BlockKind::Weight => "weight",
        BlockKind::Bias => "bias",
        BlockKind::Joint => "joint",
    }
}

/// The eigenbases of a [`CurvatureState`] uploaded to the GPU, ready for products.
pub struct Operator<'a> {
    ctx: &'a GpuContext,
    state: &'a CurvatureState,
    /// Per layout layer: `Q_A` (`None` when only the bias is selected) and `Q_G`.
    bases: Vec<(Option<GpuTensor>, GpuTensor)>,
}

impl<'a> Operator<'a> {
    /// Uploads the eigenvectors of `state`.
    pub fn new(ctx: &'a GpuContext, state: &'a CurvatureState) -> Result<Self> {
        let bases = state
            .layers
            .iter()
            .map(|f| {
                let q_a = f
                    .input
                    .as_ref()
                    .map(|a| ctx.upload(&a.vectors, &[a.dim(), a.dim()]))
                    .transpose()?;
                let g = &f.gradient;
                Ok((q_a, ctx.upload(&g.vectors, &[g.dim(), g.dim()])?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { ctx, state, bases })
    }

    /// `X·V` for the row-major `[P, K]` matrix `v` (model-order parameters), where `X`
    /// is the approximation (or its damped inverse) chosen by `approx` and `transform`.
    /// Returns the row-major `[P, K]` result. Columns are taken in chunks that fit the
    /// memory budget and one storage binding; per chunk one
    /// upload, one compute pass, one readback.
    pub fn apply(
        &self,
        v: &[f32],
        columns: usize,
        approx: Approximation,
        transform: Transform,
    ) -> Result<Vec<f32>> {
        let layout = &self.state.layout;
        if columns == 0 || v.len() != layout.num_params * columns {
            return Err(Error::Options(format!(
                "expected a [{}, K] matrix with K ≥ 1 for this state's {} parameters, found {} \
                 values with K = {columns}",
                layout.num_params,
                layout.num_params,
                v.len()
            )));
        }
        let scaling = eigenbasis_scaling(self.state, approx, transform)?;
        let m_host: Vec<f32> = scaling.concat();
        let m = self.ctx.upload(&m_host, &[m_host.len()])?;
        drop(m_host);
        let chunk = self.columns_per_chunk(columns);
        if chunk >= columns {
            return self.apply_chunk(v, columns, &m);
        }
        let p = layout.num_params;
        let mut out = vec![0.0; v.len()];
        let mut part = Vec::with_capacity(p * chunk);
        for first in (0..columns).step_by(chunk) {
            let c = chunk.min(columns - first);
            part.clear();
            for row in v.chunks_exact(columns) {
                part.extend_from_slice(&row[first..first + c]);
            }
            let result = self.apply_chunk(&part, c, &m)?;
            for (row, r) in out.chunks_exact_mut(columns).zip(result.chunks_exact(c)) {
                row[first..first + c].copy_from_slice(r);
            }
        }
        Ok(out)
    }

    /// How many columns one pass of [`Self::apply`] takes: as many as fit the memory
    /// budget left after what is allocated (the bases, `M`) and a reserve for the
    /// submission's parameter buffer, at three `[P]` vectors per column (`X`, `T` and room
    /// for GEMM temporaries), and as keep `X` within one storage binding; at least one.
    pub fn columns_per_chunk(&self, columns: usize) -> usize {
        let p = self.state.layout.num_params.max(1);
        let free = self
            .ctx
            .memory_budget()
            .saturating_sub(self.ctx.memory().current_bytes())
            .saturating_sub(SUBMISSION_RESERVE_BYTES);
        let by_budget = usize::try_from(free / (3 * 4 * p as u64)).unwrap_or(usize::MAX);
        let by_binding = self.ctx.binding_elements().0 / p;
        by_budget.min(by_binding).clamp(1, columns)
    }

    /// One pass over `columns` columns of `v` (`[P, columns]`) with the scaling `m`.
    fn apply_chunk(&self, v: &[f32], columns: usize, m: &GpuTensor) -> Result<Vec<f32>> {
        let layout = &self.state.layout;
        let mut x_host = Vec::with_capacity(v.len());
        let mut offsets = Vec::with_capacity(layout.blocks.len());
        for b in 0..layout.blocks.len() {
            offsets.push(x_host.len());
            x_host.extend(layout.gather(b, v, columns));
        }
        let x = self.ctx.upload(&x_host, &[x_host.len()])?;
        let t = self.ctx.zeros(&[x_host.len()])?;
        drop(x_host);
        let mut rec = self.ctx.recorder();
        let mut m_offset = 0;
        for (layer, (q_a, q_g)) in layout.layers.iter().zip(&self.bases) {
            for &b in &layer.blocks {
                let block = &layout.blocks[b];
                let (d_out, d) = (block.d_out, block.d_in);
                let off = offsets[b];
                let per_column = d_out * d;
                // T = Q_Gᵀ X per column.
                let mut rotate_g = Gemm::new(d_out, d, d_out, true, false).batched(columns);
                rotate_g.stride_a = 0;
                rotate_g.offset_b = off;
                rotate_g.offset_c = off;
                gemm(&mut rec, &rotate_g, q_g, &x, &t)?;
                let scaled = match (block.kind, q_a) {
                    (BlockKind::Bias, _) | (_, None) => &t,
                    (_, Some(q_a)) => {
                        // X = T Q_A over all K·d_out rows.
                        let mut rotate_a = Gemm::new(columns * d_out, d, d, false, false);
                        rotate_a.offset_a = off;
                        rotate_a.offset_c = off;
                        gemm(&mut rec, &rotate_a, &t, q_a, &x)?;
                        &x
                    }
                };
                scale_broadcast(
                    &mut rec,
                    scaled,
                    off,
                    columns * per_column,
                    m,
                    m_offset,
                    per_column,
                )?;
                if let (BlockKind::Weight | BlockKind::Joint, Some(q_a)) = (block.kind, q_a) {
                    // T = X Q_Aᵀ.
                    let mut back_a = Gemm::new(columns * d_out, d, d, false, true);
                    back_a.offset_a = off;
                    back_a.offset_c = off;
                    gemm(&mut rec, &back_a, &x, q_a, &t)?;
                }
                // X = Q_G T per column.
                let mut back_g = Gemm::new(d_out, d, d_out, false, false).batched(columns);
                back_g.stride_a = 0;
                back_g.offset_b = off;
                back_g.offset_c = off;
                gemm(&mut rec, &back_g, q_g, &t, &x)?;
                m_offset += per_column;
            }
        }
        rec.submit()?;
        let result = self.ctx.read(&x)?;
        let mut out = vec![0.0; v.len()];
        for (b, &off) in offsets.iter().enumerate() {
            let len = layout.blocks[b].len() * columns;
            layout.scatter(b, &result[off..off + len], &mut out, columns);
        }
        Ok(out)
    }
}
