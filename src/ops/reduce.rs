//! Utility kernels over flat row-major f32 tensors (`shaders/reduce.wgsl`): fill,
//! scale, axpy, square, copy, add_diagonal, batched transpose, append a column of ones,
//! and row/column sums.
//!
//! Every kernel is deterministic: no atomics, sums in a fixed order that depends only
//! on the shape, so the same input always gives bitwise the same output.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;

kernel_params! {
    /// `fill` and `scale` of `y[offset .. offset + len]` in place.
    pub struct RangeParams {
        /// First element.
        offset: u32,
        /// Elements.
        len: u32,
        /// The value (`fill`) or the factor (`scale`).
        value: f32,
    }
}

kernel_params! {
    /// `add_diagonal` on `count` matrices `[n, n]`.
    pub struct DiagonalParams {
        n: u32,
        count: u32,
        /// Added to each diagonal entry.
        delta: f32,
    }
}

kernel_params! {
    /// The elementwise maps `y[offset_y + i] = alpha·f(x[offset_x + i]) + beta·y[..]`
    /// for `i < len` (`axpy`, `square`; `copy` ignores `alpha` and `beta`).
    pub struct MapParams {
        len: u32,
        offset_x: u32,
        offset_y: u32,
        alpha: f32,
        /// 0 overwrites `y` without reading it.
        beta: f32,
    }
}

kernel_params! {
    /// One window of the batched `transpose`: `rows × cols` of each matrix of `x`
    /// (leading dimension `ld_x`) into `y` (leading dimension `ld_y`), matrix `z` of
    /// the grid at `offset + z·stride` in each.
    pub struct TransposeParams {
        rows: u32,
        cols: u32,
        ld_x: u32,
        ld_y: u32,
        offset_x: u32,
        offset_y: u32,
        stride_x: u32,
        stride_y: u32,
    }
}

kernel_params! {
    /// `append_ones_column`: `x` is `rows × cols`, `y` `rows × (cols + 1)`.
    pub struct AppendParams {
        rows: u32,
        cols: u32,
    }
}

kernel_params! {
    /// `sum_rows` and `sum_cols` of a `rows × cols` matrix.
    pub struct SumParams {
        rows: u32,
        cols: u32,
        /// `sum_rows`: rows summed by one workgroup; `sum_cols`: invocations per row
        /// (see [`sum_cols`]).
        rows_per_group: u32,
        alpha: f32,
        beta: f32,
    }
}

/// WebGPU's default limit of workgroups per grid dimension.
const MAX_GROUPS: usize = 65535;

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new(&super::REDUCE, entry)
}

fn fail<T>(op: &str, msg: String) -> Result<T> {
    Err(Error::gpu(op, msg))
}

/// Errors unless `t` has exactly `len` elements.
fn expect_len(op: &str, name: &str, t: &GpuTensor, len: usize) -> Result<()> {
    if t.len() != len {
        return fail(
            op,
            format!(
                "{name} must have {len} elements, but its shape {:?} has {}",
                t.shape(),
                t.len()
            ),
        );
    }
    Ok(())
}

/// Errors unless `[offset, offset + len)` lies inside `t` and fits 32-bit indices.
fn expect_range(op: &str, name: &str, t: &GpuTensor, offset: usize, len: usize) -> Result<()> {
    let end = offset as u128 + len as u128;
    if end > t.len() as u128 {
        return fail(
            op,
            format!(
                "{name}[{offset}..{end}] is outside its tensor of shape {:?} ({} elements)",
                t.shape(),
                t.len()
            ),
        );
    }
    expect_u32(op, end as usize)
}

fn expect_u32(op: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return fail(
            op,
            format!("{n} elements exceed the kernels' 32-bit indices"),
        );
    }
    Ok(())
}

fn elementwise_grid(len: usize) -> [u32; 3] {
    grid_1d(len.div_ceil(256) as u32)
}

/// Records `y = value` on every element of `y`.
pub fn fill(rec: &mut Recorder, y: &GpuTensor, value: f32) -> Result<()> {
    fill_range(rec, y, 0, y.len(), value)
}

/// Records `y[offset..offset + len] = value`.
pub fn fill_range(
    rec: &mut Recorder,
    y: &GpuTensor,
    offset: usize,
    len: usize,
    value: f32,
) -> Result<()> {
    expect_range("fill", "y", y, offset, len)?;
    let params = RangeParams {
        offset: offset as u32,
        len: len as u32,
        value,
    };
    rec.dispatch(&kernel("fill"), &[], &[y], &params, elementwise_grid(len))
}

/// Records `y = alpha·y` elementwise.
pub fn scale(rec: &mut Recorder, y: &GpuTensor, alpha: f32) -> Result<()> {
    expect_u32("scale", y.len())?;
    let params = RangeParams {
        offset: 0,
        len: y.len() as u32,
        value: alpha,
    };
    rec.dispatch(
        &kernel("scale"),
        &[],
        &[y],
        &params,
        elementwise_grid(y.len()),
    )
}

/// Records `y = alpha·x + beta·y` elementwise; `x` and `y` have the same length. With
/// `beta = 0`, `y` is overwritten without being read.
pub fn axpy(rec: &mut Recorder, alpha: f32, x: &GpuTensor, beta: f32, y: &GpuTensor) -> Result<()> {
    map("axpy", rec, alpha, x, beta, y)
}

/// Records `y = alpha·x² + beta·y` elementwise; `x` and `y` have the same length. With
/// `beta = 0`, `y` is overwritten without being read.
pub fn square(
    rec: &mut Recorder,
    alpha: f32,
    x: &GpuTensor,
    beta: f32,
    y: &GpuTensor,
) -> Result<()> {
    map("square", rec, alpha, x, beta, y)
}

fn map(
    entry: &'static str,
    rec: &mut Recorder,
    alpha: f32,
    x: &GpuTensor,
    beta: f32,
    y: &GpuTensor,
) -> Result<()> {
    expect_len(entry, "y", y, x.len())?;
    expect_u32(entry, x.len())?;
    let params = MapParams {
        len: x.len() as u32,
        offset_x: 0,
        offset_y: 0,
        alpha,
        beta,
    };
    rec.dispatch(
        &kernel(entry),
        &[x],
        &[y],
        &params,
        elementwise_grid(x.len()),
    )
}

/// Records `y[offset_y..offset_y + len] = x[offset_x..offset_x + len]`, bit for bit.
pub fn copy(
    rec: &mut Recorder,
    x: &GpuTensor,
    offset_x: usize,
    y: &GpuTensor,
    offset_y: usize,
    len: usize,
) -> Result<()> {
    expect_range("copy", "x", x, offset_x, len)?;
    expect_range("copy", "y", y, offset_y, len)?;
    let params = MapParams {
        len: len as u32,
        offset_x: offset_x as u32,
        offset_y: offset_y as u32,
        ..MapParams::default()
    };
    rec.dispatch(&kernel("copy"), &[x], &[y], &params, elementwise_grid(len))
}

/// Records `y[b][i][i] += delta` for a tensor `y` of shape `[..., n, n]` (any number
/// of leading batch dimensions).
pub fn add_diagonal(rec: &mut Recorder, y: &GpuTensor, delta: f32) -> Result<()> {
    let shape = y.shape();
    let n = match shape {
        [.., r, c] if r == c => *r,
        _ => {
            return fail(
                "add_diagonal",
                format!("needs square matrices [..., n, n], found shape {shape:?}"),
            );
        }
    };
    if n == 0 {
        return Ok(());
    }
    let count = y.len() / (n * n);
    expect_u32("add_diagonal", y.len())?;
    let params = DiagonalParams {
        n: n as u32,
        count: count as u32,
        delta,
    };
    rec.dispatch(
        &kernel("add_diagonal"),
        &[],
        &[y],
        &params,
        elementwise_grid(n * count),
    )
}

/// Records the batched transpose `y[b][c][r] = x[b][r][c]`: `x` holds `batch`
/// consecutive `rows × cols` matrices, `y` receives `batch` consecutive `cols × rows`
/// matrices (e.g. NCHW `[B, C, H·W]` to channel-last `[B, H·W, C]`). Both tensors must
/// have `batch·rows·cols` elements; their shapes are otherwise not inspected.
pub fn transpose(
    rec: &mut Recorder,
    x: &GpuTensor,
    y: &GpuTensor,
    batch: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let len = batch * rows * cols;
    expect_len("transpose", "x", x, len)?;
    expect_len("transpose", "y", y, len)?;
    expect_u32("transpose", len)?;
    let span = MAX_GROUPS * 16;
    for b0 in (0..batch).step_by(MAX_GROUPS) {
        let nb = (batch - b0).min(MAX_GROUPS);
        for r0 in (0..rows).step_by(span) {
            let nr = (rows - r0).min(span);
            for c0 in (0..cols).step_by(span) {
                let nc = (cols - c0).min(span);
                let base = b0 * rows * cols;
                let params = TransposeParams {
                    rows: nr as u32,
                    cols: nc as u32,
                    ld_x: cols as u32,
                    ld_y: rows as u32,
                    offset_x: (base + r0 * cols + c0) as u32,
                    offset_y: (base + c0 * rows + r0) as u32,
                    stride_x: (rows * cols) as u32,
                    stride_y: (rows * cols) as u32,
                };
                let groups = [nc.div_ceil(16) as u32, nr.div_ceil(16) as u32, nb as u32];
                rec.dispatch(&kernel("transpose"), &[x], &[y], &params, groups)?;
            }
        }
    }
    Ok(())
}

/// Records `y = [x, 1]`: `x` is `rows × cols`, `y` is `rows × (cols + 1)` with a last
/// column of ones (the input of a layer with its bias folded into the weight).
pub fn append_ones_column(
    rec: &mut Recorder,
    x: &GpuTensor,
    y: &GpuTensor,
    rows: usize,
    cols: usize,
) -> Result<()> {
    expect_len("append_ones_column", "x", x, rows * cols)?;
    expect_len("append_ones_column", "y", y, rows * (cols + 1))?;
    expect_u32("append_ones_column", rows * (cols + 1))?;
    let params = AppendParams {
        rows: rows as u32,
        cols: cols as u32,
    };
    rec.dispatch(
        &kernel("append_ones_column"),
        &[x],
        &[y],
        &params,
        elementwise_grid(rows * (cols + 1)),
    )
}

/// A sum over one axis of a `rows × cols` row-major matrix `x`, written as
/// `y = alpha·(sum) + beta·y` (with `beta = 0`, `y` is overwritten without being read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sum {
    pub rows: usize,
    pub cols: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Sum {
    /// The plain sum (`alpha = 1`, `beta = 0`) over a `rows × cols` matrix.
    pub fn new(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    fn params(&self, rows: usize, rows_per_group: usize, alpha: f32, beta: f32) -> SumParams {
        SumParams {
            rows: rows as u32,
            cols: self.cols as u32,
            rows_per_group: rows_per_group as u32,
            alpha,
            beta,
        }
    }
}

/// Invocations of a `sum_cols` workgroup (the shader's `workgroup_size`).
const SUM_COLS_WORKGROUP: usize = 256;

/// Rows one workgroup of `sum_rows` adds (64 per lane).
const ROWS_PER_GROUP: usize = 256;

/// Records the column sums `y[c] = alpha·Σ_r x[r][c] + beta·y[c]` (`x` is
/// `rows × cols`, `y` has `cols` elements), e.g. a bias gradient from `[B·P, C]`.
/// Each pass adds blocks of 256 rows into a `[blocks, cols]` temporary (allocated on
/// `ctx`) until one row is left; the order of additions depends only on the shape.
pub fn sum_rows(
    ctx: &GpuContext,
    rec: &mut Recorder,
    x: &GpuTensor,
    y: &GpuTensor,
    s: &Sum,
) -> Result<()> {
    expect_len("sum_rows", "x", x, s.rows * s.cols)?;
    expect_len("sum_rows", "y", y, s.cols)?;
    expect_u32("sum_rows", s.rows * s.cols)?;
    if s.cols == 0 {
        return Ok(());
    }
    let col_groups = grid_1d(s.cols.div_ceil(64) as u32);
    let mut rows = s.rows;
    let mut temp: Option<GpuTensor> = None;
    loop {
        let rows_per_group = ROWS_PER_GROUP.max(rows.div_ceil(MAX_GROUPS));
        let blocks = rows.div_ceil(rows_per_group).max(1);
        let input = temp.as_ref().unwrap_or(x);
        let [gx, gy, _] = col_groups;
        if blocks == 1 {
            let params = s.params(rows, rows_per_group, s.alpha, s.beta);
            return rec.dispatch(&kernel("sum_rows"), &[input], &[y], &params, [gx, gy, 1]);
        }
        let out = ctx.zeros(&[blocks, s.cols])?;
        let params = s.params(rows, rows_per_group, 1.0, 0.0);
        rec.dispatch(
            &kernel("sum_rows"),
            &[input],
            &[&out],
            &params,
            [gx, gy, blocks as u32],
        )?;
        temp = Some(out);
        rows = blocks;
    }
}

/// Records the row sums `y[r] = alpha·Σ_c x[r][c] + beta·y[r]` (`x` is `rows × cols`,
/// `y` has `rows` elements), e.g. per-channel sums of an NCHW gradient viewed as
/// `[B·C, H·W]`. Each row gets `lanes` invocations, the smallest power of two
/// `≥ cols` but at most a workgroup's 256, which add its columns in a fixed tree order,
/// so a workgroup sums `256 / lanes` short rows at once (a conv's position sums: 16 or
/// 64 columns). The sums are bit for bit those of one workgroup per row.
pub fn sum_cols(rec: &mut Recorder, x: &GpuTensor, y: &GpuTensor, s: &Sum) -> Result<()> {
    expect_len("sum_cols", "x", x, s.rows * s.cols)?;
    expect_len("sum_cols", "y", y, s.rows)?;
    expect_u32("sum_cols", s.rows * s.cols)?;
    let lanes = s.cols.next_power_of_two().min(SUM_COLS_WORKGROUP);
    let params = s.params(s.rows, lanes, s.alpha, s.beta);
    rec.dispatch(
        &kernel("sum_cols"),
        &[x],
        &[y],
        &params,
        grid_1d(s.rows.div_ceil(SUM_COLS_WORKGROUP / lanes) as u32),
    )
}
