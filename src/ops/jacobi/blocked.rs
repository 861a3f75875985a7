//! The blocked path: block pairs diagonalised in workgroup memory (`block_solve`), their
//! rotations applied to the whole matrix and eigenbasis as batched GEMMs, and the
//! blocks moved between rounds so that every pair of a round is a contiguous diagonal
//! sub-matrix (`block_gather`; see the shader's "Blocked path" section).

use super::sweeps::{BlockParams, Decomposition, GatherParams, Sweeper, groups, sweep_until_done};
use super::{JacobiOptions, Problem, SHARED_MAX_N};
use crate::error::Result;
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::ops::gemm::{Gemm, gemm};

/// Most indices per block (a block pair fills the shader's workgroup-memory matrix).
const MAX_BLOCK: usize = SHARED_MAX_N / 2;

/// How the blocked path cuts `n` indices: `blocks` (even, ≥ 2) blocks of `block`
/// indices, padded to `m = blocks · block ≥ n` (indices from `n` on are phantoms).
/// The number of blocks is the smallest even one with blocks of at most [`MAX_BLOCK`]
/// indices, and the blocks are as small as that allows, so `m − n < blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockPlan {
    pub(super) blocks: usize,
    pub(super) block: usize,
    pub(super) m: usize,
}

impl BlockPlan {
    pub(super) fn new(n: usize) -> Self {
        let blocks = 2 * n.div_ceil(2 * MAX_BLOCK).max(1);
        let block = n.div_ceil(blocks).max(1);
        Self {
            blocks,
            block,
            m: blocks * block,
        }
    }

    /// Indices of a block pair (`L`).
    fn pair(&self) -> usize {
        2 * self.block
    }

    /// The logical block at each position in round `round`: the pair of slot `s` at
    /// positions `2s` and `2s + 1` (the shader's `pair_of`).
    fn order(&self, round: usize) -> Vec<usize> {
        let r = self.blocks - 1;
        (0..self.blocks / 2)
            .flat_map(|j| {
                let (p, q) = if j == 0 {
                    (round, r)
                } else {
                    ((round + j) % r, (round + r - j) % r)
                };
                [p.min(q), p.max(q)]
            })
            .collect()
    }

    /// The block map table `[blocks + 1, blocks]` of `block_gather`: row `t`, entry `k`
    /// is the position, in the order before transition `t`, of the block that goes to
    /// position `k`. Rows: 0 the natural order → round 0; `r` in `1 ..= blocks − 2`
    /// round `r − 1` → round `r`; `blocks − 1` the last round → round 0 (the next
    /// sweep); `blocks` the last round → the natural order.
    fn maps(&self) -> Vec<u32> {
        let natural: Vec<usize> = (0..self.blocks).collect();
        let last = self.order(self.blocks - 2);
        let mut transitions = vec![(natural.clone(), self.order(0))];
        transitions.extend((1..self.blocks - 1).map(|r| (self.order(r - 1), self.order(r))));
        transitions.push((last.clone(), self.order(0)));
        transitions.push((last, natural));
        let mut table = Vec::with_capacity((self.blocks + 1) * self.blocks);
        for (from, to) in transitions {
            let mut position = vec![0; self.blocks];
            for (k, &block) in from.iter().enumerate() {
                position[block] = k;
            }
            table.extend(to.iter().map(|&block| position[block] as u32));
        }
        table
    }
}

/// Rounds of `blocks − 1` block pairs per sweep; per round two gathers, `block_solve`
/// and the GEMMs (`2 + batch`), all rounds of a sweep in one pass with one readback.
pub(super) fn blocked_path(
    ctx: &GpuContext,
    mut rec: Recorder,
    problem: &Problem,
    opts: &JacobiOptions,
) -> Result<Decomposition> {
    let Problem { batch, n, .. } = *problem;
    let plan = BlockPlan::new(n);
    let (m, pair) = (plan.m, plan.pair());
    let work = problem.record_init(ctx, &mut rec)?;
    let mut sweeper = BlockSweeper {
        problem,
        plan,
        a: [ctx.zeros(&[batch, m, m])?, ctx.zeros(&[batch, m, m])?],
        w: [ctx.zeros(&[batch, m, n])?, ctx.zeros(&[batch, m, n])?],
        rotations: ctx.zeros(&[batch, plan.blocks / 2, pair, pair])?,
        maps: ctx.upload_u32(&plan.maps(), &[plan.blocks + 1, plan.blocks])?,
        tol: opts.tol,
        sweeps: 0,
    };
    // Pad the work buffers (natural block order).
    sweeper.gather(ctx, &mut rec, Move::Pad, &work.a, &sweeper.a[0])?;
    sweeper.gather(ctx, &mut rec, Move::PadBasis, &work.w, &sweeper.w[0])?;
    let (sweeps, off_diagonal) = sweep_until_done(ctx, rec, problem, opts, &mut sweeper)?;
    let mut rec = ctx.recorder();
    let map = if sweeps == 0 {
        u32::MAX
    } else {
        plan.blocks as u32
    };
    sweeper.gather(ctx, &mut rec, Move::Unpad(map), &sweeper.a[0], &work.a)?;
    sweeper.gather(ctx, &mut rec, Move::UnpadBasis(map), &sweeper.w[0], &work.w)?;
    let (values, vectors) = problem.record_finish(ctx, &mut rec, &work, opts.reorthogonalize)?;
    rec.submit()?;
    Ok((values, vectors, sweeps, off_diagonal))
}

/// One `block_gather` of the blocked path (`u32` fields: a row of the map table).
#[derive(Clone, Copy)]
enum Move {
    /// `[n, n]` → `[m, m]`, blocks in place.
    Pad,
    /// `[n, n]` → `[m, n]`, blocks of rows in place.
    PadBasis,
    /// `[m, m]` → `[m, m]`, rows and columns moved, symmetrised.
    Round(u32),
    /// `[m, n]` → `[m, n]`, rows moved.
    RoundBasis(u32),
    /// `[m, m]` → `[n, n]`, rows and columns moved.
    Unpad(u32),
    /// `[m, n]` → `[n, n]`, rows moved.
    UnpadBasis(u32),
}

/// The blocked path's padded matrices (`a`: the current one is `a[0]`, `a[1]` is
/// scratch) and bases (`w`, likewise), the rotations of a round, the block map table,
/// and the sweeps recorded so far.
struct BlockSweeper<'a> {
    problem: &'a Problem<'a>,
    plan: BlockPlan,
    a: [GpuTensor; 2],
    w: [GpuTensor; 2],
    rotations: GpuTensor,
    maps: GpuTensor,
    /// [`JacobiOptions::tol`].
    tol: f32,
    sweeps: usize,
}

impl BlockSweeper<'_> {
    /// Records `block_gather` from `src` to `dst`.
    fn gather(
        &self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        how: Move,
        src: &GpuTensor,
        dst: &GpuTensor,
    ) -> Result<()> {
        let Problem { batch, n, .. } = *self.problem;
        let m = self.plan.m;
        // (rows_in, cols_in, rows_out, cols_out, map, permute_cols, symmetrize)
        let (ri, ci, ro, co, map, cols, sym) = match how {
            Move::Pad => (n, n, m, m, u32::MAX, 1, 0),
            Move::PadBasis => (n, n, m, n, u32::MAX, 0, 0),
            Move::Round(t) => (m, m, m, m, t, 1, 1),
            Move::RoundBasis(t) => (m, n, m, n, t, 0, 0),
            Move::Unpad(t) => (m, m, n, n, t, 1, 0),
            Move::UnpadBasis(t) => (m, n, n, n, t, 0, 0),
        };
        let [s0, s1, s2] = self.problem.windows(ctx, src)?;
        let [d0, d1, d2] = self.problem.windows(ctx, dst)?;
        rec.dispatch(
            &Kernel::new(&crate::ops::JACOBI, "block_gather"),
            &[&self.maps],
            &[&s0, &s1, &s2, &d0, &d1, &d2],
            &GatherParams {
                rows_in: ri as u32,
                cols_in: ci as u32,
                rows_out: ro as u32,
                cols_out: co as u32,
                batch: batch as u32,
                block: self.plan.block as u32,
                map,
                blocks: self.plan.blocks as u32,
                permute_cols: cols,
                symmetrize: sym,
                window: self.problem.window as u32,
            },
            groups(batch * ro * co),
        )
    }
}

impl Sweeper for BlockSweeper<'_> {
    fn matrix(&self) -> (&GpuTensor, usize) {
        (&self.a[0], self.plan.m)
    }

    fn record_sweep(&mut self, rec: &mut Recorder, norms: &[f64]) -> Result<()> {
        let ctx = rec.context();
        let Problem { batch, n, .. } = *self.problem;
        let BlockPlan { blocks, block, m } = self.plan;
        let (h, pair) = (blocks / 2, self.plan.pair());
        // A block pair is solved once its off-diagonal norm is below
        // tol · ‖A‖_F / blocks: when all pairs of a sweep are, A has converged.
        let thresholds: Vec<f32> = norms
            .iter()
            .map(|&norm| (f64::from(self.tol) * norm / blocks as f64) as f32)
            .collect();
        let thresholds = ctx.upload(&thresholds, &[batch])?;
        for round in 0..blocks - 1 {
            let map = match (round, self.sweeps) {
                (0, 0) => 0,
                (0, _) => blocks - 1,
                (r, _) => r,
            } as u32;
            let [a, scratch] = &self.a;
            self.gather(ctx, rec, Move::Round(map), a, scratch)?;
            self.gather(ctx, rec, Move::RoundBasis(map), &self.w[0], &self.w[1])?;
            let [s0, s1, s2] = self.problem.windows(ctx, scratch)?;
            rec.dispatch(
                &Kernel::new(&crate::ops::JACOBI, "block_solve"),
                &[&thresholds],
                &[&s0, &s1, &s2, &self.rotations],
                &BlockParams {
                    n: n as u32,
                    m: m as u32,
                    batch: batch as u32,
                    round: round as u32,
                    blocks: blocks as u32,
                    block: block as u32,
                    window: self.problem.window as u32,
                },
                grid_1d((batch * h) as u32),
            )?;
            // a = Rᵀ · scratch (row panels of every matrix), then
            // scratch = Rᵀ · aᵀ = Rᵀ A R (per matrix: the column panels of a).
            let rows = Gemm::new(pair, m, pair, false, false).batched(batch * h);
            gemm(rec, &rows, &self.rotations, scratch, a)?;
            for b in 0..batch {
                let mut cols = Gemm::new(pair, m, pair, false, true).batched(h);
                cols.offset_a = b * h * pair * pair;
                cols.offset_b = b * m * m;
                cols.stride_b = pair;
                cols.ldb = m;
                cols.offset_c = b * m * m;
                cols.stride_c = pair * m;
                cols.ldc = m;
                gemm(rec, &cols, &self.rotations, a, scratch)?;
            }
            let basis = Gemm::new(pair, n, pair, false, false).batched(batch * h);
            gemm(rec, &basis, &self.rotations, &self.w[1], &self.w[0])?;
            self.a.swap(0, 1);
        }
        self.sweeps += 1;
        Ok(())
    }
}
