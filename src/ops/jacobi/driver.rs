//! [`eigh_many`]: the eigendecompositions of several inputs (batches of possibly
//! different sizes, each with its own optional warm start) recorded into the same
//! passes, with one readback per iteration for all of them.

use super::blocked::blocked_run;
use super::runs::{GlobalSweeper, Run, WorkgroupRun};
use super::sweeps::rotate_into_basis;
use super::{
    AUTO_WORKGROUP_MAX_N, Eigen, JacobiOptions, JacobiPath, Problem, WORKGROUP_MAX_N, check_fits,
    window_elements,
};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::ops::check::square_batch;
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::qr;
use crate::progress::Sweeps;

/// One input of [`eigh_many`].
#[derive(Debug, Clone, Copy)]
pub struct EighInput<'a> {
    /// The symmetric matrices, `[batch, n, n]` or `[n, n]` (as [`super::eigh`]'s).
    pub matrices: &'a GpuTensor,
    /// A previous eigenbasis, `[n, n]` or `[batch, n, n]`
    /// (as [`JacobiOptions::warm_start`]).
    pub warm_start: Option<&'a GpuTensor>,
}

/// [`super::eigh`] of every input, each with its own warm start (`opts.warm_start` is
/// ignored), all recorded into the same passes: the set-up of every input (QR step or
/// warm-start rotation, work buffers, padding, first norms; the workgroup path's first
/// chunk of sweeps) in one pass; then per iteration one pass holding one sweep (and its
/// norms) of every host-driven input not yet done and the next chunk of every
/// workgroup-path input not yet done, and ONE readback of all their norms and flags
/// ([`GpuContext::read_many`]); then the finish (unpadding, sort,
/// re-orthogonalisation, gather) of all inputs in one pass. Each input stops by its
/// own rule and runs the same kernels with the same parameters as alone, so its
/// results are bitwise those of a separate [`super::eigh`]; a call costs about the
/// largest number of iterations of one input plus two passes, instead of their sum. The
/// refinement ([`JacobiOptions::refine_min_n`]) is a second such round over the
/// inputs that need it.
///
/// [`JacobiOptions::on_sweep`] is called after every readback that follows a sweep of
/// a host-driven (global or blocked) input, with the largest `n`, the sweeps and the
/// largest relative off-diagonal norm of those inputs (they start together, so they
/// have all run the same number of sweeps; for one input exactly [`super::eigh`]'s
/// reports).
///
/// Errors as [`super::eigh`]'s; with more than one input the message names the input
/// (`input i: …`), and nothing is recorded unless every input's shapes and options are
/// valid.
pub fn eigh_many(
    ctx: &GpuContext,
    inputs: &[EighInput],
    opts: &JacobiOptions,
) -> Result<Vec<Eigen>> {
    let label: Vec<Option<usize>> = match inputs.len() {
        1 => vec![None],
        k => (0..k).map(Some).collect(),
    };
    let mut eigens = decompose(ctx, inputs, &label, opts)?;
    // Refinement (see `JacobiOptions::refine_min_n`): a warm restart on the original
    // matrices of every cold input from that size on.
    let refine: Vec<usize> = (0..inputs.len())
        .filter(|&i| {
            let input = &inputs[i];
            let n = input.matrices.shape().last().copied().unwrap_or(0);
            input.warm_start.is_none() && n >= opts.refine_min_n && !input.matrices.is_empty()
        })
        .collect();
    if refine.is_empty() {
        return Ok(eigens);
    }
    let restarts: Vec<EighInput> = refine
        .iter()
        .map(|&i| EighInput {
            matrices: inputs[i].matrices,
            warm_start: Some(&eigens[i].vectors),
        })
        .collect();
    let names: Vec<Option<usize>> = refine.iter().map(|&i| label[i]).collect();
    let refined = decompose(ctx, &restarts, &names, opts)?;
    for (i, refined) in refine.into_iter().zip(refined) {
        eigens[i] = Eigen {
            sweeps: eigens[i].sweeps + refined.sweeps,
            ..refined
        };
    }
    Ok(eigens)
}

/// `e` with the input's index in its message (when `label` is set).
fn name_input(label: Option<usize>, e: Error) -> Error {
    let Some(i) = label else { return e };
    match e {
        Error::Gpu { context, message } => Error::Gpu {
            context,
            message: format!("input {i}: {message}"),
        },
        Error::Options(message) => Error::Options(format!("input {i}: {message}")),
        Error::Memory(message) => Error::Memory(format!("input {i}: {message}")),
        e => e,
    }
}

/// What one input's shapes and options say.
struct Plan {
    batch: usize,
    n: usize,
    values_shape: Vec<usize>,
    windowed: bool,
    window: usize,
    /// The warm start's batch stride in elements (0: one shared basis).
    warm_stride: usize,
}

impl Plan {
    fn new(ctx: &GpuContext, input: &EighInput, opts: &JacobiOptions) -> Result<Self> {
        let matrices = input.matrices;
        let (batch, n) = square_batch("eigh", matrices)?;
        let batched = matrices.shape().len() == 3;
        let window = window_elements(ctx);
        let windowed = check_fits(ctx, batch, n, window)?;
        if opts.path == JacobiPath::Workgroup && n > WORKGROUP_MAX_N {
            return Err(Error::Options(format!(
                "the workgroup Jacobi path handles n ≤ {WORKGROUP_MAX_N}, found n = {n}"
            )));
        }
        if windowed && matches!(opts.path, JacobiPath::Workgroup | JacobiPath::Global) {
            return Err(Error::Memory(format!(
                "{batch} matrices of size {n}×{n} exceed one storage binding \
                 (max_storage_buffer_binding_size {} bytes); only the blocked Jacobi path \
                 binds them in windows",
                ctx.limits.max_storage_buffer_binding_size
            )));
        }
        let empty = batch == 0 || n == 0;
        let warm_stride = match input.warm_start.map(GpuTensor::shape) {
            None => 0,
            Some(_) if empty => 0,
            Some([r, c]) if *r == n && *c == n => 0,
            Some([b, r, c]) if *b == batch && *r == n && *c == n => n * n,
            Some(s) => {
                return Err(Error::Options(format!(
                    "the warm start eigenbasis must be [{n}, {n}] or [{batch}, {n}, {n}], \
                     found shape {s:?}"
                )));
            }
        };
        Ok(Self {
            batch,
            n,
            values_shape: if batched { vec![batch, n] } else { vec![n] },
            windowed,
            window,
            warm_stride,
        })
    }

    fn is_empty(&self) -> bool {
        self.batch == 0 || self.n == 0
    }

    /// Records the input's set-up into `rec` (the QR preconditioner or the warm start's
    /// rotation, then the path's) and returns its run.
    fn start(
        &self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        input: &EighInput,
        opts: &JacobiOptions,
    ) -> Result<Box<dyn Run>> {
        let Self { batch, n, .. } = *self;
        // The QR preconditioner (see `JacobiOptions::precondition_min_n`): a cold start
        // from A₁ = R Q (= Qᵀ A Q) of A = QR with the basis at Q, as a warm start.
        let (input_matrix, start) = match input.warm_start {
            None if n >= opts.precondition_min_n
                && !self.windowed
                && qr::fits_one_binding(ctx, batch, n) =>
            {
                let qr::Qr { q, r } = qr::record_qr(rec, input.matrices, batch, n)?;
                let rq = ctx.zeros(&[batch, n, n])?;
                gemm(
                    rec,
                    &Gemm::new(n, n, n, false, false).batched(batch),
                    &r,
                    &q,
                    &rq,
                )?;
                (rq, Some((q, n * n)))
            }
            Some(v0) => {
                let stride = self.warm_stride;
                let rotated = rotate_into_basis(ctx, rec, input.matrices, v0, stride, batch, n)?;
                (rotated, Some((v0.view(v0.shape())?, stride)))
            }
            None => (input.matrices.view(input.matrices.shape())?, None),
        };
        let problem = Problem {
            batch,
            n,
            input: input_matrix,
            start,
            window: self.window,
        };
        Ok(match opts.path {
            JacobiPath::Auto if n <= AUTO_WORKGROUP_MAX_N && !self.windowed => {
                Box::new(WorkgroupRun::start(ctx, rec, problem, opts)?)
            }
            JacobiPath::Workgroup => Box::new(WorkgroupRun::start(ctx, rec, problem, opts)?),
            JacobiPath::Global => Box::new(GlobalSweeper::start(ctx, rec, problem)?),
            JacobiPath::Blocked | JacobiPath::Auto => {
                Box::new(blocked_run(ctx, rec, problem, opts)?)
            }
        })
    }
}

/// One round of [`eigh_many`] (no refinement); `label[i]`: the index that errors of
/// input `i` name, if any.
fn decompose(
    ctx: &GpuContext,
    inputs: &[EighInput],
    label: &[Option<usize>],
    opts: &JacobiOptions,
) -> Result<Vec<Eigen>> {
    let plans = inputs
        .iter()
        .zip(label)
        .map(|(input, &l)| Plan::new(ctx, input, opts).map_err(|e| name_input(l, e)))
        .collect::<Result<Vec<_>>>()?;
    // The set-up of every input in one pass.
    let mut rec = ctx.recorder();
    let mut runs: Vec<Option<Box<dyn Run>>> = Vec::with_capacity(inputs.len());
    for ((plan, input), &l) in plans.iter().zip(inputs).zip(label) {
        runs.push(if plan.is_empty() {
            None
        } else {
            Some(
                plan.start(ctx, &mut rec, input, opts)
                    .map_err(|e| name_input(l, e))?,
            )
        });
    }
    rec.submit()?;
    // Per iteration: one readback of every running input's probe, then one pass with
    // the next sweep (or chunk) of each input not yet done.
    let mut running: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].is_some()).collect();
    while !running.is_empty() {
        let probes: Vec<&GpuTensor> = running
            .iter()
            .filter_map(|&i| runs[i].as_ref().map(|r| r.probe()))
            .collect();
        let read = ctx.read_many(&probes)?;
        let mut rec = ctx.recorder();
        let mut swept: Option<Sweeps> = None;
        let mut still = Vec::with_capacity(running.len());
        for (&i, probe) in running.iter().zip(&read) {
            let Some(run) = runs[i].as_mut() else {
                continue;
            };
            let done = run
                .absorb(probe, opts)
                .map_err(|e| name_input(label[i], e))?;
            if let Some(s) = run.swept() {
                swept = Some(match swept {
                    None => s,
                    Some(t) => Sweeps {
                        dim: t.dim.max(s.dim),
                        sweeps: t.sweeps.max(s.sweeps),
                        off_diagonal: t.off_diagonal.max(s.off_diagonal),
                    },
                });
            }
            if !done {
                run.record_next(&mut rec)
                    .map_err(|e| name_input(label[i], e))?;
                still.push(i);
            }
        }
        if let (Some(observe), Some(s)) = (opts.on_sweep, swept) {
            (observe.0)(s);
        }
        rec.submit()?;
        running = still;
    }
    // The finish of every input in one pass.
    let mut rec = ctx.recorder();
    let mut eigens = Vec::with_capacity(inputs.len());
    for (((plan, input), run), &l) in plans.iter().zip(inputs).zip(&runs).zip(label) {
        let (values, vectors, sweeps, off_diagonal) = match run {
            Some(run) => {
                let (values, vectors) = run
                    .record_finish(&mut rec, opts.reorthogonalize)
                    .map_err(|e| name_input(l, e))?;
                let (sweeps, off) = run.outcome();
                (values, vectors, sweeps, off)
            }
            None => (
                ctx.zeros(&[plan.batch, plan.n])?,
                ctx.zeros(input.matrices.shape())?,
                0,
                0.0,
            ),
        };
        eigens.push(Eigen {
            values: values.reshape(&plan.values_shape)?,
            vectors: vectors.reshape(input.matrices.shape())?,
            sweeps,
            off_diagonal,
        });
    }
    rec.submit()?;
    Ok(eigens)
}
