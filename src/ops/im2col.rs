//! im2col and col2im for conv2d (`shaders/im2col.wgsl`), in
//! `torch.nn.functional.unfold` order, over a range of examples of a batch.
//!
//! For examples `e0..e1` (`n = e1 − e0`), groups `G`, positions `S = OH·OW` and patch
//! length `D = (C/G)·KH·KW`, the patches are `[G, n·S, D]` row-major: row
//! `(g·n + b)·S + oh·OW + ow`, column `c·KH·KW + kh·KW + kw` holds
//! `x[e0 + b, g·C/G + c, oh·s + kh·d − p, ow·s + kw·d − p]` (0 in the padding). Each
//! group's block is a plain row-major `[n·S, D]` matrix, so the conv GEMM against the
//! group's weight rows `[Cout/G, D]` needs no further reshuffling, and for `G = 1` it
//! is SPEC §2.2's `[B·S, d_in]` patch matrix.

use std::ops::Range;

use super::check::{expect_at_least, expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::geometry::Conv2dGeometry;
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// Every entry point of `shaders/im2col.wgsl`: examples `first .. first + count`
    /// of `x [B, c, h, w]` and the conv geometry (output size `oh × ow`, kernel
    /// `kh × kw`, stride, padding, dilation, groups).
    pub struct Im2colParams {
        first: u32,
        count: u32,
        c: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        kh: u32,
        kw: u32,
        sh: u32,
        sw: u32,
        ph: u32,
        pw: u32,
        dh: u32,
        dw: u32,
        groups: u32,
    }
}

/// Checks `x` against the geometry and `examples` against the batch, and returns the
/// kernels' parameters.
fn params(op: &str, geo: &Conv2dGeometry, examples: &Range<usize>) -> Result<Im2colParams> {
    if examples.start > examples.end || examples.end > geo.batch {
        return Err(Error::gpu(
            op,
            format!(
                "examples {examples:?} are not a range inside the batch of {}",
                geo.batch
            ),
        ));
    }
    let n = examples.len();
    expect_u32(op, &[geo.input_len(), patches_len(geo, n)])?;
    let [oh, ow] = geo.out_size();
    let u = |v: usize| v as u32;
    Ok(Im2colParams {
        first: u(examples.start),
        count: u(n),
        c: u(geo.in_channels),
        h: u(geo.in_size[0]),
        w: u(geo.in_size[1]),
        oh: u(oh),
        ow: u(ow),
        kh: u(geo.kernel_size[0]),
        kw: u(geo.kernel_size[1]),
        sh: u(geo.stride[0]),
        sw: u(geo.stride[1]),
        ph: u(geo.padding[0]),
        pw: u(geo.padding[1]),
        dh: u(geo.dilation[0]),
        dw: u(geo.dilation[1]),
        groups: u(geo.groups),
    })
}

/// Elements of the patches of `n` examples for all groups, `G·n·S·D`.
pub fn patches_len(geo: &Conv2dGeometry, n: usize) -> usize {
    geo.groups * n * geo.positions() * geo.patch_len()
}

/// Records the patches of examples `examples` of `x [B, C, H, W]` into the first
/// `G·n·S·D` elements of `patches`, laid out `[G, n·S, D]` (module docs).
pub fn im2col(
    rec: &mut Recorder,
    geo: &Conv2dGeometry,
    x: &GpuTensor,
    examples: Range<usize>,
    patches: &GpuTensor,
) -> Result<()> {
    let len = patches_len(geo, examples.len());
    record_patches(rec, "im2col", geo, x, examples, len, patches)
}

/// Records the patches of the input averaged over channel groups (SPEC §2.2 step 1,
/// the curvature's input for `groups > 1`): `[n·S, D]` with
/// `x̂[e, c] = (1/G) Σ_g x[e, g·C/G + c]` in place of `x`, into the first `n·S·D`
/// elements of `patches`. For `G = 1` it equals [`im2col`].
pub fn im2col_group_mean(
    rec: &mut Recorder,
    geo: &Conv2dGeometry,
    x: &GpuTensor,
    examples: Range<usize>,
    patches: &GpuTensor,
) -> Result<()> {
    let len = examples.len() * geo.positions() * geo.patch_len();
    record_patches(rec, "im2col_group_mean", geo, x, examples, len, patches)
}

/// Records the entry point `entry` (also the operation's name in errors), writing the
/// first `len` elements of `patches` from examples `examples` of `x`.
fn record_patches(
    rec: &mut Recorder,
    entry: &'static str,
    geo: &Conv2dGeometry,
    x: &GpuTensor,
    examples: Range<usize>,
    len: usize,
    patches: &GpuTensor,
) -> Result<()> {
    let params = params(entry, geo, &examples)?;
    expect_len(entry, "x", x, geo.input_len())?;
    expect_at_least(entry, "patches", patches, len)?;
    rec.dispatch(
        &Kernel::new(&super::IM2COL, entry),
        &[x],
        &[patches],
        &params,
        grid(len),
    )
}

/// Records the adjoint of [`im2col`]: overwrites examples `examples` of
/// `grad_in [B, C, H, W]` with, per element, the sum of the entries of
/// `patches [G, n·S, D]` that im2col would have copied from it (deterministic gather).
pub fn col2im(
    rec: &mut Recorder,
    geo: &Conv2dGeometry,
    patches: &GpuTensor,
    examples: Range<usize>,
    grad_in: &GpuTensor,
) -> Result<()> {
    let op = "col2im";
    let params = params(op, geo, &examples)?;
    expect_at_least(op, "patches", patches, patches_len(geo, examples.len()))?;
    expect_len(op, "grad_in", grad_in, geo.input_len())?;
    let len = examples.len() * geo.in_channels * geo.in_size[0] * geo.in_size[1];
    rec.dispatch(
        &Kernel::new(&super::IM2COL, "col2im"),
        &[patches],
        &[grad_in],
        &params,
        grid(len),
    )
}
