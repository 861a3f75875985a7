//! The Jacobi kernels' parameters and what the three paths share: the binding windows,
//! the warm start's rotation, the work buffers' set-up, the stopping rule and the finish
//! (sort, re-orthogonalisation, gather).

use super::blocked::BlockPlan;
use super::runs::groups;
use super::{JacobiOptions, Problem};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder};
use crate::kernel_params;
use crate::ops::gemm::{Gemm, gemm};

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
pub(super) fn worst_off_diagonal(off: &[f64], bad: &[bool]) -> Result<f32> {
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
pub(super) fn stop(off: f64, sweeps: usize, opts: &JacobiOptions) -> bool {
    sweeps >= opts.max_sweeps || off <= f64::from(opts.tol)
}

/// Work buffers of one call: the matrix being diagonalised and the eigenbasis `W = Vᵀ`
/// (rows are vectors), both `[batch, n, n]`.
pub(super) struct Work {
    pub(super) a: GpuTensor,
    pub(super) w: GpuTensor,
}

impl Problem {
    /// Parameters of the global kernels at step `step`.
    pub(super) fn params(&self, step: usize) -> GlobalParams {
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
            ("global_init_a", &self.input, &work.a),
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
