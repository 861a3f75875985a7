//! The QR decomposition `A = Q R` of each square matrix of a batch (`shaders/qr.wgsl`):
//! blocked Householder reflections in compact WY form.
//!
//! Panels of [`PANEL`] columns are factored one after the other, each by one workgroup
//! per matrix (`qr_panel`: the reflectors `I − τ v vᵀ` of its columns and the triangular
//! `T` with `H₁ ⋯ H_b = I − V T Vᵀ`); the columns right of the panel are updated by three
//! batched GEMMs (`crate::ops::gemm`), `A ← (I − V Tᵀ Vᵀ) A`, and `Q = H₁ ⋯ H_n` is
//! formed from the identity by three more per panel, from the last panel to the first.
//! What is left of `A` is `R`: upper triangular, its diagonal `β_j` written by the panel
//! kernel and zeros below. `Q` is orthogonal to f32 rounding whatever `A` is: a column
//! that is zero below the diagonal after the earlier reflections (zero or linearly
//! dependent columns of a rank-deficient `A`) gets `τ = 0`, the identity. Its leading
//! `k` columns span `A`'s leading `k` columns when those are independent. All in one
//! compute pass, `7p − 2` dispatches for `p = ⌈n / 32⌉` panels (plus split-K sums of the
//! GEMMs); no readback; deterministic (fixed reduction orders, no atomics).

use super::check::{expect_u32, grid, square_batch};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;
use crate::ops::gemm::{Gemm, gemm};

/// Columns per panel (`PANEL` in the shader).
pub const PANEL: usize = 32;
/// Most row lanes per panel column (`MAX_LANES` in the shader): `PANEL · MAX_LANES` =
/// 256 invocations, what WebGPU guarantees per workgroup.
const MAX_LANES: usize = 8;

kernel_params! {
    /// `qr_init` (`work = a`, `q = I`) and `qr_panel` (the panel of `width ≤ 32` columns
    /// from `col0`) on `batch` matrices `[n, n]` with `panels = ⌈n / 32⌉`.
    pub struct QrParams {
        n: u32,
        batch: u32,
        col0: u32,
        width: u32,
        panels: u32,
    }
}

/// The factors of `A = Q R`, each shaped like `A`.
#[derive(Debug)]
pub struct Qr {
    /// The orthonormal factor (columns orthonormal), row-major.
    pub q: GpuTensor,
    /// The upper triangular factor (exact zeros below the diagonal), row-major.
    pub r: GpuTensor,
}

/// `A = Q R` for `a` `[n, n]` or `[batch, n, n]` (row-major); submitted at once.
pub fn qr(ctx: &GpuContext, a: &GpuTensor) -> Result<Qr> {
    let (batch, n) = square_batch("qr", a)?;
    let mut rec = ctx.recorder();
    let Qr { q, r } = record_qr(&mut rec, a, batch, n)?;
    rec.submit()?;
    Ok(Qr {
        q: q.reshape(a.shape())?,
        r: r.reshape(a.shape())?,
    })
}

/// Records `A = Q R` for each of the `batch` matrices `[n, n]` of `a` (row-major,
/// `batch · n · n` elements) and returns `Q` and `R`, each `[batch, n, n]`. The batch
/// must fit one storage binding (an [`Error::Memory`] otherwise).
pub fn record_qr(rec: &mut Recorder, a: &GpuTensor, batch: usize, n: usize) -> Result<Qr> {
    let ctx = rec.context();
    let op = "qr";
    let nn = n * n;
    if a.len() != batch * nn {
        return Err(Error::gpu(
            op,
            format!(
                "expected {batch} matrices of size {n}×{n}, found shape {:?}",
                a.shape()
            ),
        ));
    }
    let q = ctx.zeros(&[batch, n, n])?;
    let work = ctx.zeros(&[batch, n, n])?;
    if batch == 0 || n == 0 {
        return Ok(Qr { q, r: work });
    }
    let panels = n.div_ceil(PANEL);
    let t_len = batch * panels * PANEL * PANEL;
    if !fits_one_binding(ctx, batch, n) {
        return Err(Error::Memory(format!(
            "the QR of {batch} matrices of size {n}×{n} needs more than one storage \
             binding (max_storage_buffer_binding_size {} bytes)",
            ctx.limits.max_storage_buffer_binding_size
        )));
    }
    expect_u32(op, &[batch * nn, t_len])?;
    let v = ctx.zeros(&[batch, n, n])?;
    let t = ctx.zeros(&[batch, panels, PANEL, PANEL])?;
    // Vᵀ X and T Vᵀ X (or Tᵀ) of one panel: [batch, PANEL, n], row length n.
    let w = ctx.zeros(&[batch, PANEL, n])?;
    let tw = ctx.zeros(&[batch, PANEL, n])?;
    let params = |col0: usize, width: usize| QrParams {
        n: n as u32,
        batch: batch as u32,
        col0: col0 as u32,
        width: width as u32,
        panels: panels as u32,
    };
    rec.dispatch(
        &Kernel::new(&super::QR, "qr_init"),
        &[a],
        &[&work, &q],
        &params(0, 0),
        grid(batch * nn),
    )?;
    let panel = |k: usize| (k * PANEL, PANEL.min(n - k * PANEL));
    for k in 0..panels {
        let (k0, width) = panel(k);
        rec.dispatch(
            &Kernel::new(&super::QR, "qr_panel").with("LANES", row_lanes(n) as f64),
            &[],
            &[&work, &v, &t],
            &params(k0, width),
            grid_1d(batch as u32),
        )?;
        if k0 + width < n {
            let x = Block {
                row0: k0,
                col0: k0 + width,
            };
            apply_reflectors(rec, [&v, &t, &w, &tw], &work, x, (k, k0, width), n, true)?;
        }
    }
    for k in (0..panels).rev() {
        let (k0, width) = panel(k);
        let x = Block { row0: k0, col0: k0 };
        apply_reflectors(rec, [&v, &t, &w, &tw], &q, x, (k, k0, width), n, false)?;
    }
    Ok(Qr { q, r: work })
}

/// Row lanes per panel column of `qr_panel` for matrices of size `n` (`LANES` in the
/// shader): 2 up to n = 1024, then the power of two that keeps `n / LANES ≤ 512`, at
/// most [`MAX_LANES`]. A panel costs each invocation about
/// `40·n / LANES` loop iterations, and lavapipe silently ends a loop nest after 65535
/// of them; up to the QR's largest `n` (one storage binding: about 5790 on WebGPU's
/// defaults) that keeps them under 29k.
fn row_lanes(n: usize) -> usize {
    n.div_ceil(512).next_power_of_two().clamp(2, MAX_LANES)
}

/// Whether every buffer of the QR of `batch` matrices `[n, n]` fits one storage binding:
/// the matrices, the `T` of every panel (`[batch, ⌈n/32⌉, 32, 32]`) and the panel
/// products (`[batch, 32, n]`). [`record_qr`] refuses the others.
pub fn fits_one_binding(ctx: &GpuContext, batch: usize, n: usize) -> bool {
    let limit = ctx.binding_elements().0 as u128;
    let (batch, n) = (batch as u128, n as u128);
    let panels = n.div_ceil(PANEL as u128);
    let largest = (n * n)
        .max(panels * (PANEL * PANEL) as u128)
        .max(PANEL as u128 * n);
    batch * largest <= limit
}

/// The sub-matrix `X = x[row0.., col0..]` of each matrix of an `[batch, n, n]` tensor.
#[derive(Clone, Copy)]
struct Block {
    row0: usize,
    col0: usize,
}

/// Records `X ← (I − V T Vᵀ) X` (or with `Tᵀ` when `transpose_t`) for panel `k`
/// (columns `k0 .. k0 + width` of `V`, rows from `k0 = X.row0`) as three batched GEMMs:
/// `W = Vᵀ X`, `TW = T W` (or `Tᵀ W`), `X −= V TW`. `scratch` is `[v, t, w, tw]`.
fn apply_reflectors(
    rec: &mut Recorder,
    scratch: [&GpuTensor; 4],
    x: &GpuTensor,
    block: Block,
    (k, k0, width): (usize, usize, usize),
    n: usize,
    transpose_t: bool,
) -> Result<()> {
    let [v, t, w, tw] = scratch;
    let batch = x.len() / (n * n);
    let panels = t.len() / (batch * PANEL * PANEL);
    let (rows, cols) = (n - block.row0, n - block.col0);
    let x_offset = block.row0 * n + block.col0;
    let v_offset = k0 * n + k0;
    // W = V_kᵀ X: V_k is stored rows × width (row length n).
    let mut vt_x = Gemm::new(width, cols, rows, true, false).batched(batch);
    (vt_x.lda, vt_x.offset_a, vt_x.stride_a) = (n, v_offset, n * n);
    (vt_x.ldb, vt_x.offset_b, vt_x.stride_b) = (n, x_offset, n * n);
    (vt_x.ldc, vt_x.stride_c) = (n, PANEL * n);
    gemm(rec, &vt_x, v, x, w)?;
    // TW = op(T_k) W.
    let mut t_w = Gemm::new(width, cols, width, transpose_t, false).batched(batch);
    (t_w.lda, t_w.offset_a, t_w.stride_a) = (PANEL, k * PANEL * PANEL, panels * PANEL * PANEL);
    (t_w.ldb, t_w.stride_b) = (n, PANEL * n);
    (t_w.ldc, t_w.stride_c) = (n, PANEL * n);
    gemm(rec, &t_w, t, w, tw)?;
    // X −= V_k TW.
    let mut update = Gemm::new(rows, cols, width, false, false)
        .batched(batch)
        .scaled(-1.0, 1.0);
    (update.lda, update.offset_a, update.stride_a) = (n, v_offset, n * n);
    (update.ldb, update.stride_b) = (n, PANEL * n);
    (update.ldc, update.offset_c, update.stride_c) = (n, x_offset, n * n);
    gemm(rec, &update, v, tw, x)
}
