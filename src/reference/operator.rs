//! The f64 reference's operator: products, damped inverse products, scalars and dense
//! matrices of a fitted [`CpuCurvature`] (SPEC §5–§7), block by block in model order.
//! Inverses are computed independently of the eigendecompositions where the maths
//! allows: the exact KFAC inverse by a Cholesky solve of the dense block `G⊗A + δI`, the
//! plain and heuristic ones by Cholesky solves of the damped factors.

use faer::prelude::*;
use faer::{Mat, Side};

use crate::curvature::scalars::{self, Scalars};
use crate::curvature::{DampingMode, MIN_DAMPING};
use crate::error::{Error, Result};
use crate::reference::curvature::{Approximation, CpuCurvature, mat_from_rows, rows_of};

impl CpuCurvature {
    fn corrected(&self, b: usize) -> Result<&[f64]> {
        self.blocks[b]
            .corrected
            .as_deref()
            .ok_or_else(|| Error::Options("EKFAC was not fitted (no eigenvalue correction)".into()))
    }

    /// Applies `f` to each block's `[d_out, D]` matrix of every column of `x [P, K]`.
    fn per_block(
        &self,
        x: &[f64],
        k: usize,
        mut f: impl FnMut(usize, Mat<f64>) -> Result<Mat<f64>>,
    ) -> Result<Vec<f64>> {
        let p = self.layout.num_params;
        if x.len() != p * k {
            return Err(Error::Options(format!(
                "matrix of {} values is not [P = {p}, K = {k}]",
                x.len()
            )));
        }
        let mut out = vec![0.0; p * k];
        for (bi, block) in self.layout.blocks.iter().enumerate() {
            let v = self.layout.gather(bi, x, k);
            let mut y = Vec::with_capacity(v.len());
            for col in v.chunks_exact(block.len()) {
                y.extend(rows_of(&f(
                    bi,
                    mat_from_rows(block.d_out, block.d_in, col),
                )?));
            }
            self.layout.scatter(bi, &y, &mut out, k);
        }
        Ok(out)
    }

    /// `X ↦ KFAC·X` or `EKFAC·X` for `x [P, K]` (model order).
    pub fn matmat(&self, which: Approximation, x: &[f64], k: usize) -> Result<Vec<f64>> {
        self.per_block(x, k, |bi, v| {
            let f = &self.blocks[bi];
            match which {
                Approximation::Kfac => Ok(match &f.a {
                    Some(a) => &f.g * v * a,
                    None => &f.g * v,
                }),
                Approximation::Ekfac => {
                    let lambda = self.corrected(bi)?;
                    Ok(self.in_eigenbasis(bi, v, |idx, x| x * lambda[idx]))
                }
            }
        })
    }

    /// `Q_G (h ∘ (Q_Gᵀ V Q_A)) Q_Aᵀ` with `h` applied to each rotated entry (by its
    /// row-major index in `[d_out, D]`).
    fn in_eigenbasis(&self, bi: usize, v: Mat<f64>, h: impl Fn(usize, f64) -> f64) -> Mat<f64> {
        let f = &self.blocks[bi];
        let qg = &f.g_eigen.vectors;
        let mut r = match &f.a_eigen {
            Some(ea) => qg.transpose() * v * &ea.vectors,
            None => qg.transpose() * v,
        };
        let d = r.ncols();
        for i in 0..r.nrows() {
            for j in 0..d {
                r[(i, j)] = h(i * d + j, r[(i, j)]);
            }
        }
        match &f.a_eigen {
            Some(ea) => qg * r * ea.vectors.transpose(),
            None => qg * r,
        }
    }

    /// The damping of `A` and `G` of block `bi` in `mode` (SPEC §5.3, curvlinops 3.0.1).
    fn factor_damping(&self, bi: usize, damping: f64, mode: DampingMode) -> (f64, f64) {
        if mode != DampingMode::Heuristic {
            return (damping, damping);
        }
        // The module's A: that of its weight or joint block, if selected.
        let layer = self.layout.blocks[bi].layer;
        let module_a = self
            .layout
            .blocks
            .iter()
            .zip(&self.blocks)
            .find_map(|(b, f)| (b.layer == layer).then_some(f.a.as_ref()).flatten());
        let g = &self.blocks[bi].g;
        let mean_diag =
            |m: &Mat<f64>| (0..m.nrows()).map(|i| m[(i, i)]).sum::<f64>() / m.nrows() as f64;
        match module_a {
            Some(a) if mean_diag(a) >= 0.0 && mean_diag(g) > 0.0 => {
                let pi = (mean_diag(a) / mean_diag(g)).sqrt();
                let sd = damping.sqrt();
                ((sd * pi).max(MIN_DAMPING), (sd / pi).max(MIN_DAMPING))
            }
            _ => (damping, damping),
        }
    }

    /// `X ↦ (X_op + δI)⁻¹·X` for EKFAC (exact, `1/(Λ+δ)`; any other mode is an error as
    /// in curvlinops) or KFAC in `mode`.
    pub fn inverse_matmat(
        &self,
        which: Approximation,
        x: &[f64],
        k: usize,
        damping: f64,
        mode: DampingMode,
    ) -> Result<Vec<f64>> {
        if which == Approximation::Ekfac && mode != DampingMode::Exact {
            return Err(Error::Options(format!(
                "only exact damping is supported for EKFAC, found '{mode}'"
            )));
        }
        self.per_block(x, k, |bi, v| {
            let f = &self.blocks[bi];
            match (which, mode) {
                (Approximation::Ekfac, _) => {
                    let lambda = self.corrected(bi)?;
                    Ok(self.in_eigenbasis(bi, v, |idx, x| x / (lambda[idx] + damping)))
                }
                (Approximation::Kfac, DampingMode::Exact) => {
                    let (d_out, d) = (v.nrows(), v.ncols());
                    let dense = Mat::from_fn(d_out * d, d_out * d, |r, c| {
                        let a = f.a.as_ref().map_or(1.0, |a| a[(r % d, c % d)]);
                        f.g[(r / d, c / d)] * a + if r == c { damping } else { 0.0 }
                    });
                    let rhs = Mat::from_fn(d_out * d, 1, |r, _| v[(r / d, r % d)]);
                    let sol = cholesky_solve(&dense, &rhs)?;
                    Ok(Mat::from_fn(d_out, d, |i, j| sol[(i * d + j, 0)]))
                }
                (Approximation::Kfac, _) => {
                    let (da, dg) = self.factor_damping(bi, damping, mode);
                    let shifted = |m: &Mat<f64>, delta: f64| {
                        Mat::from_fn(m.nrows(), m.ncols(), |i, j| {
                            m[(i, j)] + if i == j { delta } else { 0.0 }
                        })
                    };
                    let left = cholesky_solve(&shifted(&f.g, dg), &v)?;
                    match &f.a {
                        Some(a) => Ok(cholesky_solve(
                            &shifted(a, da),
                            &left.transpose().to_owned(),
                        )?
                        .transpose()
                        .to_owned()),
                        None => Ok(left),
                    }
                }
            }
        })
    }

    /// Per-block scalars and their total; `damping` is δ of `logdet_damped`.
    pub fn scalars(&self, which: Approximation, damping: f64) -> Result<(Vec<Scalars>, Scalars)> {
        let per_block = (0..self.blocks.len())
            .map(|bi| {
                let f = &self.blocks[bi];
                Ok(match which {
                    Approximation::Kfac => scalars::kfac_block(
                        &f.g_eigen.values,
                        f.a_eigen.as_ref().map(|e| e.values.as_slice()),
                        damping,
                    ),
                    Approximation::Ekfac => scalars::ekfac_block(self.corrected(bi)?, damping),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let total = scalars::total(&per_block);
        Ok((per_block, total))
    }

    /// The dense `[P, P]` matrix of the operator (row-major), for small `P`.
    pub fn dense(&self, which: Approximation) -> Result<Vec<f64>> {
        let p = self.layout.num_params;
        let mut eye = vec![0.0; p * p];
        for i in 0..p {
            eye[i * p + i] = 1.0;
        }
        self.matmat(which, &eye, p)
    }
}

/// Solves `M X = R` for symmetric positive definite `M` by Cholesky.
fn cholesky_solve(m: &Mat<f64>, rhs: &Mat<f64>) -> Result<Mat<f64>> {
    let llt = m.llt(Side::Lower).map_err(|e| {
        Error::Options(format!(
            "damped factor is not positive definite ({e:?}); increase the damping"
        ))
    })?;
    Ok(llt.solve(rhs))
}
