//! Kernels of the eigenvalue correction and of products in the Kronecker eigenbasis
//! (`shaders/eigencorrect.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;
use crate::ops::reduce::{Sum, sum_rows};

kernel_params! {
    /// `scale_broadcast`: `x[x_offset + i] *= m[m_offset + i mod period]`, `i < len`.
    pub struct ScaleParams {
        x_offset: u32,
        len: u32,
        m_offset: u32,
        period: u32,
    }
}

kernel_params! {
    /// `square_sum_stack`: `sum[i] = Σ_{v < stack} x[v·len + i]²`, `i < len`.
    pub struct StackParams {
        /// Elements of one stacked matrix.
        len: u32,
        /// Stacked matrices `V`.
        stack: u32,
    }
}

kernel_params! {
    /// `correct_shared`: `Λ [d_out, d] += κ Σ_{v,n} (Σ_s g̃[v, n, s] x̃[n, s]ᵀ)^∘2` over
    /// `stack` vectors, `batch` examples and `positions` positions; the `(v, n)` pairs
    /// (v-major) in `parts` runs of `per_part`, each writing its own partial sums when
    /// `parts > 1`.
    pub struct SharedParams {
        stack: u32,
        batch: u32,
        positions: u32,
        d_out: u32,
        d: u32,
        kappa: f32,
        parts: u32,
        per_part: u32,
    }
}

/// Records `x[x_offset + i] *= m[m_offset + i mod period]` for `i < len`: one
/// `[d_out, D]` eigenvalue matrix (`period = d_out·D`) applied elementwise to `K`
/// stacked `[d_out, D]` matrices (`len = K·d_out·D`). When `x` or `m` is larger than
/// one storage binding, the range is cut into pieces within one period whose windows
/// fit.
pub fn scale_broadcast(
    rec: &mut Recorder,
    x: &GpuTensor,
    x_offset: usize,
    len: usize,
    m: &GpuTensor,
    m_offset: usize,
    period: usize,
) -> Result<()> {
    if x_offset + len > x.len() || m_offset + period > m.len() || period == 0 {
        return Err(Error::gpu(
            "scale_broadcast",
            format!(
                "x[{x_offset}..+{len}] of {} or m[{m_offset}..+{period}] of {} out of range",
                x.len(),
                m.len()
            ),
        ));
    }
    let ctx = rec.context();
    let (limit, align) = ctx.binding_elements();
    if x.len() <= limit && m.len() <= limit {
        return scale_piece(rec, [x, m], (x_offset, len, m_offset, period));
    }
    // Pieces of at most `limit − align` elements, so that their aligned windows fit.
    let piece = limit - align;
    let mut i = 0;
    while i < len {
        let at = i % period;
        let count = piece.min(period - at).min(len - i);
        let (xw, x_start) = ctx.binding_window(x, x_offset + i, count)?;
        let (mw, m_start) = ctx.binding_window(m, m_offset + at, count)?;
        scale_piece(
            rec,
            [&xw, &mw],
            (
                x_offset + i - x_start,
                count,
                m_offset + at - m_start,
                count,
            ),
        )?;
        i += count;
    }
    Ok(())
}

/// One `scale_broadcast` dispatch of `(x_offset, len, m_offset, period)`.
fn scale_piece(
    rec: &mut Recorder,
    [x, m]: [&GpuTensor; 2],
    (x_offset, len, m_offset, period): (usize, usize, usize, usize),
) -> Result<()> {
    let params = ScaleParams {
        x_offset: x_offset as u32,
        len: len as u32,
        m_offset: m_offset as u32,
        period: period as u32,
    };
    rec.dispatch(
        &Kernel::new(&super::EIGENCORRECT, "scale_broadcast"),
        &[m],
        &[x],
        &params,
        grid_1d((len as u32).div_ceil(256)),
    )
}

/// Records `sum[i] = Σ_v x[v, i]²` for `x` of shape `[V, ...]` with `sum.len()`
/// elements per `v`: squared eigenbasis projections of the `V` backpropagated
/// vectors, summed over `v` in order (deterministic, no atomics).
pub fn square_sum_stack(rec: &mut Recorder, x: &GpuTensor, sum: &GpuTensor) -> Result<()> {
    let len = sum.len();
    if len == 0 || !x.len().is_multiple_of(len) {
        return Err(Error::gpu(
            "square_sum_stack",
            format!(
                "x has {} elements, not a whole number of stacked copies of {len}",
                x.len()
            ),
        ));
    }
    rec.dispatch(
        &Kernel::new(&super::EIGENCORRECT, "square_sum_stack"),
        &[x],
        &[sum],
        &StackParams {
            len: len as u32,
            stack: (x.len() / len) as u32,
        },
        grid_1d((len as u32).div_ceil(256)),
    )
}

/// Invocations `correct_shared` aims for: layers with fewer 4 × 4 blocks of `Λ` cut
/// their examples into parts (up to [`MAX_PARTS`]) so that a GPU has work for more
/// than a few workgroups.
const TARGET_INVOCATIONS: usize = 4096;
/// Most parts of `correct_shared` (their partial sums take `parts × d_out × D`).
const MAX_PARTS: usize = 16;
/// Invocations of a `correct_shared` workgroup (the shader's `workgroup_size`).
const SHARED_WORKGROUP: usize = 64;

/// Records the fused correction of a weight-sharing layer:
/// `Λ[k, l] += κ Σ_{v,n} (Σ_s g̃[v, n, s, k] · x̃[n, s, l])²`, with `g̃` the rotated
/// channel-last output gradients `[V, B, S, d_out]` and `x̃` the rotated patches
/// `[B, S, D]`; `lambda` is `[d_out, D]`. Each invocation forms a 4 × 4 block of the
/// per-example gradients in registers and adds their squares over its `(v, n)` pairs,
/// so memory stays `O(V·B·S·(d_out + D))` plus at most [`MAX_PARTS`] partial copies of
/// `Λ`, whatever the sizes. Layers with fewer than [`TARGET_INVOCATIONS`] / 16 blocks
/// cut the pairs into parts (a choice made from the shapes alone, so results do not
/// depend on the device), whose partial sums [`sum_rows`] adds in a fixed order. Every
/// sum has a fixed order (deterministic, no atomics).
pub fn correct_shared(
    rec: &mut Recorder,
    rotated_grads: &GpuTensor,
    rotated_patches: &GpuTensor,
    lambda: &GpuTensor,
    stack: usize,
    positions: usize,
    kappa: f32,
) -> Result<()> {
    let [d_out, d] = match *lambda.shape() {
        [a, b] => [a, b],
        ref s => {
            return Err(Error::gpu(
                "correct_shared",
                format!("Λ must be [d_out, D], found {s:?}"),
            ));
        }
    };
    let batch = rotated_patches.len() / (positions * d).max(1);
    if rotated_patches.len() != batch * positions * d
        || rotated_grads.len() != stack * batch * positions * d_out
    {
        return Err(Error::gpu(
            "correct_shared",
            format!(
                "gradients {:?} and patches {:?} do not fit V = {stack}, S = {positions}, \
                 Λ {:?}",
                rotated_grads.shape(),
                rotated_patches.shape(),
                lambda.shape()
            ),
        ));
    }
    let pairs = stack * batch;
    if pairs == 0 || d_out == 0 || d == 0 {
        return Ok(());
    }
    let blocks = d_out.div_ceil(4) * d.div_ceil(4);
    let parts = (TARGET_INVOCATIONS / blocks).clamp(1, MAX_PARTS).min(pairs);
    let per_part = pairs.div_ceil(parts);
    let parts = pairs.div_ceil(per_part);
    let params = SharedParams {
        stack: stack as u32,
        batch: batch as u32,
        positions: positions as u32,
        d_out: d_out as u32,
        d: d as u32,
        kappa,
        parts: parts as u32,
        per_part: per_part as u32,
    };
    let [gx, gy, _] = grid_1d(blocks.div_ceil(SHARED_WORKGROUP) as u32);
    let kernel = Kernel::new(&super::EIGENCORRECT, "correct_shared");
    let inputs = [rotated_grads, rotated_patches];
    if parts == 1 {
        return rec.dispatch(&kernel, &inputs, &[lambda], &params, [gx, gy, 1]);
    }
    let partial = rec.context().zeros(&[parts, d_out, d])?;
    rec.dispatch(
        &kernel,
        &inputs,
        &[&partial],
        &params,
        [gx, gy, parts as u32],
    )?;
    // Λ += κ·Σ_p partial[p], the parts added in a fixed order.
    let sum = Sum {
        alpha: kappa,
        beta: 1.0,
        ..Sum::new(parts, d_out * d)
    };
    sum_rows(rec.context(), rec, &partial, lambda, &sum)
}
