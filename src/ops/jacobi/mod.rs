//! Symmetric eigendecomposition of (batches of) Kronecker factors by parallel Jacobi
//! rotations in f32 on the GPU (`shaders/jacobi.wgsl`).
//!
//! Algorithm: cyclic two-sided Jacobi with the round-robin (tournament) ordering, so the
//! `m/2` rotations of a step (`m` = `n` rounded up to even) touch disjoint index pairs
//! and are applied in parallel; a sweep is `m − 1` steps and meets every pair once.
//! Rotations use Rutishauser's stable form (see the shader). A matrix is done when
//! `off = ‖offdiag(A)‖_F / ‖A‖_F ≤ tol` (`off` bounds its own contribution to the
//! residual `‖AV − VΛ‖_F / ‖A‖_F`; default `tol` [`F32_RESOLUTION`] = 32ε, about what
//! f32 resolves) or after `max_sweeps` sweeps. Convergence is quadratic once `off` is below
//! the absolute eigengaps; on graded spectra (gaps of 1e-7·‖A‖ among the small
//! eigenvalues) the middle sweeps reduce `off` only 3–5× each, and inside clusters of
//! nonzero eigenvalues narrower than f32 can resolve (`≲ ε·λ`) the last decades fall
//! by about 0.6 per sweep: such matrices take a few more sweeps. Eigenpairs are then sorted
//! ascending on the GPU (each diagonal entry's rank by comparison, ties by index, then a
//! gather), after an optional Newton–Schulz re-orthogonalisation of the eigenbasis.
//!
//! QR preconditioner (Drmač–Veselić): from `n = 33` on
//! ([`JacobiOptions::precondition_min_n`]) a cold start first computes the QR
//! decomposition `A = Q R` (Householder, no pivoting; [`crate::ops::qr`], in the same
//! pass as the sweeps' set-up) and sweeps `A₁ = R Q = Qᵀ A Q` (one GEMM) with the
//! eigenbasis starting at `Q`, exactly as a warm start (batches whose QR buffers exceed
//! one storage binding skip it). It is
//! one step of unshifted QR iteration: the leading columns of `Q` span `A`
//! applied to the leading unit vectors, so the large eigenvalues gather in the leading
//! rows and the coupling of eigenvalues `λ_i ≪ λ_j` shrinks by about `λ_i / λ_j`. That
//! separates the scales of graded spectra, on which the sweeps alone reduce `off` only
//! 3–5× each: on lavapipe the graded spectrum at n = 512 takes 5 sweeps instead of 13,
//! graded and rank-deficient ones at n = 64–300 half as many, clustered ones a fifth
//! fewer. On spectra without a wide range (a Gram matrix of random data, condition 6)
//! it saves none and costs about 5`n³` GEMM flops (under half a blocked sweep; forming
//! `R Q` instead of `Qᵀ (A Q)` saves one product of 2`n³`). It is
//! not a sweep: [`Eigen::sweeps`] counts the sweeps after it. The refinement
//! ([`JacobiOptions::refine_min_n`]) restarts from the result as before.
//!
//! Three ways to run the sweeps:
//! - [`JacobiPath::Workgroup`] (automatic up to `n = 32`, possible up to `n = 256`):
//!   one workgroup per matrix of the batch does a whole sweep in one dispatch, with `A`
//!   and the eigenbasis in workgroup memory for `n ≤ 32` and in storage buffers above;
//!   9 such dispatches (each first tests convergence and returns at once when the
//!   matrix is done) go into one pass with one readback of the done flags, then, only
//!   if needed, twice as many again (up to `max_sweeps + 1` in all), then the sort. No
//!   host round trip per sweep, so many small factors are cheap.
//! - [`JacobiPath::Global`] (any size): every step is two dispatches over the whole batch
//!   (rotation parameters, then their application to `A` and the eigenbasis), all steps
//!   of a sweep go into one pass, and the off-diagonal norm is read back once per sweep
//!   as per-workgroup partial sums that the host adds in a fixed order.
//! - [`JacobiPath::Blocked`] (automatic above `n = 32`, any size): block Jacobi. The
//!   indices are cut into an even number of blocks of at most 16 (`n` padded to `m`, a
//!   multiple of the block; indices past `n` are phantoms that never mix with real
//!   ones), and a sweep is the round-robin over blocks: `blocks − 1` rounds, each
//!   pairing all blocks disjointly. The matrix and the basis live in padded buffers
//!   whose blocks are kept in the current round's order, each pair at two adjacent
//!   positions (a `block_gather` moves them between rounds). Per round, `block_solve`
//!   diagonalises each pair's `L × L` sub-matrix (`L` = two blocks) in registers, two
//!   columns per invocation (inner cyclic Jacobi sweeps until its off-diagonal norm is below
//!   `tol · ‖A‖_F / blocks`, so a sweep that leaves every pair alone has converged; at
//!   most 2), sorts the pair's diagonal ascending and stores the rotation `R`; then
//!   `A ← Rᵀ A R` and `W ← Rᵀ W` for the block-diagonal `R` are batched GEMMs
//!   (`crate::ops::gemm`, one over all row panels, one over the column panels of every
//!   matrix (a two-level batch, `Gemm::period`), one for the basis). 6 dispatches per
//!   round with the gathers, whatever the batch (more where GEMMs are cut into binding
//!   windows); the sweep loop, readback and convergence test are the global path's.
//!   A matrix of a batch that is done while others still sweep gets a negative
//!   threshold: `block_solve` leaves its pairs alone (no rotation, no sort, so the
//!   GEMMs multiply by the identity exactly), and each matrix of a stack ends bitwise
//!   as if decomposed alone (`tests/jacobi.rs`). The workgroup path does the same by
//!   its per-matrix test; the global path sweeps every matrix of its batch.
//!
//! All three are deterministic: fixed reduction orders, no float atomics (only an
//! integer OR that flags NaN or Inf).
//!
//! Several inputs at once ([`eigh_many`]; [`crate::curvature::eigen::JacobiSolver`]
//! passes all stacks of factors of a fit in one call): batches of different sizes, each
//! with its own warm start, share every pass. The set-up of all inputs (QR step or
//! warm-start rotation, work buffers, padding, first norms; the workgroup path's first
//! chunk of sweeps) is one pass; each iteration is one readback of every running
//! input's norm partials or done flags together ([`GpuContext::read_many`]) and one
//! pass with the next sweep of each host-driven input and the next chunk of each
//! workgroup-path input not yet done; the finish of all inputs is one pass. Each input
//! runs the same kernels with the same parameters and stops by its own rule, so its
//! results are bitwise those of a lone [`eigh`] (`tests/jacobi.rs`); only the grouping
//! into passes changes. A fit's eigendecomposition costs about the largest sweep count
//! plus a few submissions and readbacks instead of their sum: `bench --quick` (counts
//! are driver-independent), mlp (stacks n = 196, 128 ×4, 10) 917 dispatches /
//! 19 submissions / 20 readbacks → 917 / 10 / 8, cnn (six single factors) 833 / 22 /
//! 28 → 833 / 8 / 8. On lavapipe, whose dispatches run one after the other anyway, the
//! time is about neutral (within the noise of a loaded machine; the README's issue-13
//! table has the runs); the point is a GPU, where each readback is a host round trip
//! with the GPU idle.
//!
//! Matrices larger than one storage binding (the adapter's
//! `max_storage_buffer_binding_size`, 128 MiB on WebGPU's defaults: a single matrix of
//! `n` above about 5790) run on the blocked path with each `[batch, n, n]` tensor bound
//! as three windows of its buffer (see `shaders/jacobi.wgsl`), and the products of the
//! warm start and the re-orthogonalisation as GEMMs cut into windows: up to three
//! bindings per matrix (`n` up to about 10000 on the defaults, where the buffer itself,
//! `max_buffer_size`, also allows it). Larger batches are refused with
//! [`Error::Memory`].

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
pub use crate::progress::Sweeps;

mod blocked;
mod driver;
mod runs;
mod sweeps;

use blocked::BlockPlan;
pub use driver::{EighInput, eigh_many};
pub use sweeps::{BlockParams, CombineParams, GatherParams, GlobalParams, SweepParams};

/// Largest `n` of the workgroup-memory kernel (must match `SHARED_N` in the shader).
const SHARED_MAX_N: usize = 32;
/// Largest `n` of the storage-buffer workgroup kernel (`2 · MAX_PAIRS` in the shader):
/// one sweep at n = 256 is about 49k loop iterations per invocation, under the software
/// driver's cap of 65535.
const WORKGROUP_MAX_N: usize = 256;
/// Largest `n` for which [`JacobiPath::Auto`] picks one workgroup per matrix: the
/// workgroup-memory kernel (`SHARED_MAX_N`), one dispatch per sweep and no host round
/// trip per sweep. Measured on lavapipe after the register-resident `block_solve` and the
/// triangle GEMMs (same process, three runs each after a warm-up, two at n = 96 and 128;
/// CPU time of `eigh` and the readback, batches of 4 matrices of the graded spectrum
/// 1 … 1e-6, QR preconditioner from n = 33 on both paths): n = 32, workgroup 0.03–0.04 s in 8 sweeps,
/// blocked 0.01 s in 4; n = 40, 0.04–0.05 s in 4 against 0.04–0.05 s in 3; n = 48,
/// 0.06–0.07 s in 4 against 0.04–0.05 s in 3; n = 56, 0.10 s in 5 against 0.04–0.06 s
/// in 3; n = 72, 0.21–0.23 s in 5 against 0.13–0.14 s in 3; n = 96, 0.53–0.73 s in 5
/// against 0.16–0.17 s in 3; n = 128, 1.2–1.5 s in 5 against 0.34–0.42 s in 3. Above
/// `n = 32` the storage-buffer workgroup kernel loses at every size measured, so it is
/// only chosen explicitly. At `n ≤ 32` the blocked path is faster on the software
/// driver too (n = 16: 0.01 s in 9 sweeps against ≤ 0.01 s in 3), but there it pays
/// 6 dispatches per round and a readback per sweep where the workgroup-memory
/// kernel runs a whole sweep in one dispatch, which a GPU rewards.
const AUTO_WORKGROUP_MAX_N: usize = SHARED_MAX_N;
/// Elements of one matrix summed per workgroup by `global_norms` (`NORM_CHUNK`).
const NORM_CHUNK: usize = 4096;
/// Invocations per workgroup of every kernel in the shader.
const WORKGROUP_SIZE: usize = 256;

/// The default stopping rule `‖offdiag(A)‖_F ≤ c·ε·‖A‖_F` with `c = 32` and `ε` the
/// f32 machine epsilon (2⁻²³): 3.8e-6. `off` is the part of the residual
/// `‖AV − VΛ‖_F / ‖A‖_F` that more sweeps remove; below it they mostly chase
/// eigenvectors of eigenvalues f32 cannot separate (clusters of width `≲ ε·‖A‖`, where
/// `off` falls 2–3× per sweep). `c` is as large as the fixtures allow: with 64ε one
/// fixture's KFAC product (`cnn_b_ce_sum_type2_expand_joint`) missed its 1e-5 bound
/// (1.06e-5; 2.4e-7 with 32ε). Saves at most the last sweep of the former `1e-6`.
pub const F32_RESOLUTION: f32 = 32.0 * f32::EPSILON;

/// Which kernel runs the sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JacobiPath {
    /// [`JacobiPath::Workgroup`] up to `n = 32` (when the batch fits one binding),
    /// [`JacobiPath::Blocked`] otherwise.
    #[default]
    Auto,
    /// One workgroup per matrix and one dispatch per sweep (`n ≤ 256`; workgroup memory
    /// for `n ≤ 32`).
    Workgroup,
    /// Two dispatches per step over the whole batch; a batch that fits one binding.
    Global,
    /// Block pairs of up to 32 indices diagonalised in registers, their
    /// rotations applied as batched GEMMs; meant for `n` above 32, and the only path
    /// for batches larger than one binding (up to three).
    Blocked,
}

/// Options of [`eigh`].
#[derive(Debug, Clone, Copy)]
pub struct JacobiOptions<'a> {
    /// Most sweeps to run (each sweep is `m − 1` parallel steps).
    pub max_sweeps: usize,
    /// A matrix is done once `‖offdiag(A)‖_F ≤ tol · ‖A‖_F` (default [`F32_RESOLUTION`]).
    pub tol: f32,
    /// A previous eigenbasis, `[n, n]` (shared by the batch) or `[batch, n, n]`,
    /// columns are eigenvectors: the sweeps start from `V₀ᵀ A V₀` and accumulate the
    /// rotations onto `V₀`. Needs not be sorted or exactly orthogonal, but the result
    /// is only as orthogonal as `V₀`.
    pub warm_start: Option<&'a GpuTensor>,
    /// Which kernel to use.
    pub path: JacobiPath,
    /// Finish with one Newton–Schulz step `V ← V (1.5 I − 0.5 VᵀV)` (two batched
    /// products): the rotations leave `‖VᵀV − I‖_F` growing like `n·√sweeps·ε`, the
    /// step brings it back to the rounding of the products.
    pub reorthogonalize: bool,
    /// From this size on, a cold start is refined once by a warm restart on the
    /// original matrix: the in-place rotations of a long run let `A` drift by f32
    /// rounding, and `Vᵀ A V` formed afresh from the input, nearly diagonal, loses that
    /// drift in a few sweeps. Measured on the blocked path at n = 1024 (graded
    /// spectrum): residual 1.8e-5 → 1.1e-6, eigenvalue error 2.8e-5 → 1.4e-7.
    pub refine_min_n: usize,
    /// From this size on (default 33), a cold start (no `warm_start`) is preconditioned
    /// by one QR step: the sweeps start from `R Q = Qᵀ A Q` with the basis at `Q`, for
    /// `A = Q R` ([`crate::ops::qr`], no pivoting; module docs). Not a sweep: the sweeps
    /// reported are the Jacobi sweeps after it. Skipped for batches whose QR buffers do
    /// not fit one storage binding ([`crate::ops::qr::fits_one_binding`]);
    /// `usize::MAX`: never. Measured on lavapipe (median of 3, one
    /// matrix, before issue 13's register `block_solve`): graded spectra (1 … 1e-6) at
    /// n = 48, 96, 196 take 9 → 4, 10 → 5, 10 → 4 sweeps and 35 → 19, 213 → 116,
    /// 1147 → 470 ms; a Gram matrix of random data (condition 6) the same sweeps and
    /// 23 → 28, 160 → 163, 1068 → 1100 ms. Below n = 33 (one panel; sweeps in workgroup
    /// memory) the two are within 0.5 ms.
    pub precondition_min_n: usize,
    /// Called after every sweep whose off-diagonal norms the host reads back (the
    /// global and blocked paths; the workgroup path runs its sweeps in chunks), with
    /// the sweeps so far and the batch's largest `‖offdiag(A)‖_F / ‖A‖_F`; in
    /// [`eigh_many`] once per shared readback, over the inputs that swept.
    pub on_sweep: Option<SweepObserver<'a>>,
}

/// An observer of a running [`eigh`]'s sweeps ([`JacobiOptions::on_sweep`]).
#[derive(Clone, Copy)]
pub struct SweepObserver<'a>(pub &'a dyn Fn(Sweeps));

impl std::fmt::Debug for SweepObserver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SweepObserver")
    }
}

impl Default for JacobiOptions<'_> {
    fn default() -> Self {
        Self {
            max_sweeps: 30,
            tol: F32_RESOLUTION,
            warm_start: None,
            path: JacobiPath::Auto,
            reorthogonalize: true,
            refine_min_n: 768,
            precondition_min_n: 33,
            on_sweep: None,
        }
    }
}

/// Eigendecomposition `A = V diag(values) Vᵀ` of each matrix of a batch.
#[derive(Debug)]
pub struct Eigen {
    /// `[batch, n]` (or `[n]` for an `[n, n]` input), ascending in each row.
    pub values: GpuTensor,
    /// `[batch, n, n]` (or `[n, n]`), row-major; column `j` of matrix `b` is the unit
    /// eigenvector of `values[b, j]`.
    pub vectors: GpuTensor,
    /// Sweeps run (the largest over the batch).
    pub sweeps: usize,
    /// Final `‖offdiag(A)‖_F / ‖A‖_F` (the largest over the batch).
    pub off_diagonal: f32,
}

/// Eigendecomposition of the symmetric matrices `matrices` (`[batch, n, n]` or
/// `[n, n]`, row-major; only the symmetric part `(A + Aᵀ)/2` is used). Meant for
/// positive semi-definite Kronecker factors, but any finite symmetric input works.
/// [`eigh_many`] of one input.
///
/// Returns an [`Error::Gpu`] naming the matrix when the input holds NaN or Inf (or
/// entries so large, above about 1e19, that their squares overflow f32), and
/// [`Error::Memory`] when the batch does not fit three storage bindings (one for the
/// workgroup and global paths).
pub fn eigh(ctx: &GpuContext, matrices: &GpuTensor, opts: &JacobiOptions) -> Result<Eigen> {
    let input = EighInput {
        matrices,
        warm_start: opts.warm_start,
    };
    eigh_many(ctx, &[input], opts)?
        .pop()
        .ok_or_else(|| Error::gpu("eigh", "no result"))
}

/// [`eigh`] of each matrix of a list (e.g. the factors of all layers, of different
/// sizes), each `[n, n]` or `[batch, n, n]`, with the same options (a warm start in
/// `opts` must fit every matrix, so it is usually `None` here), in one
/// [`eigh_many`].
pub fn eigh_each(
    ctx: &GpuContext,
    matrices: &[&GpuTensor],
    opts: &JacobiOptions,
) -> Result<Vec<Eigen>> {
    let inputs: Vec<EighInput> = matrices
        .iter()
        .map(|&matrices| EighInput {
            matrices,
            warm_start: opts.warm_start,
        })
        .collect();
    eigh_many(ctx, &inputs, opts)
}

/// One input's matrices: `input` `[batch, n, n]` (already rotated into the warm start
/// basis, if any), the warm start basis with its batch stride in elements, and the
/// elements per binding window.
struct Problem {
    batch: usize,
    n: usize,
    input: GpuTensor,
    start: Option<(GpuTensor, usize)>,
    window: usize,
}

impl Problem {
    /// The tensor bound as `v0` (the input itself when there is no warm start; unread).
    fn v0(&self) -> &GpuTensor {
        self.start.as_ref().map_or(&self.input, |(v0, _)| v0)
    }
}

/// Elements of one binding window: the largest multiple of the offset alignment that
/// fits `max_storage_buffer_binding_size`.
/// (The shader computes `2 · window` in u32, so a window stays below 2³¹ elements.)
fn window_elements(ctx: &GpuContext) -> usize {
    let (limit, align) = ctx.binding_elements();
    limit.min(u32::MAX as usize / 2) / align * align
}

/// The largest `n` whose `n × n` matrix [`eigh`] decomposes on this context: three
/// binding windows (see the module docs) for the blocked path's padded `m × m` work
/// matrix, one buffer of `max_buffer_size`, and the kernels' 32-bit indices.
pub fn max_dimension(ctx: &GpuContext) -> usize {
    let elements = (3 * window_elements(ctx) as u64)
        .min(ctx.limits.max_buffer_size / 4)
        .min(u64::from(u32::MAX) / 2);
    let mut n = elements.isqrt() as usize;
    while n > 0 && (BlockPlan::new(n).m as u64).pow(2) > elements {
        n -= 1;
    }
    n
}

/// Refuses batches that do not fit three binding windows or overflow the kernels' u32
/// element indices; returns whether the batch needs more than one window.
fn check_fits(ctx: &GpuContext, batch: usize, n: usize, window: usize) -> Result<bool> {
    let elements = batch as u64 * n as u64 * n as u64;
    // The blocked path's work matrices are padded to m × m.
    let m = BlockPlan::new(n).m as u64;
    let bytes = batch as u64 * m * m * 4;
    if batch as u64 * m * m > 3 * window as u64 {
        return Err(Error::Memory(format!(
            "the Jacobi eigendecomposition of {batch} matrices of size {n}×{n} needs \
             {bytes}-byte buffers, more than three storage bindings of the adapter's \
             max_storage_buffer_binding_size ({} bytes)",
            ctx.limits.max_storage_buffer_binding_size
        )));
    }
    // global_apply indexes batch · (h² + h·n) items, about 1.5 · batch · n².
    let h = (n as u64).div_ceil(2);
    if batch as u64 * (h * h + h * n as u64) >= u64::from(u32::MAX) {
        return Err(Error::Memory(format!(
            "the Jacobi eigendecomposition of {batch} matrices of size {n}×{n} exceeds the \
             kernels' 32-bit index range; split the batch"
        )));
    }
    Ok(elements > window as u64)
}
