//! One input's run through the passes of [`super::eigh_many`]: the workgroup path's
//! chunks of sweeps and the host-driven sweep loop of the global and blocked paths, each
//! as a state machine the driver steps — record the set-up, absorb a readback, record
//! the next sweep (or chunk), record the finish — so that the runs of several inputs
//! share every pass and every readback.

use super::sweeps::{GlobalParams, SweepParams, Work, stop, worst_off_diagonal};
use super::{JacobiOptions, NORM_CHUNK, Problem, SHARED_MAX_N, WORKGROUP_SIZE};
use crate::error::Result;
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::progress::Sweeps;

/// One input's decomposition in progress.
pub(super) trait Run {
    /// The tensor the host reads back after each pass (with every other run's, in one
    /// readback).
    fn probe(&self) -> &GpuTensor;

    /// Takes in the probe's contents read back after a pass; returns whether the input
    /// is done (then nothing more is recorded for it but the finish). An error names the
    /// first matrix that holds NaN or Inf.
    fn absorb(&mut self, probe: &[f32], opts: &JacobiOptions) -> Result<bool>;

    /// The sweeps of the last [`Run::absorb`] that followed a sweep of a host-driven
    /// loop (for [`JacobiOptions::on_sweep`]); `None` for the workgroup path.
    fn swept(&self) -> Option<Sweeps>;

    /// Records the next sweep (or chunk of sweeps) and what the next probe reads.
    fn record_next(&mut self, rec: &mut Recorder) -> Result<()>;

    /// Records the finish (unpadding, sort, re-orthogonalisation, gather); returns the
    /// eigenvalues `[batch, n]` and eigenvectors `[batch, n, n]`.
    fn record_finish(
        &self,
        rec: &mut Recorder,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)>;

    /// The sweeps run (the largest over the batch) and the largest final relative
    /// off-diagonal norm, once done.
    fn outcome(&self) -> (usize, f32);
}

/// Workgroups for one invocation per item.
pub(super) fn groups(items: usize) -> [u32; 3] {
    grid_1d(items.div_ceil(WORKGROUP_SIZE) as u32)
}

/// Sweeps the workgroup path records before it first reads back whether the batch is
/// done: the factors of the benchmarks and fixtures take 4–8.
const WORKGROUP_FIRST_SWEEPS: usize = 8;

/// The workgroup path: one workgroup per matrix and one dispatch per sweep. The set-up
/// and the first [`WORKGROUP_FIRST_SWEEPS`] sweeps plus a last test go into the first
/// pass, then the probe is the per-matrix sweep counts, off-diagonal norms, done and
/// NaN flags `[batch, 4]`; while a matrix is not done, twice as many dispatches again
/// (up to `max_sweeps + 1` in all; a dispatch for a matrix that is done returns at
/// once).
pub(super) struct WorkgroupRun {
    problem: Problem,
    work: Work,
    info: GpuTensor,
    entry: &'static str,
    params: SweepParams,
    max_sweeps: usize,
    /// Sweep dispatches recorded so far and in the last chunk.
    dispatched: usize,
    chunk: usize,
    /// Sweeps (the largest over the batch) and the largest final relative
    /// off-diagonal norm, once done.
    outcome: (usize, f32),
}

impl WorkgroupRun {
    /// Records the set-up and the first chunk of sweeps into `rec`.
    pub(super) fn start(
        ctx: &GpuContext,
        rec: &mut Recorder,
        problem: Problem,
        opts: &JacobiOptions,
    ) -> Result<Self> {
        let Problem { batch, n, .. } = problem;
        let work = problem.record_init(ctx, rec)?;
        let max_sweeps = opts.max_sweeps.min(u32::MAX as usize - 1);
        let mut run = Self {
            entry: if n <= SHARED_MAX_N {
                "jacobi_sweep_shared"
            } else {
                "jacobi_sweep_storage"
            },
            params: SweepParams {
                n: n as u32,
                batch: batch as u32,
                max_sweeps: max_sweeps as u32,
                tol: opts.tol,
            },
            info: ctx.zeros(&[batch, 4])?,
            problem,
            work,
            max_sweeps,
            dispatched: 0,
            // Each dispatch first tests convergence and sweeps only a matrix that is
            // not done, so max_sweeps + 1 dispatches end with a test after the last
            // possible sweep.
            chunk: (WORKGROUP_FIRST_SWEEPS + 1).min(max_sweeps + 1),
            outcome: (0, 0.0),
        };
        run.record_next(rec)?;
        Ok(run)
    }
}

impl Run for WorkgroupRun {
    fn probe(&self) -> &GpuTensor {
        &self.info
    }

    fn absorb(&mut self, info: &[f32], _opts: &JacobiOptions) -> Result<bool> {
        if self.dispatched <= self.max_sweeps && !info.chunks(4).all(|s| s[2] != 0.0) {
            self.chunk = (2 * self.chunk).min(self.max_sweeps + 1 - self.dispatched);
            return Ok(false);
        }
        let sweeps = info.chunks(4).map(|s| s[0] as usize).max().unwrap_or(0);
        let off: Vec<f64> = info.chunks(4).map(|s| f64::from(s[1])).collect();
        let bad: Vec<bool> = info.chunks(4).map(|s| s[3] != 0.0).collect();
        self.outcome = (sweeps, worst_off_diagonal(&off, &bad)?);
        Ok(true)
    }

    fn swept(&self) -> Option<Sweeps> {
        None
    }

    fn record_next(&mut self, rec: &mut Recorder) -> Result<()> {
        for _ in 0..self.chunk {
            rec.dispatch(
                &Kernel::new(&crate::ops::JACOBI, self.entry),
                &[],
                &[&self.work.a, &self.work.w, &self.info],
                &self.params,
                grid_1d(self.problem.batch as u32),
            )?;
        }
        self.dispatched += self.chunk;
        Ok(())
    }

    fn record_finish(
        &self,
        rec: &mut Recorder,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)> {
        self.problem
            .record_finish(rec.context(), rec, &self.work, reorthogonalize)
    }

    fn outcome(&self) -> (usize, f32) {
        self.outcome
    }
}

/// The state of a host-driven sweep loop ([`HostLoop`]) of one path.
pub(super) trait Sweeper {
    /// The problem being solved.
    fn problem(&self) -> &Problem;

    /// The matrices being diagonalised now, `[batch, dim, dim]`, and `dim`.
    fn matrix(&self) -> (&GpuTensor, usize);

    /// Records one sweep; `norms` holds each matrix's `‖A‖_F`, `done` which matrices
    /// already meet the stopping rule (a sweeper may leave those alone, so that a
    /// matrix's results do not depend on the others of its batch).
    fn record_sweep(&mut self, rec: &mut Recorder, norms: &[f64], done: &[bool]) -> Result<()>;

    /// Records the finish after `sweeps` sweeps (see [`Run::record_finish`]).
    fn record_finish(
        &self,
        rec: &mut Recorder,
        sweeps: usize,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)>;
}

/// The host-driven sweep loop of the global and blocked paths: after the work buffers'
/// set-up, `global_norms` into the first pass; then per iteration `record_sweep` and
/// `global_norms` into one pass, the off-diagonal norms read back (per-workgroup
/// partial sums `[batch, chunks, 3]` added by the host in a fixed order), until every
/// matrix meets [`stop`].
pub(super) struct HostLoop<S> {
    sweeper: S,
    partials: GpuTensor,
    chunks: usize,
    /// `‖A‖_F` per matrix from the first readback (empty before it).
    norms: Vec<f64>,
    /// The last relative off-diagonal norms per matrix, and which matrices are done.
    off: Vec<f64>,
    done: Vec<bool>,
    sweeps: usize,
}

impl<S: Sweeper> HostLoop<S> {
    /// Records the first norms after the set-up that `rec` holds.
    pub(super) fn start(ctx: &GpuContext, rec: &mut Recorder, sweeper: S) -> Result<Self> {
        let dim = sweeper.matrix().1;
        let chunks = (dim * dim).div_ceil(NORM_CHUNK);
        let run = Self {
            partials: ctx.zeros(&[sweeper.problem().batch, chunks, 3])?,
            sweeper,
            chunks,
            norms: Vec::new(),
            off: Vec::new(),
            done: Vec::new(),
            sweeps: 0,
        };
        run.record_norms(rec)?;
        Ok(run)
    }

    fn record_norms(&self, rec: &mut Recorder) -> Result<()> {
        let problem = self.sweeper.problem();
        let (matrix, dim) = self.sweeper.matrix();
        let [a0, a1, a2] = problem.windows(rec.context(), matrix)?;
        rec.dispatch(
            &problem.kernel("global_norms"),
            &[&a0, &a1, &a2],
            &[&self.partials],
            &GlobalParams {
                n: dim as u32,
                ..problem.params(0)
            },
            grid_1d((problem.batch * self.chunks) as u32),
        )
    }
}

impl<S: Sweeper> Run for HostLoop<S> {
    fn probe(&self) -> &GpuTensor {
        &self.partials
    }

    fn absorb(&mut self, sums: &[f32], opts: &JacobiOptions) -> Result<bool> {
        // ‖offdiag(A)‖_F / ‖A‖_F and ‖A‖_F per matrix, from the partial sums in a fixed
        // order; an error for NaN or Inf.
        let batch = self.sweeper.problem().batch;
        let mut off = Vec::with_capacity(batch);
        let mut bad = Vec::with_capacity(batch);
        let mut norms = Vec::with_capacity(batch);
        for matrix in sums.chunks(3 * self.chunks) {
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
        if self.norms.is_empty() {
            self.norms = norms;
            self.done = off.iter().map(|&x| stop(x, 0, opts)).collect();
        } else {
            self.sweeps += 1;
            for (d, &x) in self.done.iter_mut().zip(&off) {
                *d = *d || stop(x, self.sweeps, opts);
            }
        }
        self.off = off;
        Ok(self.done.iter().all(|&d| d))
    }

    fn swept(&self) -> Option<Sweeps> {
        (self.sweeps > 0).then(|| Sweeps {
            dim: self.sweeper.problem().n,
            sweeps: self.sweeps,
            off_diagonal: self.off.iter().copied().fold(0.0, f64::max),
        })
    }

    fn record_next(&mut self, rec: &mut Recorder) -> Result<()> {
        self.sweeper.record_sweep(rec, &self.norms, &self.done)?;
        self.record_norms(rec)
    }

    fn record_finish(
        &self,
        rec: &mut Recorder,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)> {
        self.sweeper
            .record_finish(rec, self.sweeps, reorthogonalize)
    }

    fn outcome(&self) -> (usize, f32) {
        let off = self.off.iter().copied().fold(0.0, f64::max);
        (self.sweeps, off as f32)
    }
}

/// The global path: two dispatches per step over the whole batch, all steps of a
/// sweep in one pass; its work buffers and rotation parameters `[batch, h, 4]`.
pub(super) struct GlobalSweeper {
    problem: Problem,
    work: Work,
    rotations: GpuTensor,
}

impl GlobalSweeper {
    /// Records the set-up and the first norms.
    pub(super) fn start(
        ctx: &GpuContext,
        rec: &mut Recorder,
        problem: Problem,
    ) -> Result<HostLoop<Self>> {
        let h = problem.n.div_ceil(2);
        let sweeper = Self {
            work: problem.record_init(ctx, rec)?,
            rotations: ctx.zeros(&[problem.batch, h, 4])?,
            problem,
        };
        HostLoop::start(ctx, rec, sweeper)
    }
}

impl Sweeper for GlobalSweeper {
    fn problem(&self) -> &Problem {
        &self.problem
    }

    fn matrix(&self) -> (&GpuTensor, usize) {
        (&self.work.a, self.problem.n)
    }

    /// Sweeps every matrix of the batch, done or not (only the blocked path leaves the
    /// done ones alone; the global path runs only when asked for).
    fn record_sweep(&mut self, rec: &mut Recorder, _norms: &[f64], _done: &[bool]) -> Result<()> {
        let Problem { batch, n, .. } = self.problem;
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

    fn record_finish(
        &self,
        rec: &mut Recorder,
        _sweeps: usize,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)> {
        self.problem
            .record_finish(rec.context(), rec, &self.work, reorthogonalize)
    }
}
