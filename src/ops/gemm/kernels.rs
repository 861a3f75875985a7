//! The GEMM kernels' dispatches on operands that each fit one binding: the tiled
//! kernels (with split-K) and the matrix-vector kernels, with their parameters.

use super::{Gemm, MAX_GROUPS, TILE};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;

kernel_params! {
    /// The tiled GEMM entry points `gemm_<a><b>`: `C = α·op(A)·op(B) + β·C` on an
    /// `m × n × k` part; matrix `z` of the grid starts at `offset + z·stride` in each
    /// operand, or `offset + (z / period)·outer + (z mod period)·stride` with a nonzero
    /// `period` (leading dimensions `lda`, `ldb`, `ldc`). Split-K cuts K into `splits`
    /// slices of `k_split` values (a multiple of the kernel's BK) and writes the
    /// partial product of slice `s` of batch entry `b` to C matrix `b·splits + s`;
    /// without split-K `splits = 1` and `k_split ≥ k`.
    pub struct GemmParams {
        m: u32,
        n: u32,
        k: u32,
        lda: u32,
        ldb: u32,
        ldc: u32,
        offset_a: u32,
        offset_b: u32,
        offset_c: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        alpha: f32,
        beta: f32,
        splits: u32,
        k_split: u32,
        /// [`Gemm::upper_from`].
        upper_from: u32,
        /// [`Gemm::lower_to`].
        lower_to: u32,
        /// [`Gemm::period`] (never with split-K).
        period: u32,
        outer_a: u32,
        outer_b: u32,
        outer_c: u32,
    }
}

kernel_params! {
    /// `split_k_sum`: `C[b] = α·Σ_{s < splits} P[b·splits + s] + β·C[b]` for the
    /// packed `m × n` partial products `P`; C matrix `b` at `offset_c + b·stride_c`,
    /// row length `ldc`.
    pub struct SplitKSumParams {
        m: u32,
        n: u32,
        batch: u32,
        splits: u32,
        ldc: u32,
        offset_c: u32,
        stride_c: u32,
        alpha: f32,
        beta: f32,
    }
}

kernel_params! {
    /// `gemv_t` and `gemv_n`: `y = α·M·x + β·y` over `outputs` entries of `y`, inner
    /// dimension `k` (cut into `splits` slices of `k_split` as for split-K). `M` has
    /// leading dimension `ld_m`; `x` steps by `inc_x`, `y` by `inc_y`; matrix `z` of the
    /// grid starts at `offset + z·stride` in each.
    pub struct GemvParams {
        outputs: u32,
        k: u32,
        ld_m: u32,
        offset_m: u32,
        stride_m: u32,
        offset_x: u32,
        inc_x: u32,
        stride_x: u32,
        offset_y: u32,
        inc_y: u32,
        stride_y: u32,
        alpha: f32,
        beta: f32,
        splits: u32,
        k_split: u32,
    }
}

/// Values of K a workgroup of the 64×64 kernel stages at a time (`BK` in the shader;
/// the 32×32 and 16×16 kernels stage 8 and 4, so K slices on multiples of 16 suit all).
const BK: usize = 16;
/// Rows and columns of C one workgroup of the narrow kernel computes (64 invocations).
pub(super) const NARROW_TILE: usize = 32;
/// Rows and columns of C one workgroup of the small kernel computes (16 invocations).
pub(super) const SMALL_TILE: usize = 16;

/// The C tile of `g`'s workgroups, from the shape alone: [`SMALL_TILE`] when `m` and
/// `n` are both at most 16 (attention's per-head products), else [`NARROW_TILE`] when
/// `m` or `n` is at most 32 (the blocked Jacobi's `pair × n` rotations), else [`TILE`];
/// a 64×64 tile would leave most of its invocations idle on such products. Every tile
/// adds each output's products in the same order (k ascending, one fma each), so the
/// choice does not change a result.
pub(super) fn tile_of(g: &Gemm) -> usize {
    if g.m.max(g.n) <= SMALL_TILE {
        SMALL_TILE
    } else if g.m.min(g.n) <= NARROW_TILE {
        NARROW_TILE
    } else {
        TILE
    }
}
/// Products with `1 ≤ K ≤ SHORT_K_MAX` run the `gemm_short_*` kernels: the tile and grid
/// of [`tile_of`], but no workgroup memory and no barrier; each invocation computes an
/// 8×8 block of C from its rows of op(A) and columns of op(B) read straight from
/// storage (a few KiB with K ≤ 32, cache-resident). They add each output's products in
/// the same order as the staged kernels, so results are bitwise the same. Why: the
/// blocked Jacobi's rotations (`L × m` panels times an `L × L` rotation, `L` = 28 or 32)
/// and the QR step's `T·W` and `V·TW` (K = the panel width, ≤ 32) staged K through
/// workgroup memory (32×32 tiles: 8 values at a time, for K = 32 4 slices of 2 barriers
/// each) and did 2 loads of workgroup memory per 16 multiply-adds; a CPU
/// driver such as lavapipe pays for every barrier and runs every such load one
/// invocation at a time. Measured on lavapipe (2 cores shared with other work, load
/// average 5–7), per-dispatch profile of `bench --quick`'s eigendecompositions, medians
/// of 3 alternating runs: mlp's 486 short-K calls 1.06 → 0.45 ms each, cnn's 376 calls
/// 1.17 → 0.64 ms. The factor pass's long-K products keep the staged kernels.
pub(super) const SHORT_K_MAX: usize = 32;
/// Split-K aims for about this many workgroups...
const SPLIT_TARGET_GROUPS: usize = 512;
/// ...giving each K slice at least this many values...
const SPLIT_MIN_K: usize = 256;
/// ...in at most this many slices.
const MAX_SPLITS: usize = 64;

/// The split-K plan `(slices, values of K per slice)`. A problem with few tiles of C
/// and a long K (a covariance `AᵀA` over many rows, a `1 × n` sum over rows) would
/// occupy only a few workgroups; cutting K into slices whose partial products are then
/// added in slice order fills the GPU. The plan depends only on the shape, so results
/// stay deterministic; tiles are counted as 64×64 whichever kernel runs, so the plan
/// (and every result) is the same for every tile. The partial products take at most about
/// `2·SPLIT_TARGET_GROUPS` tiles of 64×64 floats (16 MiB), and at most `max_partial`
/// elements (one storage binding).
fn k_slices(g: &Gemm, max_partial: usize) -> (usize, usize) {
    let tiles = g.batch * g.m.div_ceil(TILE) * g.n.div_ceil(TILE);
    let wanted = SPLIT_TARGET_GROUPS
        .div_ceil(tiles)
        .min(g.k / SPLIT_MIN_K)
        .min(MAX_SPLITS)
        .min(max_partial / (g.batch * g.m * g.n));
    if wanted <= 1 {
        return (1, g.k);
    }
    let k_split = g.k.div_ceil(wanted).next_multiple_of(BK);
    (g.k.div_ceil(k_split), k_split)
}

/// An `m × n` part of `g` whose matrices start at `offsets` (A, B, C), writing C with
/// row length `ldc`, batch stride `stride_c` and the given `α`, `β` and K slices.
struct Part {
    m: usize,
    n: usize,
    offsets: [usize; 3],
    ldc: usize,
    stride_c: usize,
    alpha: f32,
    beta: f32,
    splits: usize,
    k_split: usize,
}

impl Part {
    fn params(&self, g: &Gemm) -> GemmParams {
        GemmParams {
            m: self.m as u32,
            n: self.n as u32,
            k: g.k as u32,
            lda: g.lda as u32,
            ldb: g.ldb as u32,
            ldc: self.ldc as u32,
            offset_a: self.offsets[0] as u32,
            offset_b: self.offsets[1] as u32,
            offset_c: self.offsets[2] as u32,
            stride_a: g.stride_a as u32,
            stride_b: g.stride_b as u32,
            stride_c: self.stride_c as u32,
            alpha: self.alpha,
            beta: self.beta,
            splits: self.splits as u32,
            k_split: self.k_split as u32,
            upper_from: g.upper_from as u32,
            lower_to: g.lower_to as u32,
            period: g.period as u32,
            outer_a: g.outer_a as u32,
            outer_b: g.outer_b as u32,
            outer_c: g.outer_c as u32,
        }
    }
}

/// Records `g` on operands that each fit one binding. With [`Gemm::period`], the
/// matrix-vector kernels, split-K (planned for one group of `period` entries) and a
/// period beyond one grid dimension run one group per dispatch.
pub(super) fn gemm_kernel(rec: &mut Recorder, g: &Gemm, [a, b, c]: [&GpuTensor; 3]) -> Result<()> {
    let max_partial = rec.context().binding_elements().0;
    if g.period != 0
        && (g.m == 1
            || g.n == 1
            || g.period > MAX_GROUPS
            || k_slices(
                &Gemm {
                    batch: g.batch.min(g.period),
                    ..g.clone()
                },
                max_partial,
            )
            .0 > 1)
    {
        return g
            .groups()
            .try_for_each(|group| gemm_kernel(rec, &group, [a, b, c]));
    }
    if g.m == 1 || g.n == 1 {
        return gemv(rec, g, [a, b, c]);
    }
    let [layout_a, layout_b, layout_c] = g.layouts();
    let [(_, a_cols), (_, b_cols), _] = g.stored();
    let vec_a = g.vec4_ok(a_cols, layout_a);
    let short = (1..=SHORT_K_MAX).contains(&g.k);
    let vec_b = g.vec4_ok(b_cols, layout_b);
    let entry = match (short, vec_a, vec_b) {
        (false, true, true) => "gemm_vv",
        (false, true, false) => "gemm_vs",
        (false, false, true) => "gemm_sv",
        (false, false, false) => "gemm_ss",
        (true, true, true) => "gemm_short_vv",
        (true, true, false) => "gemm_short_vs",
        (true, false, true) => "gemm_short_sv",
        (true, false, false) => "gemm_short_ss",
    };
    let tile = tile_of(g);
    let mut kernel = Kernel::new(&crate::ops::GEMM, entry)
        .with("TRANS_A", f64::from(u8::from(g.trans_a)))
        .with("TRANS_B", f64::from(u8::from(g.trans_b)));
    if tile != TILE {
        kernel = kernel.with("TILE", tile as f64);
    }
    let (splits, k_split) = k_slices(g, max_partial);
    if g.upper_from != 0 || g.lower_to != 0 {
        return gemm_triangle(rec, g, &kernel, tile, [a, b, c], splits);
    }
    if splits > 1 {
        return gemm_split_k(rec, g, &kernel, tile, [a, b, c], splits, k_split);
    }
    // Element steps of A, B and C per row of C and per column of C.
    let a_row = if g.trans_a { 1 } else { g.lda };
    let b_col = if g.trans_b { g.ldb } else { 1 };
    let rows_per_chunk = MAX_GROUPS * tile;
    // Chunks of the batch start on group boundaries.
    let batch_per_chunk = match g.period {
        0 => MAX_GROUPS,
        period => MAX_GROUPS / period * period,
    };
    for b0 in (0..g.batch).step_by(batch_per_chunk) {
        let batch = (g.batch - b0).min(batch_per_chunk);
        let [base_a, base_b, base_c] =
            [layout_a, layout_b, layout_c].map(|l| g.start(l, b0) as usize);
        for m0 in (0..g.m).step_by(rows_per_chunk) {
            let m = (g.m - m0).min(rows_per_chunk);
            for n0 in (0..g.n).step_by(rows_per_chunk) {
                let n = (g.n - n0).min(rows_per_chunk);
                let part = Part {
                    m,
                    n,
                    offsets: [
                        base_a + m0 * a_row,
                        base_b + n0 * b_col,
                        base_c + m0 * g.ldc + n0,
                    ],
                    ldc: g.ldc,
                    stride_c: g.stride_c,
                    alpha: g.alpha,
                    beta: g.beta,
                    splits: 1,
                    k_split: g.k,
                };
                let groups = [
                    n.div_ceil(tile) as u32,
                    m.div_ceil(tile) as u32,
                    batch as u32,
                ];
                rec.dispatch(&kernel, &[a, b], &[c], &part.params(g), groups)?;
            }
        }
    }
    Ok(())
}

/// [`Gemm::upper_from`], [`Gemm::lower_to`]: one dispatch whose grid is the tiles each
/// batch entry needs (one row tile per entry; entry `z`, counted modulo
/// [`Gemm::period`] when set, from column tile `z · upper_from / tile` on, up to
/// the tile that holds column `(z + 1) · lower_to − 1`), as the shader's `grid_position`
/// decodes it.
fn gemm_triangle(
    rec: &mut Recorder,
    g: &Gemm,
    kernel: &Kernel,
    tile: usize,
    [a, b, c]: [&GpuTensor; 3],
    splits: usize,
) -> Result<()> {
    let tiles = g.n.div_ceil(tile);
    let within = |z: usize| match g.period {
        0 => z,
        period => z % period,
    };
    let first = |z: usize| within(z) * g.upper_from / tile;
    let end = |z: usize| match g.lower_to {
        0 => tiles,
        l => tiles.min(((within(z) + 1) * l).div_ceil(tile)),
    };
    if splits > 1 || g.m > tile || (0..g.batch).any(|z| first(z) >= end(z)) {
        return Err(Error::gpu(
            "gemm",
            format!(
                "upper_from and lower_to need one row tile, no split-K and some columns of \
                 every entry: {g:?}"
            ),
        ));
    }
    let groups: usize = (0..g.batch).map(|z| end(z) - first(z)).sum();
    if groups > MAX_GROUPS {
        return Err(Error::gpu(
            "gemm",
            format!("the {groups} tiles needed exceed one grid row: {g:?}"),
        ));
    }
    let part = Part {
        m: g.m,
        n: g.n,
        offsets: [g.offset_a, g.offset_b, g.offset_c],
        ldc: g.ldc,
        stride_c: g.stride_c,
        alpha: g.alpha,
        beta: g.beta,
        splits: 1,
        k_split: g.k,
    };
    rec.dispatch(
        kernel,
        &[a, b],
        &[c],
        &part.params(g),
        [groups as u32, 1, 1],
    )
}

/// Split-K: the partial product of K slice `s` of batch entry `b` goes to packed
/// matrix `b·splits + s` of a temporary, then `split_k_sum` adds the slices in order
/// into C. The plan of [`k_slices`] keeps the grid far below 65535 in every dimension.
fn gemm_split_k(
    rec: &mut Recorder,
    g: &Gemm,
    kernel: &Kernel,
    tile: usize,
    [a, b, c]: [&GpuTensor; 3],
    splits: usize,
    k_split: usize,
) -> Result<()> {
    let (m, n) = (g.m, g.n);
    let partial = rec.context().zeros(&[g.batch * splits, m, n])?;
    let part = Part {
        m,
        n,
        offsets: [g.offset_a, g.offset_b, 0],
        ldc: n,
        stride_c: m * n,
        alpha: 1.0,
        beta: 0.0,
        splits,
        k_split,
    };
    let groups = [
        n.div_ceil(tile) as u32,
        m.div_ceil(tile) as u32,
        (g.batch * splits) as u32,
    ];
    rec.dispatch(kernel, &[a, b], &[&partial], &part.params(g), groups)?;
    split_k_sum(rec, g, &partial, c, splits)
}

/// Outputs one `gemv_t` workgroup computes (the outputs are contiguous in M).
const GEMV_T_OUTPUTS: usize = 64;
/// Outputs one `gemv_n` workgroup computes (each a dot product along a row of M).
const GEMV_N_OUTPUTS: usize = 4;
/// A K slice of a matrix-vector product has at least this many values.
const GEMV_MIN_K: usize = 1024;

/// `m = 1` or `n = 1`: the product is `y = α·M·x + β·y`, computed by the `gemv_*`
/// kernels (a 64×64 tile would do 64 times the work). For `m = 1`, y is row 0 of C,
/// x is row 0 of `op(A)` and `M = op(B)ᵀ`; for `n = 1`, y is column 0 of C, x is
/// column 0 of `op(B)` and `M = op(A)`. Long K is cut into slices as for split-K.
fn gemv(rec: &mut Recorder, g: &Gemm, [a, b, c]: [&GpuTensor; 3]) -> Result<()> {
    struct Operands {
        outputs: usize,
        // Whether consecutive outputs are consecutive elements of M.
        contiguous: bool,
        matrix_is_b: bool,
        ld_m: usize,
        offset_m: usize,
        stride_m: usize,
        offset_x: usize,
        inc_x: usize,
        stride_x: usize,
        inc_y: usize,
    }
    let o = if g.m == 1 {
        Operands {
            outputs: g.n,
            contiguous: !g.trans_b,
            matrix_is_b: true,
            ld_m: g.ldb,
            offset_m: g.offset_b,
            stride_m: g.stride_b,
            offset_x: g.offset_a,
            inc_x: if g.trans_a { g.lda } else { 1 },
            stride_x: g.stride_a,
            inc_y: 1,
        }
    } else {
        Operands {
            outputs: g.m,
            contiguous: g.trans_a,
            matrix_is_b: false,
            ld_m: g.lda,
            offset_m: g.offset_a,
            stride_m: g.stride_a,
            offset_x: g.offset_b,
            inc_x: if g.trans_b { 1 } else { g.ldb },
            stride_x: g.stride_b,
            inc_y: g.ldc,
        }
    };
    let (entry, per_group) = if o.contiguous {
        ("gemv_t", GEMV_T_OUTPUTS)
    } else {
        ("gemv_n", GEMV_N_OUTPUTS)
    };
    let kernel = Kernel::new(&crate::ops::GEMM, entry)
        .with("MATRIX_IS_B", f64::from(u8::from(o.matrix_is_b)));
    let groups = o.outputs.div_ceil(per_group);
    let splits = SPLIT_TARGET_GROUPS
        .div_ceil(g.batch * groups)
        .min(g.k / GEMV_MIN_K)
        .min(rec.context().binding_elements().0 / (g.batch * o.outputs))
        .clamp(1, MAX_SPLITS);
    let k_split = g.k.div_ceil(splits);
    let splits = if splits > 1 { g.k.div_ceil(k_split) } else { 1 };
    let [gx, gy, _] = grid_1d(groups as u32);
    let params =
        |offset_m: usize, offset_x: usize, y: [usize; 3], alpha: f32, beta: f32| GemvParams {
            outputs: o.outputs as u32,
            k: g.k as u32,
            ld_m: o.ld_m as u32,
            offset_m: offset_m as u32,
            stride_m: o.stride_m as u32,
            offset_x: offset_x as u32,
            inc_x: o.inc_x as u32,
            stride_x: o.stride_x as u32,
            offset_y: y[0] as u32,
            inc_y: y[1] as u32,
            stride_y: y[2] as u32,
            alpha,
            beta,
            splits: splits as u32,
            k_split: k_split as u32,
        };
    if splits == 1 {
        for b0 in (0..g.batch).step_by(MAX_GROUPS) {
            let batch = (g.batch - b0).min(MAX_GROUPS);
            let w = params(
                o.offset_m + b0 * o.stride_m,
                o.offset_x + b0 * o.stride_x,
                [g.offset_c + b0 * g.stride_c, o.inc_y, g.stride_c],
                g.alpha,
                g.beta,
            );
            rec.dispatch(&kernel, &[a, b], &[c], &w, [gx, gy, batch as u32])?;
        }
        return Ok(());
    }
    // Few groups, long K: at most SPLIT_TARGET_GROUPS·2 slices of groups in all, far
    // below the grid limit.
    let partial = rec.context().zeros(&[g.batch * splits, o.outputs])?;
    let w = params(o.offset_m, o.offset_x, [0, 1, o.outputs], 1.0, 0.0);
    let z = (g.batch * splits) as u32;
    rec.dispatch(&kernel, &[a, b], &[&partial], &w, [gx, gy, z])?;
    split_k_sum(rec, g, &partial, c, splits)
}

/// Records `C[b] = α·Σ_s P[b·splits + s] + β·C[b]` for the packed `m × n` partial
/// products P of split-K.
fn split_k_sum(
    rec: &mut Recorder,
    g: &Gemm,
    partial: &GpuTensor,
    c: &GpuTensor,
    splits: usize,
) -> Result<()> {
    let params = SplitKSumParams {
        m: g.m as u32,
        n: g.n as u32,
        batch: g.batch as u32,
        splits: splits as u32,
        ldc: g.ldc as u32,
        offset_c: g.offset_c as u32,
        stride_c: g.stride_c as u32,
        alpha: g.alpha,
        beta: g.beta,
    };
    let len = g.batch * g.m * g.n;
    rec.dispatch(
        &Kernel::new(&crate::ops::GEMM, "split_k_sum"),
        &[partial],
        &[c],
        &params,
        grid_1d(len.div_ceil(256) as u32),
    )
}
