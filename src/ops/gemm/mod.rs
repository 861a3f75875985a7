//! Batched row-major f32 GEMM: `C = α·op(A)·op(B) + β·C` (`shaders/gemm.wgsl`).
//!
//! `op(A)` is `m × k` and `op(B)` is `k × n`. Without transposition A is stored
//! `m × k` (row length `lda ≥ k`); transposed it is stored `k × m` (`lda ≥ m`).
//! B is stored `k × n` (`ldb ≥ n`) or transposed `n × k` (`ldb ≥ k`). C is `m × n`
//! (`ldc ≥ n`). Matrix `b` of a batch starts at element `offset + b·stride` of its
//! tensor, so a caller can address a sub-matrix or a chunk of a larger tensor without
//! copying; a batch stride of 0 broadcasts one matrix over the batch. A two-level batch
//! ([`Gemm::period`]) starts matrix `b` at `offset + (b / period)·outer + (b mod
//! period)·stride`: panels of a stack of matrices in one product.
//!
//! [`gemm`] picks the kernel from the shape alone (so results are deterministic):
//! 64×64 register-tiled workgroups (32×32 ones when `m` or `n` is at most 32, 16×16
//! ones when both are at most 16) with vec4 or scalar loads per operand; split-K when
//! there are few tiles and a long K; matrix-vector kernels when `m = 1` or `n = 1`.
//! Products with `K ≤ 32` (the blocked Jacobi's rotations, the QR step's `T·W` and
//! `V·TW`) run short-K kernels on the same tiles: no workgroup memory and no barrier,
//! each invocation an 8×8 block of C from operands read straight from storage, about
//! twice as fast on lavapipe (see `kernels::SHORT_K_MAX`). Every kernel adds each
//! output's products in the same order (k ascending, one fma each), so the choice never
//! changes a bit of a result.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};

mod kernels;

use kernels::gemm_kernel;
pub use kernels::{GemmParams, GemvParams, SplitKSumParams};

/// Rows and columns of C one workgroup computes.
const TILE: usize = 64;
/// WebGPU's default limit of workgroups per grid dimension; larger problems are split.
const MAX_GROUPS: usize = 65535;

/// One (batched) GEMM `C[b] = α·op(A[b])·op(B[b]) + β·C[b]`, in elements of the
/// tensors' flat row-major storage. Build it with [`Gemm::new`] (packed matrices,
/// `α = 1`, `β = 0`, batch 1) and adjust fields or use the builder methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemm {
    /// Rows of `op(A)` and of C.
    pub m: usize,
    /// Columns of `op(B)` and of C.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// `op(A) = Aᵀ`: A is stored `k × m`.
    pub trans_a: bool,
    /// `op(B) = Bᵀ`: B is stored `n × k`.
    pub trans_b: bool,
    pub alpha: f32,
    /// 0 overwrites C without reading it (C may hold garbage, NaN included).
    pub beta: f32,
    /// Number of matrix products.
    pub batch: usize,
    /// Elements between consecutive matrices of A; 0 broadcasts one A.
    pub stride_a: usize,
    /// Elements between consecutive matrices of B; 0 broadcasts one B.
    pub stride_b: usize,
    /// Elements between consecutive matrices of C.
    pub stride_c: usize,
    /// Element index of `A[0][0, 0]` in its tensor.
    pub offset_a: usize,
    pub offset_b: usize,
    pub offset_c: usize,
    /// Row length of A as stored (`≥ k`, or `≥ m` when transposed).
    pub lda: usize,
    /// Row length of B as stored (`≥ n`, or `≥ k` when transposed).
    pub ldb: usize,
    /// Row length of C (`≥ n`).
    pub ldc: usize,
    /// 0, or: batch entry `z` needs only the columns of C from `z · upper_from` on (a
    /// block upper triangle, e.g. of a symmetric result), and tiles of C whose columns
    /// all lie before that are skipped, keeping C's values there. Products that take
    /// split-K, more than one dispatch or binding windows refuse it.
    pub upper_from: usize,
    /// 0, or: batch entry `z` needs only the columns of C before `(z + 1) · lower_to` (a
    /// block lower triangle), likewise.
    pub lower_to: usize,
    /// 0, or: the batch is a stack of groups of `period` entries (the last may be
    /// shorter), e.g. the `period` panels of each of a stack of matrices. Matrix `z` of
    /// operand X starts at `offset_x + (z / period)·outer_x + (z mod period)·stride_x`,
    /// and the block triangles of `upper_from` and `lower_to` count entry `z` as
    /// `z mod period`. [`Gemm::periodic`] sets `outer_x = period·stride_x` (the one-level
    /// layout). Matrix-vector products and products that take split-K (planned for one
    /// group, so that the result is bitwise that of the groups recorded one by one) run
    /// one group per dispatch; binding windows cut the batch on group boundaries.
    pub period: usize,
    /// Elements between consecutive groups of `period` matrices of A (with `period`).
    pub outer_a: usize,
    /// Elements between consecutive groups of B.
    pub outer_b: usize,
    /// Elements between consecutive groups of C.
    pub outer_c: usize,
}

impl Gemm {
    /// `C = op(A)·op(B)` for packed row-major matrices: one product, no offsets,
    /// `α = 1`, `β = 0`.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Self {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            offset_a: 0,
            offset_b: 0,
            offset_c: 0,
            lda: if trans_a { m } else { k },
            ldb: if trans_b { k } else { n },
            ldc: n,
            upper_from: 0,
            lower_to: 0,
            period: 0,
            outer_a: 0,
            outer_b: 0,
            outer_c: 0,
        }
    }

    /// `batch` products of consecutive packed matrices (strides `m·k`, `k·n`, `m·n`).
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    /// Groups of `period` entries ([`Gemm::period`]) in the current batch strides' layout
    /// (`outer_x = period·stride_x`); adjust the strides afterwards for two levels.
    pub fn periodic(mut self, period: usize) -> Self {
        self.period = period;
        self.outer_a = period * self.stride_a;
        self.outer_b = period * self.stride_b;
        self.outer_c = period * self.stride_c;
        self
    }

    /// Sets `α` and `β`.
    pub fn scaled(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    /// Floating-point operations of the product: `2·k` per entry of C it computes, so
    /// `2·batch·m·n·k` without block triangles; with [`Gemm::upper_from`] or
    /// [`Gemm::lower_to`] only the columns each batch entry needs count (tiles that
    /// straddle a triangle's edge compute a few more).
    pub fn flops(&self) -> f64 {
        let per_column = 2.0 * self.m as f64 * self.k as f64;
        if self.upper_from == 0 && self.lower_to == 0 {
            return per_column * self.batch as f64 * self.n as f64;
        }
        // Entry z's columns depend on z mod period only: count each residue once.
        let (residues, period) = match self.period {
            0 => (self.batch, self.batch.max(1)),
            p => (p.min(self.batch), p),
        };
        let columns: f64 = (0..residues)
            .map(|z| {
                let from = (z * self.upper_from).min(self.n);
                let to = match self.lower_to {
                    0 => self.n,
                    l => ((z + 1) * l).min(self.n),
                };
                let entries = self.batch / period + usize::from(z < self.batch % period);
                to.saturating_sub(from) as f64 * entries as f64
            })
            .sum();
        per_column * columns
    }

    /// Stored shape (rows, columns) of A, B and C.
    fn stored(&self) -> [(usize, usize); 3] {
        let a = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [a, b, (self.m, self.n)]
    }

    /// Checks leading dimensions and that every element addressed lies inside the
    /// tensors, and that every index fits the kernel's 32-bit arithmetic.
    fn validate(&self, a: &GpuTensor, b: &GpuTensor, c: &GpuTensor) -> Result<()> {
        let fail = |msg: String| Err(Error::gpu("gemm", msg));
        if std::ptr::eq(a, c) || std::ptr::eq(b, c) {
            return fail("C must not be the same tensor as A or B".into());
        }
        for (((name, t), [ld, _, stride, outer]), ((rows, cols), extent)) in ["A", "B", "C"]
            .into_iter()
            .zip([a, b, c])
            .zip(self.layouts())
            .zip(self.stored().into_iter().zip(self.extents()))
        {
            if ld < cols {
                return fail(format!(
                    "{name} is stored {rows}×{cols} but its leading dimension is {ld} < {cols} \
                     ({self:?})"
                ));
            }
            let Some((_, last)) = extent else {
                continue;
            };
            if last >= t.len() as u128 {
                return fail(format!(
                    "{name} needs elements up to index {last}, but its tensor {:?} has {} \
                     ({self:?})",
                    t.shape(),
                    t.len()
                ));
            }
            if last > u32::MAX as u128 || [ld, stride, outer].iter().any(|&x| x > u32::MAX as usize)
            {
                return fail(format!(
                    "{name} spans {} elements, beyond the kernel's 32-bit indices",
                    last + 1
                ));
            }
        }
        let span = (self.m - 1) * self.ldc + self.n;
        let per_group = match self.period {
            0 => self.batch,
            period => self.batch.min(period),
        };
        if per_group > 1 && self.stride_c < span {
            return fail(format!(
                "the {} matrices of C overlap: stride_c {} < {span} ({self:?})",
                self.batch, self.stride_c
            ));
        }
        let group_span = (per_group - 1) * self.stride_c + span;
        if self.batch > per_group && self.outer_c < group_span {
            return fail(format!(
                "the groups of period {} matrices of C overlap: outer_c {} < {group_span} \
                 ({self:?})",
                self.period, self.outer_c
            ));
        }
        Ok(())
    }

    /// Whether an operand stored with rows of `cols` values and laid out as
    /// `[leading dimension, offset, batch stride, group stride]` can be loaded as vec4s.
    fn vec4_ok(&self, cols: usize, [ld, offset, stride, outer]: [usize; 4]) -> bool {
        cols.is_multiple_of(4)
            && ld.is_multiple_of(4)
            && offset.is_multiple_of(4)
            && (self.batch == 1 || stride.is_multiple_of(4))
            && (self.period == 0 || self.batch <= self.period || outer.is_multiple_of(4))
    }

    /// Element index of matrix `z` of an operand laid out `[_, offset, stride, outer]`
    /// (see [`Gemm::period`]), in u128 so that invalid parameters cannot overflow.
    fn start(&self, [_, offset, stride, outer]: [usize; 4], z: usize) -> u128 {
        let (group, within) = match self.period {
            0 => (0, z),
            period => (z / period, z % period),
        };
        offset as u128 + group as u128 * outer as u128 + within as u128 * stride as u128
    }

    /// The groups of `period` entries ([`Gemm::period`]) as one-level products, in order.
    fn groups(&self) -> impl Iterator<Item = Gemm> + '_ {
        (0..self.batch).step_by(self.period).map(|z| {
            let [a, b, c] = self.layouts().map(|l| self.start(l, z) as usize);
            Gemm {
                batch: self.period.min(self.batch - z),
                period: 0,
                offset_a: a,
                offset_b: b,
                offset_c: c,
                ..self.clone()
            }
        })
    }
}

/// Records `C = α·op(A)·op(B) + β·C` as described by `g`. Returns an error, and records
/// nothing, if a matrix would reach outside its tensor or C aliases A or B.
///
/// Products with `m = 1` or `n = 1` run as matrix-vector products. Problems with few
/// tiles of C (or few outputs) and a long K run split-K: the K slices' partial products
/// go to a temporary (allocated on the recorder's context) and a second dispatch adds
/// them in a fixed order. The plan depends only on the shape, so results are
/// deterministic. Problems whose grid would exceed 65535 workgroups in a dimension are
/// split into several dispatches.
///
/// Operands larger than one storage binding (the adapter's
/// `max_storage_buffer_binding_size`, e.g. a factor of more than about 5790 rows on
/// WebGPU's default 128 MiB) are bound as windows of their buffers: the product is cut
/// in halves (the batch first, in whole groups of [`Gemm::period`] while there are
/// several, then the dimension along the stored rows of the operand
/// that does not fit, or along its columns once one row is left; K parts after the
/// first accumulate with `β = 1`) until the elements every part addresses fit one
/// binding.
pub fn gemm(
    rec: &mut Recorder,
    g: &Gemm,
    a: &GpuTensor,
    b: &GpuTensor,
    c: &GpuTensor,
) -> Result<()> {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    g.validate(a, b, c)?;
    gemm_in_windows(rec, g, [a, b, c])?;
    rec.count_flops(g.flops() as u64);
    Ok(())
}

/// Which dimension of a product to cut.
#[derive(Clone, Copy)]
enum Cut {
    Batch,
    M,
    N,
    K,
}

impl Gemm {
    /// `[leading dimension, offset, batch stride, group stride]` of A, B and C.
    fn layouts(&self) -> [[usize; 4]; 3] {
        [
            [self.lda, self.offset_a, self.stride_a, self.outer_a],
            [self.ldb, self.offset_b, self.stride_b, self.outer_b],
            [self.ldc, self.offset_c, self.stride_c, self.outer_c],
        ]
    }

    /// First and last element of A, B and C the product addresses (`None` for an empty
    /// operand), in u128 so that invalid parameters cannot overflow.
    fn extents(&self) -> [Option<(u128, u128)>; 3] {
        let mut out = [None; 3];
        for (e, (layout, (rows, cols))) in out
            .iter_mut()
            .zip(self.layouts().into_iter().zip(self.stored()))
        {
            if rows > 0 && cols > 0 && self.batch > 0 {
                // The last matrix starts last, or (two levels) the last of the group before.
                let last_group = match self.period {
                    0 => 0,
                    period => (self.batch - 1) / period * period,
                };
                let last_start = self
                    .start(layout, self.batch - 1)
                    .max(self.start(layout, last_group.saturating_sub(1)));
                let last = last_start + (rows - 1) as u128 * layout[0] as u128 + cols as u128 - 1;
                *e = Some((layout[1] as u128, last));
            }
        }
        out
    }

    /// The two halves of the product cut along `cut` at `at`. A batch cut with
    /// [`Gemm::period`] lies on a group boundary or inside the only group.
    fn cut(&self, cut: Cut, at: usize) -> (Self, Self) {
        let (mut first, mut second) = (self.clone(), self.clone());
        match cut {
            Cut::Batch => {
                first.batch = at;
                second.batch -= at;
                [second.offset_a, second.offset_b, second.offset_c] =
                    self.layouts().map(|l| self.start(l, at) as usize);
            }
            Cut::M => {
                first.m = at;
                second.m -= at;
                second.offset_a += at * if self.trans_a { 1 } else { self.lda };
                second.offset_c += at * self.ldc;
            }
            Cut::N => {
                first.n = at;
                second.n -= at;
                second.offset_b += at * if self.trans_b { self.ldb } else { 1 };
                second.offset_c += at;
            }
            Cut::K => {
                first.k = at;
                second.k -= at;
                second.offset_a += at * if self.trans_a { self.lda } else { 1 };
                second.offset_b += at * if self.trans_b { 1 } else { self.ldb };
                second.beta = 1.0;
            }
        }
        (first, second)
    }
}

/// Records `g` with every operand bound as a window that fits one storage binding,
/// cutting the product in halves until it does (see [`gemm`]).
fn gemm_in_windows(rec: &mut Recorder, g: &Gemm, operands: [&GpuTensor; 3]) -> Result<()> {
    let ctx = rec.context();
    let mut windowed = g.clone();
    let mut views = Vec::with_capacity(3);
    let mut misfit = None;
    for (i, (t, extent)) in operands.into_iter().zip(g.extents()).enumerate() {
        // An empty operand is never read: its first element (or the tensor) will do.
        let (first, last) = extent.map_or((0, 0), |(f, l)| (f as usize, l as usize));
        match ctx.binding_window(t, first, last + 1 - first) {
            Ok((view, start)) => {
                views.push(view);
                match i {
                    0 => windowed.offset_a -= start,
                    1 => windowed.offset_b -= start,
                    _ => windowed.offset_c -= start,
                }
            }
            Err(Error::Memory(_)) => {
                misfit = Some(i);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let Some(which) = misfit else {
        return gemm_kernel(rec, &windowed, [&views[0], &views[1], &views[2]]);
    };
    if g.upper_from != 0 || g.lower_to != 0 {
        return Err(Error::gpu(
            "gemm",
            format!("upper_from and lower_to need operands that fit one binding: {g:?}"),
        ));
    }
    let limit = ctx.binding_elements().0;
    // The dimensions along the stored rows and columns of the operand that does not
    // fit: cutting its rows shrinks its span, cutting its columns does once one row is
    // left.
    let (rows, cols) = match which {
        0 if g.trans_a => (Cut::K, Cut::M),
        0 => (Cut::M, Cut::K),
        1 if g.trans_b => (Cut::N, Cut::K),
        1 => (Cut::K, Cut::N),
        _ => (Cut::M, Cut::N),
    };
    // With two levels the batch is cut into whole groups while there are several.
    let group = if g.period != 0 && g.batch > g.period {
        g.period
    } else {
        1
    };
    let size = |cut| match cut {
        Cut::Batch => g.batch.div_ceil(group),
        Cut::M => g.m,
        Cut::N => g.n,
        Cut::K => g.k,
    };
    let cut = [Cut::Batch, rows, cols]
        .into_iter()
        .find(|&cut| size(cut) > 1)
        .unwrap_or(cols);
    let size = size(cut);
    if size < 2 {
        return Err(Error::Memory(format!(
            "an element of {} of a matrix product cannot be bound in \
             max_storage_buffer_binding_size ({} bytes): {g:?}",
            ["A", "B", "C"][which],
            limit * 4
        )));
    }
    // Halves on multiples of the tile where the dimension allows.
    let at = if size > 2 * TILE {
        (size / 2).next_multiple_of(TILE)
    } else {
        size / 2
    };
    let at = match cut {
        Cut::Batch => at * group,
        _ => at,
    };
    let (first, second) = g.cut(cut, at);
    gemm_in_windows(rec, &first, operands)?;
    gemm_in_windows(rec, &second, operands)
}

/// `op(A)·op(B)` as a new tensor, submitted at once.
///
/// A is `[m, k]` (`[k, m]` if `trans_a`) or batched `[batch, m, k]`; B likewise
/// `[k, n]` (`[n, k]` if `trans_b`) or `[batch, k, n]`. A 2-D operand next to a 3-D one
/// is broadcast over the batch. The result is `[m, n]` or `[batch, m, n]`.
pub fn matmul(
    ctx: &GpuContext,
    a: &GpuTensor,
    b: &GpuTensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<GpuTensor> {
    let split = |t: &GpuTensor, name: &str| -> Result<(Option<usize>, usize, usize)> {
        match *t.shape() {
            [r, c] => Ok((None, r, c)),
            [n, r, c] => Ok((Some(n), r, c)),
            ref s => Err(Error::gpu(
                "matmul",
                format!("{name} must be 2-D or 3-D, found shape {s:?}"),
            )),
        }
    };
    let (batch_a, ra, ca) = split(a, "A")?;
    let (batch_b, rb, cb) = split(b, "B")?;
    let (m, k) = if trans_a { (ca, ra) } else { (ra, ca) };
    let (k_b, n) = if trans_b { (cb, rb) } else { (rb, cb) };
    if k != k_b {
        return Err(Error::gpu(
            "matmul",
            format!(
                "inner dimensions differ: op(A) is {m}×{k} (A {:?}, trans_a {trans_a}), op(B) \
                 is {k_b}×{n} (B {:?}, trans_b {trans_b})",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let batch = match (batch_a, batch_b) {
        (Some(x), Some(y)) if x != y => {
            return Err(Error::gpu(
                "matmul",
                format!("batch sizes differ: A {:?}, B {:?}", a.shape(), b.shape()),
            ));
        }
        (Some(x), _) | (None, Some(x)) => Some(x),
        (None, None) => None,
    };
    let mut g = Gemm::new(m, n, k, trans_a, trans_b).batched(batch.unwrap_or(1));
    if batch_a.is_none() {
        g.stride_a = 0;
    }
    if batch_b.is_none() {
        g.stride_b = 0;
    }
    let c = match batch {
        Some(bn) => ctx.zeros(&[bn, m, n])?,
        None => ctx.zeros(&[m, n])?,
    };
    let mut rec = ctx.recorder();
    gemm(&mut rec, &g, a, b, &c)?;
    rec.submit()?;
    Ok(c)
}
