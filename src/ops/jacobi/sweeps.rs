//! The sweeps of the three Jacobi paths and their kernels' parameters: the work
//! buffers' set-up, the per-path sweep loops, the convergence readback and the sort.

use super::blocked::BlockPlan;
use super::{JacobiOptions, NORM_CHUNK, Problem, SHARED_MAX_N, WORKGROUP_SIZE};
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
    /// `block_solve`: round `round` of a blocked sweep over `blocks` blocks (even, ≥ 2)
    /// of `block` indices of `batch` matrices `[n, n]` held padded to `[m, m]`
    /// (`m = blocks · block`).
    pub struct BlockParams {
        n: u32,
        m: u32,
        batch: u32,
        round: u32,
        blocks: u32,
        block: u32,
        window: u32,
    }
}

kernel_params! {
    /// `block_gather`: `dst[b, i, j] = src[b, source(i), source(j)]` (or column `j`)
    /// from `[batch, rows_in, cols_in]` to `[batch, rows_out, cols_out]`, `source` the
    /// row `map` of the index map table (`u32::MAX`: in place).
    pub struct GatherParams {
        rows_in: u32,
        cols_in: u32,
        rows_out: u32,
        cols_out: u32,
        map: u32,
        map_len: u32,
        permute_cols: u32,
        symmetrize: u32,
        window: u32,
        /// Indices per block: blocks move whole, one look-up per row segment.
        run: u32,
        /// Nonzero (with `symmetrize`): only the block upper triangle of the source, by
        /// panels of `panel` indices, is current.
        panel: u32,
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
pub(super) struct Work {
    pub(super) a: GpuTensor,
    pub(super) w: GpuTensor,
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

    /// `entry` of the shader, its window accessors specialised to one binding
    /// (`WINDOWED` false) when every tensor of the call fits one window: the blocked
    /// path's padded `[batch, m, m]` (`m ≥ n`) is the largest.
    pub(super) fn kernel(&self, entry: &'static str) -> Kernel {
        let kernel = Kernel::new(&crate::ops::JACOBI, entry);
        let m = BlockPlan::new(self.n).m;
        if self.batch * m * m > self.window {
            kernel
        } else {
            kernel.with("WINDOWED", 0.0)
        }
    }

    /// The binding windows of a `[batch, n, n]` tensor of this problem.
    pub(super) fn windows(&self, ctx: &GpuContext, t: &GpuTensor) -> Result<[GpuTensor; 3]> {
        windows(ctx, t, self.window)
    }

    /// Records `global_init_a` and `global_init_w`: the work buffers from the input and
    /// the starting basis.
    pub(super) fn record_init(&self, ctx: &GpuContext, rec: &mut Recorder) -> Result<Work> {
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
                &self.kernel(entry),
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
    pub(super) fn record_finish(
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
            &self.kernel("global_rank"),
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
                &self.kernel("global_combine"),
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
            &self.kernel("global_gather"),
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

pub(super) type Decomposition = (GpuTensor, GpuTensor, usize, f32);

/// Sweeps the workgroup path records before it first reads back whether the batch is
/// done: the factors of the benchmarks and fixtures take 4–8.
const WORKGROUP_FIRST_SWEEPS: usize = 8;

/// One workgroup per matrix and one dispatch per sweep: the set-up and the first
/// [`WORKGROUP_FIRST_SWEEPS`] sweeps plus a last test in one pass, then one readback of
/// the per-matrix sweep counts, off-diagonal norms and done flags; while a matrix is not
/// done, twice as many dispatches again (up to `max_sweeps + 1` in all; a dispatch for
/// a matrix that is done returns at once); then the sort in one more pass.
pub(super) fn workgroup_path<'c>(
    ctx: &'c GpuContext,
    mut rec: Recorder<'c>,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let work = problem.record_init(ctx, &mut rec)?;
    let info_tensor = ctx.zeros(&[batch, 4])?;
    let max_sweeps = opts.max_sweeps.min(u32::MAX as usize - 1);
    let entry = if n <= SHARED_MAX_N {
        "jacobi_sweep_shared"
    } else {
        "jacobi_sweep_storage"
    };
    // Each dispatch first tests convergence and sweeps only a matrix that is not done,
    // so max_sweeps + 1 dispatches end with a test after the last possible sweep.
    let mut dispatched = 0;
    let mut chunk = (WORKGROUP_FIRST_SWEEPS + 1).min(max_sweeps + 1);
    let info = loop {
        for _ in 0..chunk {
            rec.dispatch(
                &Kernel::new(&crate::ops::JACOBI, entry),
                &[],
                &[&work.a, &work.w, &info_tensor],
                &SweepParams {
                    n: n as u32,
                    batch: batch as u32,
                    max_sweeps: max_sweeps as u32,
                    tol: opts.tol,
                },
                grid_1d(batch as u32),
            )?;
        }
        dispatched += chunk;
        rec.submit()?;
        let info = ctx.read(&info_tensor)?;
        rec = ctx.recorder();
        if dispatched > max_sweeps || info.chunks(4).all(|s| s[2] != 0.0) {
            break info;
        }
        chunk = (2 * chunk).min(max_sweeps + 1 - dispatched);
    };
    let (values, vectors) = problem.record_finish(ctx, &mut rec, &work, opts.reorthogonalize)?;
    rec.submit()?;
    let sweeps = info.chunks(4).map(|s| s[0] as usize).max().unwrap_or(0);
    let off: Vec<f64> = info.chunks(4).map(|s| f64::from(s[1])).collect();
    let bad: Vec<bool> = info.chunks(4).map(|s| s[3] != 0.0).collect();
    let off = worst_off_diagonal(&off, &bad)?;
    Ok((values, vectors, sweeps, off))
}

/// Two dispatches per step over the whole batch, one pass and one readback per sweep.
pub(super) fn global_path(
    ctx: &GpuContext,
    mut rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let h = (n + (n & 1)) / 2;
    let mut sweeper = GlobalSweeper {
        problem,
        work: problem.record_init(ctx, &mut rec)?,
        rotations: ctx.zeros(&[batch, h, 4])?,
    };
    let (sweeps, off_diagonal) = sweep_until_done(ctx, rec, problem, opts, &mut sweeper)?;
    let mut rec = ctx.recorder();
    let (values, vectors) =
        problem.record_finish(ctx, &mut rec, &sweeper.work, opts.reorthogonalize)?;
    rec.submit()?;
    Ok((values, vectors, sweeps, off_diagonal))
}

/// The global path's work buffers and rotation parameters `[batch, h, 4]`.
struct GlobalSweeper<'a> {
    problem: &'a Problem<'a>,
    work: Work,
    rotations: GpuTensor,
}

impl Sweeper for GlobalSweeper<'_> {
    fn matrix(&self) -> (&GpuTensor, usize) {
        (&self.work.a, self.problem.n)
    }

    fn record_sweep(&mut self, rec: &mut Recorder, _norms: &[f64]) -> Result<()> {
        let Problem { batch, n, .. } = *self.problem;
        let m = n + (n & 1);
        let h = m / 2;
        let kernel = |entry| Kernel::new(&crate::ops::JACOBI, entry);
        for step in 0..m - 1 {
            rec.dispatch(
                &kernel("global_rotations"),
                &[&self.work.a],
                &[&self.rotations],
                &self.problem.params(step),
                groups(batch * h),
            )?;
            rec.dispatch(
                &kernel("global_apply"),
                &[&self.rotations],
                &[&self.work.a, &self.work.w],
                &self.problem.params(step),
                groups(batch * (h * h + h * n)),
            )?;
        }
        Ok(())
    }
}

/// The state of a host-driven sweep loop ([`sweep_until_done`]).
pub(super) trait Sweeper {
    /// The matrices being diagonalised now, `[batch, dim, dim]`, and `dim`.
    fn matrix(&self) -> (&GpuTensor, usize);

    /// Records one sweep; `norms` holds each matrix's `‖A‖_F`.
    fn record_sweep(&mut self, rec: &mut Recorder, norms: &[f64]) -> Result<()>;
}

/// The host-driven sweep loop of the global and blocked paths: after what `rec` holds
/// (the work buffers' set-up), records per sweep `record_sweep` and `global_norms` into
/// one pass, reads the off-diagonal norms back (per-workgroup partial sums added by the
/// host in a fixed order) and stops once every matrix meets [`stop`]. Returns the
/// sweeps run and the largest final relative off-diagonal norm.
pub(super) fn sweep_until_done(
    ctx: &GpuContext,
    mut rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
    sweeper: &mut impl Sweeper,
) -> Result<(usize, f32)> {
    let batch = problem.batch;
    let dim = sweeper.matrix().1;
    let chunks = (dim * dim).div_ceil(NORM_CHUNK);
    let partials = ctx.zeros(&[batch, chunks, 3])?;
    let record_norms = |rec: &mut Recorder, matrix: &GpuTensor| -> Result<()> {
        let [a0, a1, a2] = problem.windows(ctx, matrix)?;
        rec.dispatch(
            &problem.kernel("global_norms"),
            &[&a0, &a1, &a2],
            &[&partials],
            &GlobalParams {
                n: dim as u32,
                ..problem.params(0)
            },
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
    record_norms(&mut rec, sweeper.matrix().0)?;
    rec.submit()?;
    let (mut off, norms) = read_off_diagonal()?;
    let mut done: Vec<bool> = off.iter().map(|&x| stop(x, 0, opts)).collect();
    let mut sweeps = 0;
    while done.iter().any(|d| !d) {
        let mut rec = ctx.recorder();
        sweeper.record_sweep(&mut rec, &norms)?;
        record_norms(&mut rec, sweeper.matrix().0)?;
        rec.submit()?;
        off = read_off_diagonal()?.0;
        sweeps += 1;
        if let Some(observe) = opts.on_sweep {
            (observe.0)(Sweeps {
                dim: problem.n,
                sweeps,
                off_diagonal: off.iter().copied().fold(0.0, f64::max),
            });
        }
        for (d, &x) in done.iter_mut().zip(&off) {
            *d = *d || stop(x, sweeps, opts);
        }
    }
    Ok((sweeps, off.iter().copied().fold(0.0, f64::max) as f32))
}
