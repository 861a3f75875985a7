//! The sweeps of the three Jacobi paths and their kernels' parameters: the work
//! buffers' set-up, the per-path sweep loops, the convergence readback and the sort.

use super::{BLOCK, JacobiOptions, NORM_CHUNK, Problem, SHARED_MAX_N, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;
use crate::ops::gemm::{Gemm, gemm};
use crate::progress::Sweeps;

kernel_params! {
    /// `jacobi_sweep_shared` and `jacobi_sweep_storage`: one sweep of each of `batch`
    /// matrices `[n, n]` not yet done (`max_sweeps`, `tol`: the stopping rule).
    pub struct SweepParams {
        n: u32,
        batch: u32,
        max_sweeps: u32,
        tol: f32,
    }
}

kernel_params! {
    /// The `global_*` kernels on `batch` matrices `[n, n]` bound as windows of
    /// `window` elements.
    pub struct GlobalParams {
        n: u32,
        batch: u32,
        /// The step of the sweep (`global_rotations`, `global_apply`); 0 elsewhere.
        step: u32,
        /// 1 when `v0` holds a warm start (`global_init_w`), else 0.
        has_v0: u32,
        /// Elements between the warm start's matrices (0: one shared basis).
        v0_stride: u32,
        window: u32,
    }
}

kernel_params! {
    /// `global_combine`: `W[g] = a·W[g] + b·P[g]` for `g < len`.
    pub struct CombineParams {
        len: u32,
        a: f32,
        b: f32,
        window: u32,
    }
}

kernel_params! {
    /// `block_solve` and `block_apply`: round `round` of a blocked sweep over `blocks`
    /// blocks (even, ≥ 2) of `batch` matrices `[n, n]`.
    pub struct BlockParams {
        n: u32,
        batch: u32,
        round: u32,
        blocks: u32,
        window: u32,
    }
}

/// The three binding windows of a `[batch, n, n]` tensor (see the shader's header):
/// consecutive ranges of `window` elements, or the whole tensor three times when it
/// fits one.
fn windows(ctx: &GpuContext, t: &GpuTensor, window: usize) -> Result<[GpuTensor; 3]> {
    let len = t.len();
    if len <= window {
        return Ok([t.view(t.shape())?, t.view(t.shape())?, t.view(t.shape())?]);
    }
    let align = 4 * ctx.binding_elements().1 as u64;
    let part = |k: usize| -> Result<GpuTensor> {
        let start = (k * window).min(len - 1) / window * window;
        t.window(start, window.min(len - start), align)
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// Records `A' = V₀ᵀ A V₀` for the warm start and returns `A'` `[batch, n, n]`.
pub(super) fn rotate_into_basis(
    ctx: &GpuContext,
    rec: &mut Recorder,
    a: &GpuTensor,
    v0: &GpuTensor,
    v0_stride: usize,
    batch: usize,
    n: usize,
) -> Result<GpuTensor> {
    let av = ctx.zeros(&[batch, n, n])?;
    let rotated = ctx.zeros(&[batch, n, n])?;
    let mut av_product = Gemm::new(n, n, n, false, false).batched(batch);
    av_product.stride_b = v0_stride;
    gemm(rec, &av_product, a, v0, &av)?;
    let mut rotation = Gemm::new(n, n, n, true, false).batched(batch);
    rotation.stride_a = v0_stride;
    gemm(rec, &rotation, v0, &av, &rotated)?;
    Ok(rotated)
}

/// The largest final relative off-diagonal norm of the batch, or an error naming the
/// first matrix that held NaN or Inf (`bad`) or whose norm is not finite.
fn worst_off_diagonal(off: &[f64], bad: &[bool]) -> Result<f32> {
    let mut worst = 0.0f64;
    for (b, (&x, &bad)) in off.iter().zip(bad).enumerate() {
        if bad || !x.is_finite() {
            return Err(Error::gpu(
                "the Jacobi eigendecomposition",
                format!("matrix {b} of the batch has NaN or Inf entries (or entries above 1e19)"),
            ));
        }
        worst = worst.max(x);
    }
    Ok(worst as f32)
}

/// The stopping rule of one matrix (the shader's `stop` is the same).
fn stop(off: f64, sweeps: usize, opts: &JacobiOptions) -> bool {
    sweeps >= opts.max_sweeps || off <= f64::from(opts.tol)
}

/// Work buffers of one call: the matrix being diagonalised and the eigenbasis `W = Vᵀ`
/// (rows are vectors), both `[batch, n, n]`.
struct Work {
    a: GpuTensor,
    w: GpuTensor,
}

impl Problem<'_> {
    /// Parameters of the global kernels at step `step`.
    fn params(&self, step: usize) -> GlobalParams {
        let (has_v0, v0_stride) = match self.start {
            Some((_, stride)) => (1, stride as u32),
            None => (0, 0),
        };
        GlobalParams {
            n: self.n as u32,
            batch: self.batch as u32,
            step: step as u32,
            has_v0,
            v0_stride,
            window: self.window as u32,
        }
    }

    /// The binding windows of a `[batch, n, n]` tensor of this problem.
    fn windows(&self, ctx: &GpuContext, t: &GpuTensor) -> Result<[GpuTensor; 3]> {
        windows(ctx, t, self.window)
    }

    /// Records `global_init_a` and `global_init_w`: the work buffers from the input and
    /// the starting basis.
    fn record_init(&self, ctx: &GpuContext, rec: &mut Recorder) -> Result<Work> {
        let shape = [self.batch, self.n, self.n];
        let work = Work {
            a: ctx.zeros(&shape)?,
            w: ctx.zeros(&shape)?,
        };
        let items = groups(self.batch * self.n * self.n);
        for (entry, from, to) in [
            ("global_init_a", self.input, &work.a),
            ("global_init_w", self.v0(), &work.w),
        ] {
            let [f0, f1, f2] = self.windows(ctx, from)?;
            let [t0, t1, t2] = self.windows(ctx, to)?;
            rec.dispatch(
                &Kernel::new(&crate::ops::JACOBI, entry),
                &[&f0, &f1, &f2],
                &[&t0, &t1, &t2],
                &self.params(0),
                items,
            )?;
        }
        Ok(work)
    }

    /// Records the ascending sort of the diagonal of `work.a`, the optional
    /// re-orthogonalisation of `work.w` (which reuses `work.a`) and the gather of the
    /// rows of the basis into columns; returns `(values, vectors)`.
    fn record_finish(
        &self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        work: &Work,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)> {
        let (batch, n) = (self.batch, self.n);
        let values = ctx.zeros(&[batch, n])?;
        let vectors = ctx.zeros(&[batch, n, n])?;
        let ranks = ctx.zeros(&[batch, n])?;
        let [a0, a1, a2] = self.windows(ctx, &work.a)?;
        rec.dispatch(
            &Kernel::new(&crate::ops::JACOBI, "global_rank"),
            &[&a0, &a1, &a2],
            &[&values, &ranks],
            &self.params(0),
            groups(batch * n),
        )?;
        let [w0, w1, w2] = self.windows(ctx, &work.w)?;
        // One Newton–Schulz step towards the nearest orthogonal basis,
        // W ← 1.5 W − 0.5 P with P = (W Wᵀ) W, W Wᵀ in the no longer needed work.a.
        if reorthogonalize && n > 1 {
            let product = ctx.zeros(&[batch, n, n])?;
            let gram = Gemm::new(n, n, n, false, true).batched(batch);
            gemm(rec, &gram, &work.w, &work.w, &work.a)?;
            let step = Gemm::new(n, n, n, false, false).batched(batch);
            gemm(rec, &step, &work.a, &work.w, &product)?;
            let [p0, p1, p2] = self.windows(ctx, &product)?;
            rec.dispatch(
                &Kernel::new(&crate::ops::JACOBI, "global_combine"),
                &[&p0, &p1, &p2],
                &[&w0, &w1, &w2],
                &CombineParams {
                    len: (batch * n * n) as u32,
                    a: 1.5,
                    b: -0.5,
                    window: self.window as u32,
                },
                groups(batch * n * n),
            )?;
        }
        let [v0, v1, v2] = self.windows(ctx, &vectors)?;
        rec.dispatch(
            &Kernel::new(&crate::ops::JACOBI, "global_gather"),
            &[&w0, &w1, &w2, &ranks],
            &[&v0, &v1, &v2],
            &self.params(0),
            groups(batch * n * n),
        )?;
        Ok((values, vectors))
    }
}

/// Workgroups for one invocation per item.
fn groups(items: usize) -> [u32; 3] {
    grid_1d(items.div_ceil(WORKGROUP_SIZE) as u32)
}

type Decomposition = (GpuTensor, GpuTensor, usize, f32);

/// One workgroup per matrix and one dispatch per sweep, all in one pass with the sort;
/// one readback of the per-matrix sweep counts and final off-diagonal norms.
pub(super) fn workgroup_path(
    ctx: &GpuContext,
    mut rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let work = problem.record_init(ctx, &mut rec)?;
    let info = ctx.zeros(&[batch, 4])?;
    let max_sweeps = opts.max_sweeps.min(u32::MAX as usize - 1);
    let entry = if n <= SHARED_MAX_N {
        "jacobi_sweep_shared"
    } else {
        "jacobi_sweep_storage"
    };
    // The last dispatch only tests convergence after the final sweep.
    for _ in 0..=max_sweeps {
        rec.dispatch(
            &Kernel::new(&crate::ops::JACOBI, entry),
            &[],
            &[&work.a, &work.w, &info],
            &SweepParams {
                n: n as u32,
                batch: batch as u32,
                max_sweeps: max_sweeps as u32,
                tol: opts.tol,
            },
            grid_1d(batch as u32),
        )?;
    }
    let (values, vectors) = problem.record_finish(ctx, &mut rec, &work, opts.reorthogonalize)?;
    rec.submit()?;
    let info = ctx.read(&info)?;
    let sweeps = info.chunks(4).map(|s| s[0] as usize).max().unwrap_or(0);
    let off: Vec<f64> = info.chunks(4).map(|s| f64::from(s[1])).collect();
    let bad: Vec<bool> = info.chunks(4).map(|s| s[3] != 0.0).collect();
    let off = worst_off_diagonal(&off, &bad)?;
    Ok((values, vectors, sweeps, off))
}

/// Two dispatches per step over the whole batch, one pass and one readback per sweep.
pub(super) fn global_path(
    ctx: &GpuContext,
    rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let m = n + (n & 1);
    let h = m / 2;
    let rotations = ctx.zeros(&[batch, h, 4])?;
    let kernel = |entry| Kernel::new(&crate::ops::JACOBI, entry);
    sweep_until_done(ctx, rec, problem, opts, |rec, work, _| {
        for step in 0..m - 1 {
            rec.dispatch(
                &kernel("global_rotations"),
                &[&work.a],
                &[&rotations],
                &problem.params(step),
                groups(batch * h),
            )?;
            rec.dispatch(
                &kernel("global_apply"),
                &[&rotations],
                &[&work.a, &work.w],
                &problem.params(step),
                groups(batch * (h * h + h * n)),
            )?;
        }
        Ok(())
    })
}

/// Block pairs of `2 · BLOCK` indices, two dispatches per round (`blocks − 1` rounds
/// per sweep), one pass and one readback per sweep.
pub(super) fn blocked_path(
    ctx: &GpuContext,
    rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let pair = 2 * BLOCK;
    let blocks = n.div_ceil(pair) * 2;
    let h = blocks / 2;
    let tiles = h * h + h * n.div_ceil(pair);
    let rotations = ctx.zeros(&[batch, h, pair, pair])?;
    let kernel = |entry| Kernel::new(&crate::ops::JACOBI, entry);
    sweep_until_done(ctx, rec, problem, opts, |rec, work, norms| {
        let [a0, a1, a2] = problem.windows(ctx, &work.a)?;
        let [w0, w1, w2] = problem.windows(ctx, &work.w)?;
        // A block pair is solved once its off-diagonal norm is below
        // tol · ‖A‖_F / blocks: when all pairs of a sweep are, A has converged.
        let thresholds: Vec<f32> = norms
            .iter()
            .map(|&norm| (f64::from(opts.tol) * norm / blocks as f64) as f32)
            .collect();
        let thresholds = ctx.upload(&thresholds, &[batch])?;
        for round in 0..blocks - 1 {
            let params = BlockParams {
                n: n as u32,
                batch: batch as u32,
                round: round as u32,
                blocks: blocks as u32,
                window: problem.window as u32,
            };
            rec.dispatch(
                &kernel("block_solve"),
                &[&thresholds],
                &[&a0, &a1, &a2, &rotations],
                &params,
                grid_1d((batch * h) as u32),
            )?;
            rec.dispatch(
                &kernel("block_apply"),
                &[&rotations],
                &[&a0, &a1, &a2, &w0, &w1, &w2],
                &params,
                grid_1d((batch * tiles) as u32),
            )?;
        }
        Ok(())
    })
}

/// The host-driven sweep loop of the global and blocked paths: records
/// `global_init`, then per sweep `record_sweep` and `global_norms` into one pass,
/// reads the off-diagonal norms back (per-workgroup partial sums added by the host in
/// a fixed order; `record_sweep` also gets each matrix's `‖A‖_F`) and stops once every matrix meets [`stop`]; then sorts.
fn sweep_until_done(
    ctx: &GpuContext,
    mut rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
    record_sweep: impl Fn(&mut Recorder, &Work, &[f64]) -> Result<()>,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let chunks = (n * n).div_ceil(NORM_CHUNK);
    let work = problem.record_init(ctx, &mut rec)?;
    let partials = ctx.zeros(&[batch, chunks, 3])?;
    let [a0, a1, a2] = problem.windows(ctx, &work.a)?;
    let record_norms = |rec: &mut Recorder| {
        rec.dispatch(
            &Kernel::new(&crate::ops::JACOBI, "global_norms"),
            &[&a0, &a1, &a2],
            &[&partials],
            &problem.params(0),
            grid_1d((batch * chunks) as u32),
        )
    };
    // ‖offdiag(A)‖_F / ‖A‖_F and ‖A‖_F per matrix, from the partial sums in a fixed
    // order; an error for NaN or Inf.
    let read_off_diagonal = || -> Result<(Vec<f64>, Vec<f64>)> {
        let sums = ctx.read(&partials)?;
        let mut off = Vec::with_capacity(batch);
        let mut bad = Vec::with_capacity(batch);
        let mut norms = Vec::with_capacity(batch);
        for matrix in sums.chunks(3 * chunks) {
            let (mut off_sq, mut total_sq) = (0.0f64, 0.0f64);
            for part in matrix.chunks(3) {
                off_sq += f64::from(part[0]);
                total_sq += f64::from(part[1]);
            }
            off.push((off_sq / total_sq.max(f64::MIN_POSITIVE)).sqrt());
            norms.push(total_sq.sqrt());
            bad.push(matrix.chunks(3).any(|part| part[2] != 0.0));
        }
        worst_off_diagonal(&off, &bad)?;
        Ok((off, norms))
    };
    record_norms(&mut rec)?;
    rec.submit()?;
    let (mut off, norms) = read_off_diagonal()?;
    let mut done: Vec<bool> = off.iter().map(|&x| stop(x, 0, opts)).collect();
    let mut sweeps = 0;
    while done.iter().any(|d| !d) {
        let mut rec = ctx.recorder();
        record_sweep(&mut rec, &work, &norms)?;
        record_norms(&mut rec)?;
        rec.submit()?;
        off = read_off_diagonal()?.0;
        sweeps += 1;
        if let Some(observe) = opts.on_sweep {
            (observe.0)(Sweeps {
                dim: n,
                sweeps,
                off_diagonal: off.iter().copied().fold(0.0, f64::max),
            });
        }
        for (d, &x) in done.iter_mut().zip(&off) {
            *d = *d || stop(x, sweeps, opts);
        }
    }
    let off_diagonal = off.iter().copied().fold(0.0, f64::max) as f32;
    let mut rec = ctx.recorder();
    let (values, vectors) = problem.record_finish(ctx, &mut rec, &work, opts.reorthogonalize)?;
    rec.submit()?;
    Ok((values, vectors, sweeps, off_diagonal))
}
