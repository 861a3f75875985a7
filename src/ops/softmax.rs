//! Softmax over the last dimension (`shaders/softmax.wgsl`): numerically stable
//! forward (the row maximum subtracted), optionally with a constant mask, and the
//! backward `grad_in = y ⊙ (g − Σ g y)` of a `V`-major stack of gradients that reads
//! the saved output without repeating it.

use super::check::{expect_len, expect_u32, row_grid, row_lanes};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Every entry point: `rows` rows of `n` values written; backward reads the saved
    /// output's `y_rows` rows (grad row `r` belongs to y row `r mod y_rows`); the
    /// masked forward reads mask word `(mask_offset + e mod mask_len) mod mask_len` for
    /// flat element `e`.
    pub struct SoftmaxParams {
        rows: u32,
        n: u32,
        y_rows: u32,
        mask_len: u32,
        mask_offset: u32,
        /// Invocations per row: a power of two, at most 256.
        lanes: u32,
    }
}

/// A constant mask of a masked softmax: `words` (u32, 1 = keep, 0 = leave out) repeat
/// with period `words.len()` over the flat elements of the scores; the dispatch's
/// element 0 is word `offset` of the period.
#[derive(Clone, Copy, Debug)]
pub struct RowMask<'a> {
    pub words: &'a GpuTensor,
    pub offset: usize,
}

fn rows_of(op: &str, t: &GpuTensor, n: usize) -> Result<usize> {
    if n == 0 || !t.len().is_multiple_of(n) {
        return Err(Error::gpu(
            op,
            format!("{:?} is not a stack of rows of {n} values", t.shape()),
        ));
    }
    expect_u32(op, &[t.len()])?;
    Ok(t.len() / n)
}

/// Records `y = softmax(x)` over rows of `n` values; with `mask`, entries whose mask
/// word is 0 are left out (as if `-inf`) and get 0. `y` has as many elements as `x`.
pub fn softmax_forward(
    rec: &mut Recorder,
    x: &GpuTensor,
    y: &GpuTensor,
    n: usize,
    mask: Option<RowMask>,
) -> Result<()> {
    let op = "softmax forward";
    let rows = rows_of(op, x, n)?;
    expect_len(op, "y", y, x.len())?;
    let mut params = SoftmaxParams {
        rows: rows as u32,
        n: n as u32,
        y_rows: rows as u32,
        mask_len: 0,
        mask_offset: 0,
        lanes: row_lanes(n) as u32,
    };
    let groups = row_grid(rows, n);
    match mask {
        None => rec.dispatch(
            &Kernel::new(&super::SOFTMAX, "softmax_forward"),
            &[x],
            &[y],
            &params,
            groups,
        ),
        Some(m) => {
            if m.words.is_empty() || m.offset >= m.words.len() {
                return Err(Error::gpu(
                    op,
                    format!(
                        "mask offset {} outside a mask of {} words",
                        m.offset,
                        m.words.len()
                    ),
                ));
            }
            expect_u32(op, &[m.words.len() * 2])?;
            params.mask_len = m.words.len() as u32;
            params.mask_offset = m.offset as u32;
            rec.dispatch(
                &Kernel::new(&super::SOFTMAX, "softmax_forward_masked"),
                &[x, m.words],
                &[y],
                &params,
                groups,
            )
        }
    }
}

/// Records `grad_in = y ⊙ (g − Σ_row g y)` for a stack of gradients: `y` the saved
/// output (rows of `n`), `grad_out` `V` times as long (`V`-major), `grad_in` like
/// `grad_out` (overwritten).
pub fn softmax_backward(
    rec: &mut Recorder,
    y: &GpuTensor,
    grad_out: &GpuTensor,
    grad_in: &GpuTensor,
    n: usize,
) -> Result<()> {
    let op = "softmax backward";
    let y_rows = rows_of(op, y, n)?;
    let rows = rows_of(op, grad_out, n)?;
    if y_rows == 0 || !rows.is_multiple_of(y_rows) {
        return Err(Error::gpu(
            op,
            format!(
                "grad_out {:?} must be a stack of gradients shaped like y {:?}",
                grad_out.shape(),
                y.shape()
            ),
        ));
    }
    expect_len(op, "grad_in", grad_in, grad_out.len())?;
    rec.dispatch(
        &Kernel::new(&super::SOFTMAX, "softmax_backward"),
        &[y, grad_out],
        &[grad_in],
        &SoftmaxParams {
            rows: rows as u32,
            n: n as u32,
            y_rows: y_rows as u32,
            mask_len: 0,
            mask_offset: 0,
            lanes: row_lanes(n) as u32,
        },
        row_grid(rows, n),
    )
}
