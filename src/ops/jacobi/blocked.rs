//! The blocked path: block pairs diagonalised in registers (`block_solve`), their
//! rotations applied to the whole matrix and eigenbasis as batched GEMMs, and the
//! blocks moved between rounds so that every pair of a round is a contiguous diagonal
//! sub-matrix (`block_gather`; see the shader's "Blocked path" section).
//!
//! The column-panel GEMM of a stack of matrices is one dispatch per round (a two-level
//! batch, [`Gemm::period`]; it was one per matrix): `bench --quick` mlp (four n = 128,
//! 7 rounds × 5 sweeps) 917 → 812 dispatches in its eigendecomposition; on lavapipe,
//! which runs dispatches one after the other, the time is unchanged within the noise
//! (4–5 alternating runs, load average 2.4–3.4: 496–799 ms before, 594–725 after).

use super::runs::{HostLoop, Sweeper};
use super::sweeps::{BlockParams, GatherParams, Work};
use super::{JacobiOptions, Problem, SHARED_MAX_N, WORKGROUP_SIZE};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder, grid_1d};
use crate::ops::gemm::{Gemm, gemm};

/// WebGPU's default limit of workgroups per grid dimension.
const MAX_GROUPS: usize = 65535;
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

    /// The index map table `[blocks + 1, m]` of `block_gather`: row `t`, entry `i` is
    /// the index, in the order before transition `t`, of the index that goes to `i`
    /// (blocks move whole). Rows: 0 the natural order → round 0; `r` in
    /// `1 ..= blocks − 2` round `r − 1` → round `r`; `blocks − 1` the last round → round
    /// 0 (the next sweep); `blocks` the last round → the natural order.
    fn maps(&self) -> Vec<u32> {
        let natural: Vec<usize> = (0..self.blocks).collect();
        let last = self.order(self.blocks - 2);
        let mut transitions = vec![(natural.clone(), self.order(0))];
        transitions.extend((1..self.blocks - 1).map(|r| (self.order(r - 1), self.order(r))));
        transitions.push((last.clone(), self.order(0)));
        transitions.push((last, natural));
        let mut table = Vec::with_capacity((self.blocks + 1) * self.m);
        for (from, to) in transitions {
            let mut position = vec![0; self.blocks];
            for (k, &block) in from.iter().enumerate() {
                position[block] = k;
            }
            for &block in &to {
                let start = position[block] * self.block;
                table.extend((start..start + self.block).map(|i| i as u32));
            }
        }
        table
    }
}

/// Rounds of `blocks − 1` block pairs per sweep; per round two gathers, `block_solve`
/// and three GEMMs, all rounds of a sweep in one pass with one readback.
/// Records the set-up (work buffers, padding) and the first norms.
pub(super) fn blocked_run(
    ctx: &GpuContext,
    rec: &mut Recorder,
    problem: Problem,
    opts: &JacobiOptions,
) -> Result<HostLoop<BlockSweeper>> {
    let Problem { batch, n, .. } = problem;
    // block_gather's grid has one workgroup row per matrix.
    if batch > MAX_GROUPS {
        return Err(Error::Memory(format!(
            "the blocked Jacobi path takes at most {MAX_GROUPS} matrices per call, found \
             {batch} of size {n}×{n}; split the batch"
        )));
    }
    let plan = BlockPlan::new(n);
    let (m, pair) = (plan.m, plan.pair());
    let sweeper = BlockSweeper {
        work: problem.record_init(ctx, rec)?,
        problem,
        plan,
        a: [ctx.zeros(&[batch, m, m])?, ctx.zeros(&[batch, m, m])?],
        w: [ctx.zeros(&[batch, m, n])?, ctx.zeros(&[batch, m, n])?],
        rotations: ctx.zeros(&[batch, plan.blocks / 2, pair, pair])?,
        maps: ctx.upload_u32(&plan.maps(), &[plan.blocks + 1, m])?,
        tol: opts.tol,
        sweeps: 0,
    };
    // Pad the work buffers (natural block order).
    sweeper.gather(ctx, rec, Move::Pad, &sweeper.work.a, &sweeper.a[0])?;
    sweeper.gather(ctx, rec, Move::PadBasis, &sweeper.work.w, &sweeper.w[0])?;
    HostLoop::start(ctx, rec, sweeper)
}

/// One `block_gather` of the blocked path (`u32` fields: a row of the map table).
#[derive(Clone, Copy)]
enum Move {
    /// `[n, n]` → `[m, m]`, blocks in place.
    Pad,
    /// `[n, n]` → `[m, n]`, blocks of rows in place.
    PadBasis,
    /// `[m, m]` → `[m, m]`, rows and columns moved, symmetrised; with the source's
    /// block upper triangle (panels of `pair` indices) alone current when `true`.
    Round(u32, bool),
    /// `[m, n]` → `[m, n]`, rows moved.
    RoundBasis(u32),
    /// `[m, m]` → `[n, n]`, rows and columns moved.
    Unpad(u32),
    /// `[m, n]` → `[n, n]`, rows moved.
    UnpadBasis(u32),
}

/// The blocked path's unpadded work buffers (set-up and finish), padded matrices (`a`:
/// the current one is `a[0]`, `a[1]` is scratch) and bases (`w`, likewise), the
/// rotations of a round, the block map table, and the sweeps recorded so far.
pub(super) struct BlockSweeper {
    problem: Problem,
    work: Work,
    plan: BlockPlan,
    a: [GpuTensor; 2],
    w: [GpuTensor; 2],
    rotations: GpuTensor,
    maps: GpuTensor,
    /// [`JacobiOptions::tol`].
    tol: f32,
    sweeps: usize,
}

impl BlockSweeper {
    /// Records `block_gather` from `src` to `dst`.
    fn gather(
        &self,
        ctx: &GpuContext,
        rec: &mut Recorder,
        how: Move,
        src: &GpuTensor,
        dst: &GpuTensor,
    ) -> Result<()> {
        let Problem { batch, n, .. } = self.problem;
        let m = self.plan.m;
        // (rows_in, cols_in, rows_out, cols_out, map, permute_cols, symmetrize)
        let (ri, ci, ro, co, map, cols, sym) = match how {
            Move::Pad => (n, n, m, m, u32::MAX, 1, 0),
            Move::PadBasis => (n, n, m, n, u32::MAX, 0, 0),
            Move::Round(t, _) => (m, m, m, m, t, 1, 1),
            Move::RoundBasis(t) => (m, n, m, n, t, 0, 0),
            Move::Unpad(t) => (m, m, n, n, t, 1, 0),
            Move::UnpadBasis(t) => (m, n, n, n, t, 0, 0),
        };
        let [s0, s1, s2] = self.problem.windows(ctx, src)?;
        let [d0, d1, d2] = self.problem.windows(ctx, dst)?;
        rec.dispatch(
            &self.problem.kernel("block_gather"),
            &[&self.maps],
            &[&s0, &s1, &s2, &d0, &d1, &d2],
            &GatherParams {
                rows_in: ri as u32,
                cols_in: ci as u32,
                rows_out: ro as u32,
                cols_out: co as u32,
                map,
                map_len: m as u32,
                permute_cols: cols,
                symmetrize: sym,
                window: self.problem.window as u32,
                run: self.plan.block as u32,
                panel: match how {
                    Move::Round(_, true) => self.plan.pair() as u32,
                    _ => 0,
                },
            },
            [
                (ro * co.div_ceil(self.plan.block)).div_ceil(WORKGROUP_SIZE) as u32,
                1,
                batch as u32,
            ],
        )
    }
}

impl Sweeper for BlockSweeper {
    fn problem(&self) -> &Problem {
        &self.problem
    }

    fn matrix(&self) -> (&GpuTensor, usize) {
        (&self.a[0], self.plan.m)
    }

    fn record_sweep(&mut self, rec: &mut Recorder, norms: &[f64], done: &[bool]) -> Result<()> {
        let ctx = rec.context();
        let Problem { batch, n, .. } = self.problem;
        let BlockPlan { blocks, block, m } = self.plan;
        let (h, pair) = (blocks / 2, self.plan.pair());
        // A block pair is solved once its off-diagonal norm is below
        // tol · ‖A‖_F / blocks: when all pairs of a sweep are, A has converged. A
        // matrix already done gets −1: block_solve leaves its pairs alone (identity
        // rotations, exact in the GEMMs), so it ends bitwise as if swept alone.
        let thresholds: Vec<f32> = norms
            .iter()
            .zip(done)
            .map(|(&norm, &done)| match done {
                true => -1.0,
                false => (f64::from(self.tol) * norm / blocks as f64) as f32,
            })
            .collect();
        let thresholds = ctx.upload(&thresholds, &[batch])?;
        // Rᵀ A R is symmetric: the column-panel GEMM computes only its block upper
        // triangle (tiles of slot s from column s·pair on), and the next round's gather
        // reads that part, except after a sweep's last round (whose A the norms and the
        // unpadding read whole) and on windowed buffers (GEMMs cut into windows).
        let windowed = batch * m * m > self.problem.window;
        let mut upper_only = false;
        for round in 0..blocks - 1 {
            let map = match (round, self.sweeps) {
                (0, 0) => 0,
                (0, _) => blocks - 1,
                (r, _) => r,
            } as u32;
            let [a, scratch] = &self.a;
            self.gather(ctx, rec, Move::Round(map, upper_only), a, scratch)?;
            self.gather(ctx, rec, Move::RoundBasis(map), &self.w[0], &self.w[1])?;
            let [s0, s1, s2] = self.problem.windows(ctx, scratch)?;
            rec.dispatch(
                &self.problem.kernel("block_solve"),
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
            let upper_only_next = !windowed && round + 2 < blocks;
            // a = Rᵀ · scratch (row panels of every matrix), then
            // scratch = Rᵀ · aᵀ = Rᵀ A R (per matrix: the column panels of a).
            // Both count entry z = b·h + s as slot s of matrix b (`periodic(h)`).
            let mut rows = Gemm::new(pair, m, pair, false, false)
                .batched(batch * h)
                .periodic(h);
            if upper_only_next {
                // The column-panel GEMM below reads only a's block lower triangle (per
                // matrix: its h row panels).
                rows.lower_to = pair;
            }
            gemm(rec, &rows, &self.rotations, scratch, a)?;
            // Column panel s of matrix b: Bᵀ is the m × pair panel at b·m² + s·pair (a
            // two-level batch, one dispatch for the stack).
            let mut cols = Gemm::new(pair, m, pair, false, true)
                .batched(batch * h)
                .periodic(h);
            cols.stride_b = pair;
            cols.outer_b = m * m;
            cols.ldb = m;
            cols.stride_c = pair * m;
            cols.ldc = m;
            if upper_only_next {
                cols.upper_from = pair;
            }
            gemm(rec, &cols, &self.rotations, a, scratch)?;
            upper_only = upper_only_next;
            let basis = Gemm::new(pair, n, pair, false, false).batched(batch * h);
            gemm(rec, &basis, &self.rotations, &self.w[1], &self.w[0])?;
            self.a.swap(0, 1);
        }
        self.sweeps += 1;
        Ok(())
    }

    fn record_finish(
        &self,
        rec: &mut Recorder,
        sweeps: usize,
        reorthogonalize: bool,
    ) -> Result<(GpuTensor, GpuTensor)> {
        let ctx = rec.context();
        let map = if sweeps == 0 {
            u32::MAX
        } else {
            self.plan.blocks as u32
        };
        self.gather(ctx, rec, Move::Unpad(map), &self.a[0], &self.work.a)?;
        self.gather(ctx, rec, Move::UnpadBasis(map), &self.w[0], &self.work.w)?;
        self.problem
            .record_finish(ctx, rec, &self.work, reorthogonalize)
    }
}

#[cfg(test)]
mod tests {
    use super::BlockPlan;

    /// Applies map row `t` to an arrangement (`arr[i]` = what index `i` holds).
    fn apply(plan: &BlockPlan, maps: &[u32], t: usize, arr: &[usize]) -> Vec<usize> {
        (0..plan.m)
            .map(|i| arr[maps[t * plan.m + i] as usize])
            .collect()
    }

    /// Blocks of at most 16 indices, padding below one index per block, and index maps
    /// that are permutations moving whole blocks so that every pair of every round sits
    /// at adjacent positions, every pair of blocks meets once per sweep, and the last
    /// map restores the natural order (also after a second sweep).
    #[test]
    fn block_maps_pair_every_block_pair_once_per_sweep() {
        for n in [1, 2, 17, 32, 33, 70, 97, 196, 300, 513] {
            let plan = BlockPlan::new(n);
            let BlockPlan { blocks, block, m } = plan;
            assert!(
                block <= 16 && m >= n && m - n < blocks && blocks % 2 == 0,
                "{plan:?}"
            );
            let maps = plan.maps();
            assert_eq!(maps.len(), (blocks + 1) * m);
            for row in maps.chunks(m) {
                let mut seen = row.to_vec();
                seen.sort_unstable();
                assert!(seen.iter().enumerate().all(|(i, &x)| i == x as usize));
            }
            let mut met = vec![vec![0; blocks]; blocks];
            let mut arr: Vec<usize> = (0..m).collect();
            for sweep in 0..2 {
                for round in 0..blocks - 1 {
                    let t = match (round, sweep) {
                        (0, 0) => 0,
                        (0, _) => blocks - 1,
                        (r, _) => r,
                    };
                    arr = apply(&plan, &maps, t, &arr);
                    for slot in 0..blocks / 2 {
                        let at = |k: usize| -> usize {
                            let first = arr[k * block] / block;
                            assert!((0..block).all(|l| arr[k * block + l] == first * block + l));
                            first
                        };
                        let (p, q) = (at(2 * slot), at(2 * slot + 1));
                        met[p.min(q)][p.max(q)] += 1;
                    }
                }
            }
            for (p, row) in met.iter().enumerate() {
                for (q, &count) in row.iter().enumerate().skip(p + 1) {
                    assert_eq!(count, 2, "n = {n}: blocks {p}, {q}");
                }
            }
            assert_eq!(
                apply(&plan, &maps, blocks, &arr),
                (0..m).collect::<Vec<_>>()
            );
        }
    }
}
