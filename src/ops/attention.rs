//! Scaled dot-product attention composed from the batched GEMM of [`super::gemm`] and
//! the masked softmax of [`super::softmax`], chunked over the batch of independent
//! problems so that the `[chunk, L, S]` attention matrices fit a workspace:
//!
//! - forward: `S = scale·Q Kᵀ`, `P = softmax(S)` (masked entries left out), `O = P V`;
//! - backward of a stack of output gradients `G`, the probabilities recomputed per
//!   chunk (never stored between the passes): `dP = G Vᵀ`, `dS = P ⊙ (dP − Σ_row dP P)`,
//!   `dQ = scale·dS K`, `dK = scale·dSᵀ Q`, `dV = Pᵀ G`.
//!
//! `Q` is `[batch, L, E]`, `K` `[batch, S, E]`, `V` `[batch, S, Ev]`, `O` `[batch, L,
//! Ev]`, packed row-major; `batch` counts examples times leading dims (heads). The mask
//! is a period of u32 words (1 = attend) over the flat elements of the `[batch, L, S]`
//! scores.

use std::ops::Range;

use super::check::expect_lens;
use super::gemm::{Gemm, gemm};
use super::softmax::{RowMask, softmax_backward, softmax_forward};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};

/// The sizes of one attention: `batch` independent problems of `l` queries and `s`
/// keys, query/key width `e`, value width `ev`, scores scaled by `scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub batch: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
    pub scale: f32,
}

/// Bytes of workspace one problem (one batch entry) needs: three `[L, S]` matrices
/// (scores or `dP`, probabilities, `dS`).
pub fn workspace_bytes_per_problem(l: usize, s: usize) -> u64 {
    3 * 4 * (l * s) as u64
}

/// Scratch matrices for up to [`Self::chunk`] problems at a time: the scores (and in
/// backward `dP`), the probabilities and `dS` (backward only), each `[chunk, L, S]`.
pub struct AttentionWorkspace {
    scores: GpuTensor,
    probs: GpuTensor,
    grads: Option<GpuTensor>,
    chunk: usize,
}

impl AttentionWorkspace {
    /// Buffers for as many problems of `att` per chunk as fit in `max_bytes` (at least
    /// one, at most the batch; counting three matrices per problem), each within one
    /// storage binding; `backward` adds the `dS` buffer.
    pub fn new(ctx: &GpuContext, att: &Attention, max_bytes: u64, backward: bool) -> Result<Self> {
        let per = att.l * att.s;
        let by_budget = (max_bytes / workspace_bytes_per_problem(att.l, att.s).max(1)) as usize;
        let by_binding = ctx.binding_elements().0 / per.max(1);
        if by_binding == 0 {
            return Err(Error::Memory(format!(
                "one attention matrix of {} × {} needs {} bytes, more than the adapter's \
                 max_storage_buffer_binding_size of {} bytes",
                att.l,
                att.s,
                4 * per,
                ctx.limits.max_storage_buffer_binding_size
            )));
        }
        let chunk = by_budget.clamp(1, att.batch.max(1)).min(by_binding);
        let len = chunk * per;
        Ok(Self {
            scores: ctx.zeros(&[len])?,
            probs: ctx.zeros(&[len])?,
            grads: backward.then(|| ctx.zeros(&[len])).transpose()?,
            chunk,
        })
    }

    /// Problems per chunk.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    fn chunks(&self, batch: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let chunk = self.chunk;
        (0..batch)
            .step_by(chunk)
            .map(move |c0| c0..(c0 + chunk).min(batch))
    }
}

/// The first `problems` matrices of a workspace buffer.
fn part(t: &GpuTensor, problems: usize, att: &Attention) -> Result<GpuTensor> {
    t.window(0, problems * att.l * att.s, 1)
}

/// A batched product over the problems `c` of a chunk: `m × n × k`, operands at the
/// given element offsets, packed strides.
fn product(
    (m, n, k): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    problems: usize,
    alpha: f32,
    offsets: [usize; 3],
) -> Gemm {
    let mut g = Gemm::new(m, n, k, trans_a, trans_b)
        .batched(problems)
        .scaled(alpha, 0.0);
    [g.offset_a, g.offset_b, g.offset_c] = offsets;
    g
}

impl Attention {
    /// Records `P = softmax(scale·Q Kᵀ)` for the problems `c` into the workspace's
    /// probabilities (its scores overwritten).
    fn probabilities(
        &self,
        rec: &mut Recorder,
        ws: &AttentionWorkspace,
        c: &Range<usize>,
        (q, k): (&GpuTensor, &GpuTensor),
        mask: Option<&GpuTensor>,
    ) -> Result<(GpuTensor, GpuTensor)> {
        let Self { l, s, e, .. } = *self;
        let n = c.len();
        let (scores, probs) = (part(&ws.scores, n, self)?, part(&ws.probs, n, self)?);
        let g = product(
            (l, s, e),
            (false, true),
            n,
            self.scale,
            [c.start * l * e, c.start * s * e, 0],
        );
        gemm(rec, &g, q, k, &scores)?;
        let mask = mask.map(|words| RowMask {
            words,
            offset: (c.start * l * s) % words.len().max(1),
        });
        softmax_forward(rec, &scores, &probs, s, mask)?;
        Ok((scores, probs))
    }

    /// Records `out = softmax(scale·Q Kᵀ, masked)·V` chunk by chunk.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        ws: &AttentionWorkspace,
        (q, k, v): (&GpuTensor, &GpuTensor, &GpuTensor),
        mask: Option<&GpuTensor>,
        out: &GpuTensor,
    ) -> Result<()> {
        let Self {
            batch, l, s, e, ev, ..
        } = *self;
        expect_lens(
            "attention forward",
            self,
            &[
                ("Q", q, batch * l * e),
                ("K", k, batch * s * e),
                ("V", v, batch * s * ev),
                ("out", out, batch * l * ev),
            ],
        )?;
        for c in ws.chunks(batch) {
            let (_, probs) = self.probabilities(rec, ws, &c, (q, k), mask)?;
            let g = product(
                (l, ev, s),
                (false, false),
                c.len(),
                1.0,
                [0, c.start * s * ev, c.start * l * ev],
            );
            gemm(rec, &g, &probs, v, out)?;
        }
        Ok(())
    }

    /// Records the input gradients of a stack of `stack` output gradients `grad_out`
    /// (`[stack·batch, L, Ev]`, `V`-major) into those of `grads` = `(dQ, dK, dV)` that
    /// are given (`[stack·batch, L, E]`, `[stack·batch, S, E]`, `[stack·batch, S, Ev]`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rec: &mut Recorder,
        ws: &AttentionWorkspace,
        stack: usize,
        (q, k, v): (&GpuTensor, &GpuTensor, &GpuTensor),
        mask: Option<&GpuTensor>,
        grad_out: &GpuTensor,
        [dq, dk, dv]: [Option<&GpuTensor>; 3],
    ) -> Result<()> {
        let Self {
            batch,
            l,
            s,
            e,
            ev,
            scale,
        } = *self;
        let rows = stack * batch;
        let mut expected = vec![
            ("Q", q, batch * l * e),
            ("K", k, batch * s * e),
            ("V", v, batch * s * ev),
            ("grad_out", grad_out, rows * l * ev),
        ];
        expected.extend(dq.map(|t| ("dQ", t, rows * l * e)));
        expected.extend(dk.map(|t| ("dK", t, rows * s * e)));
        expected.extend(dv.map(|t| ("dV", t, rows * s * ev)));
        expect_lens("attention backward", self, &expected)?;
        let ds_buffer = ws.grads.as_ref().ok_or_else(|| {
            Error::gpu(
                "attention backward",
                "the workspace has no dS buffer (built for forward)",
            )
        })?;
        for c in ws.chunks(batch) {
            let n = c.len();
            let (dp, probs) = self.probabilities(rec, ws, &c, (q, k), mask)?;
            let ds = part(ds_buffer, n, self)?;
            for vi in 0..stack {
                // The first problem of this chunk in the stacked tensors.
                let r = vi * batch + c.start;
                if let Some(dv) = dv {
                    let g = product(
                        (s, ev, l),
                        (true, false),
                        n,
                        1.0,
                        [0, r * l * ev, r * s * ev],
                    );
                    gemm(rec, &g, &probs, grad_out, dv)?;
                }
                if dq.is_none() && dk.is_none() {
                    continue;
                }
                let g = product(
                    (l, s, ev),
                    (false, true),
                    n,
                    1.0,
                    [r * l * ev, c.start * s * ev, 0],
                );
                gemm(rec, &g, grad_out, v, &dp)?;
                softmax_backward(rec, &probs, &dp, &ds, s)?;
                if let Some(dq) = dq {
                    let g = product(
                        (l, e, s),
                        (false, false),
                        n,
                        scale,
                        [0, c.start * s * e, r * l * e],
                    );
                    gemm(rec, &g, &ds, k, dq)?;
                }
                if let Some(dk) = dk {
                    let g = product(
                        (s, e, l),
                        (true, false),
                        n,
                        scale,
                        [0, c.start * l * e, r * s * e],
                    );
                    gemm(rec, &g, &ds, q, dk)?;
                }
            }
        }
        Ok(())
    }
}
