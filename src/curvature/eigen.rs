//! Eigendecomposition of the Kronecker factors behind one seam: [`EigenSolver`] takes
//! every factor of a fit at once (so an implementation may batch them) and returns
//! each factor's eigenbasis on the host (for the state) and on the GPU (for the
//! correction pass). [`JacobiSolver`], the parallel Jacobi of [`crate::ops::jacobi`],
//! is the GPU implementation (the default); [`HostSolver`] reads each factor back and
//! decomposes it with faer in f64 on the CPU (for comparison, and for adapters that
//! are CPUs). [`solver_for`] maps the `--eigensolver` option to one of them.

use faer::{Mat, Side};

use crate::curvature::options::EigensolverKind;
use crate::curvature::state::FactorEigen;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::ops::jacobi::{EighInput, JacobiOptions, JacobiPath, SweepObserver, eigh_many};
use crate::ops::reduce::copy;
use crate::progress::{Event, Progress, Stage, Sweeps};

/// A symmetric Kronecker factor to eigendecompose.
#[derive(Clone, Copy, Debug)]
pub struct Factor<'a> {
    /// The factor, `[n, n]`, row-major and symmetric.
    pub matrix: &'a GpuTensor,
    /// A previous eigenbasis to start from (e.g. the same layer's factor before the
    /// weights moved). A solver may ignore it, and ignores one that is not `n × n`.
    pub warm_start: Option<&'a FactorEigen>,
}

impl Factor<'_> {
    /// `n`, the factor's side.
    pub fn dim(&self) -> usize {
        self.matrix.shape()[0]
    }

    /// Whether the warm start exists and has the factor's size.
    fn has_warm_start(&self) -> bool {
        self.warm_start.is_some_and(|w| w.dim() == self.dim())
    }
}

/// Symmetric eigendecomposition of many Kronecker factors.
pub trait EigenSolver {
    /// The solver's name as the `--eigensolver` option spells it (`jacobi`, `host`).
    fn name(&self) -> &'static str;

    /// The eigendecomposition `F = Q diag(λ) Qᵀ` of every factor, in the order given:
    /// eigenvalues ascending, the eigenbasis `Q` (`[n, n]`, row-major, column `j` the
    /// unit eigenvector of `λ_j`) both on the host ([`FactorEigen`]) and as a GPU tensor.
    /// Reports [`Stage::Eigendecomposition`] `Advanced` events to `progress` as factors
    /// are done, and may report more in between with `done` unchanged (e.g. after each
    /// sweep of an iterative solver, with its [`Sweeps`]); the caller reports `Started`
    /// and `Finished`.
    fn eigendecompose(
        &self,
        ctx: &GpuContext,
        factors: &[Factor],
        progress: &dyn Progress,
    ) -> Result<Vec<(FactorEigen, GpuTensor)>>;
}

/// Reports that `done` of `total` factors are decomposed; `sweeps`: an iterative
/// solver's progress (its sweeps so far), `None` for a direct solver.
fn report_factors(progress: &dyn Progress, done: usize, total: usize, sweeps: Option<Sweeps>) {
    progress.report(&Event::Advanced {
        stage: Stage::Eigendecomposition,
        done,
        total,
        examples: 0,
        sweeps,
    });
}

/// Parallel Jacobi on the GPU ([`eigh_many`]). Factors of the same size and
/// warm-start status are stacked into one batch while the stack fits one storage
/// binding (`k` times the workgroups per dispatch instead of `k` inputs; a stacked
/// factor keeps sweeping until the whole stack has converged, so it may differ from a
/// lone decomposition in the last bits), and all stacks go into one [`eigh_many`]:
/// their stacking copies in one pass, their sweeps in shared passes with one readback
/// per iteration, and their eigenvalues and eigenvectors read back in one readback.
/// Progress: after every readback that follows a sweep of a host-driven stack, an
/// `Advanced` event with `done` 0 and the [`Sweeps`] of [`JacobiOptions::on_sweep`]
/// (the sweeps of the stacks still sweeping, which start together); once all are
/// read back, one event per stack in order, `done` advanced by its factors, with its
/// own final [`Sweeps`].
#[derive(Debug, Clone, Copy)]
pub struct JacobiSolver {
    /// [`JacobiOptions::max_sweeps`].
    pub max_sweeps: usize,
    /// [`JacobiOptions::tol`].
    pub tol: f32,
    /// [`JacobiOptions::path`].
    pub path: JacobiPath,
    /// [`JacobiOptions::reorthogonalize`].
    pub reorthogonalize: bool,
    /// [`JacobiOptions::refine_min_n`].
    pub refine_min_n: usize,
}

impl Default for JacobiSolver {
    /// [`JacobiOptions::default`]'s settings.
    fn default() -> Self {
        let o = JacobiOptions::default();
        Self {
            max_sweeps: o.max_sweeps,
            tol: o.tol,
            path: o.path,
            reorthogonalize: o.reorthogonalize,
            refine_min_n: o.refine_min_n,
        }
    }
}

/// Factors of one size decomposed as one batch: the factors' indices, `n`, the stacked
/// matrices `[k, n, n]` (the factor itself when `k = 1`) and the stacked warm starts.
struct Stack {
    members: Vec<usize>,
    n: usize,
    matrices: Option<GpuTensor>,
    warm_start: Option<GpuTensor>,
}

impl EigenSolver for JacobiSolver {
    fn name(&self) -> &'static str {
        EigensolverKind::Jacobi.as_str()
    }

    fn eigendecompose(
        &self,
        ctx: &GpuContext,
        factors: &[Factor],
        progress: &dyn Progress,
    ) -> Result<Vec<(FactorEigen, GpuTensor)>> {
        if factors.is_empty() {
            return Ok(Vec::new());
        }
        // Groups by (n, warm), in order of first appearance.
        let mut groups: Vec<((usize, bool), Vec<usize>)> = Vec::new();
        for (i, factor) in factors.iter().enumerate() {
            let key = (factor.dim(), factor.has_warm_start());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        // The stacks, their copies recorded into one pass.
        let limit = ctx.binding_elements().0;
        let mut rec = ctx.recorder();
        let mut stacks = Vec::new();
        for ((n, warm), members) in groups {
            let nn = n * n;
            for members in members.chunks((limit / nn.max(1)).max(1)) {
                let k = members.len();
                let matrices = if k == 1 {
                    None
                } else {
                    let stacked = ctx.zeros(&[k, n, n])?;
                    for (j, &i) in members.iter().enumerate() {
                        copy(&mut rec, factors[i].matrix, 0, &stacked, j * nn, nn)?;
                    }
                    Some(stacked)
                };
                let warm_start = warm
                    .then(|| {
                        let bases: Vec<f32> = members
                            .iter()
                            .flat_map(|&i| factors[i].warm_start.map_or(&[][..], |w| &w.vectors))
                            .copied()
                            .collect();
                        let shape: &[usize] = if k == 1 { &[n, n] } else { &[k, n, n] };
                        ctx.upload(&bases, shape)
                    })
                    .transpose()?;
                stacks.push(Stack {
                    members: members.to_vec(),
                    n,
                    matrices,
                    warm_start,
                });
            }
        }
        rec.submit()?;
        let inputs: Vec<EighInput> = stacks
            .iter()
            .map(|stack| EighInput {
                matrices: stack
                    .matrices
                    .as_ref()
                    .unwrap_or(factors[stack.members[0]].matrix),
                warm_start: stack.warm_start.as_ref(),
            })
            .collect();
        // Live progress per sweep: no factor done yet.
        let on_sweep = |sweeps: Sweeps| report_factors(progress, 0, factors.len(), Some(sweeps));
        let eigens = eigh_many(
            ctx,
            &inputs,
            &JacobiOptions {
                max_sweeps: self.max_sweeps,
                tol: self.tol,
                path: self.path,
                reorthogonalize: self.reorthogonalize,
                refine_min_n: self.refine_min_n,
                on_sweep: Some(SweepObserver(&on_sweep)),
                ..JacobiOptions::default()
            },
        )?;
        // Every stack's values and vectors in one readback.
        let tensors: Vec<&GpuTensor> = eigens
            .iter()
            .flat_map(|e| [&e.values, &e.vectors])
            .collect();
        let read = ctx.read_many(&tensors)?;
        // Each factor's basis as its own GPU tensor (a stack's copied on the GPU, in
        // one pass).
        let mut rec = ctx.recorder();
        let mut results: Vec<Option<(FactorEigen, GpuTensor)>> =
            factors.iter().map(|_| None).collect();
        let mut finished = Vec::with_capacity(stacks.len());
        for ((stack, eigen), read) in stacks.iter().zip(eigens).zip(read.chunks_exact(2)) {
            let (n, nn) = (stack.n, stack.n * stack.n);
            finished.push((
                stack.members.len(),
                Sweeps {
                    dim: n,
                    sweeps: eigen.sweeps,
                    off_diagonal: f64::from(eigen.off_diagonal),
                },
            ));
            let (values, vectors) = (&read[0], &read[1]);
            if let [i] = stack.members[..] {
                let basis = eigen.vectors.reshape(&[n, n])?;
                let eigen = FactorEigen {
                    values: values.clone(),
                    vectors: vectors.clone(),
                };
                results[i] = Some((eigen, basis));
                continue;
            }
            for (j, &i) in stack.members.iter().enumerate() {
                let basis = ctx.zeros(&[n, n])?;
                copy(&mut rec, &eigen.vectors, j * nn, &basis, 0, nn)?;
                let eigen = FactorEigen {
                    values: values[j * n..(j + 1) * n].to_vec(),
                    vectors: vectors[j * nn..(j + 1) * nn].to_vec(),
                };
                results[i] = Some((eigen, basis));
            }
        }
        rec.submit()?;
        let mut done = 0;
        for (k, sweeps) in finished {
            done += k;
            report_factors(progress, done, factors.len(), Some(sweeps));
        }
        results
            .into_iter()
            .map(|r| {
                r.ok_or_else(|| {
                    Error::gpu("the Jacobi eigendecomposition", "a factor without a result")
                })
            })
            .collect()
    }
}

/// faer's self-adjoint eigensolver in f64 on the CPU: each factor is read back, made
/// exactly symmetric (`(F + Fᵀ)/2` in f64), decomposed, rounded to f32 and uploaded.
/// Warm starts are ignored (the solver is direct). One `Advanced` event per factor.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSolver;

impl EigenSolver for HostSolver {
    fn name(&self) -> &'static str {
        EigensolverKind::Host.as_str()
    }

    fn eigendecompose(
        &self,
        ctx: &GpuContext,
        factors: &[Factor],
        progress: &dyn Progress,
    ) -> Result<Vec<(FactorEigen, GpuTensor)>> {
        let mut results = Vec::with_capacity(factors.len());
        for (i, factor) in factors.iter().enumerate() {
            let n = factor.dim();
            let a = ctx.read(factor.matrix)?;
            if let Some(k) = a.iter().position(|x| !x.is_finite()) {
                return Err(Error::gpu(
                    "the host eigendecomposition",
                    format!(
                        "factor {i} ({n}×{n}) has a NaN or Inf entry at ({}, {})",
                        k / n,
                        k % n
                    ),
                ));
            }
            let sym = Mat::from_fn(n, n, |r, c| {
                0.5 * (f64::from(a[r * n + c]) + f64::from(a[c * n + r]))
            });
            let eigen = sym.self_adjoint_eigen(Side::Lower).map_err(|e| {
                Error::gpu(
                    "the host eigendecomposition",
                    format!("factor {i} ({n}×{n}): faer did not converge ({e:?})"),
                )
            })?;
            // faer returns the eigenvalues ascending, the eigenvectors as columns.
            let values: Vec<f32> = (0..n).map(|j| eigen.S()[j] as f32).collect();
            let u = eigen.U();
            let vectors: Vec<f32> = (0..n * n).map(|k| u[(k / n, k % n)] as f32).collect();
            let basis = ctx.upload(&vectors, &[n, n])?;
            results.push((FactorEigen { values, vectors }, basis));
            report_factors(progress, i + 1, factors.len(), None);
        }
        Ok(results)
    }
}

/// The solver `kind` names: [`EigensolverKind::Auto`] is [`HostSolver`] on an adapter
/// whose device type is CPU (a software driver) and `jacobi` elsewhere.
pub fn solver_for(kind: EigensolverKind, ctx: &GpuContext) -> Box<dyn EigenSolver> {
    let host = match kind {
        EigensolverKind::Jacobi => false,
        EigensolverKind::Host => true,
        EigensolverKind::Auto => ctx.info.device_type == wgpu::DeviceType::Cpu,
    };
    if host {
        Box::new(HostSolver)
    } else {
        Box::new(JacobiSolver::default())
    }
}
