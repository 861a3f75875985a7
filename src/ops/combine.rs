//! Combining activations (`shaders/combine.wgsl`): the elementwise sum of two tensors
//! (`add`; its backward passes the gradient to both inputs unchanged), their
//! elementwise product (`multiply`), concatenation
//! along an axis with its splitting backward, and a range along an axis (`narrow`)
//! with its placing backward. Tensors are row-major; axes count from the outermost (for NCHW
//! activations axis 1 is channels).

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

kernel_params! {
    /// `add` and `multiply`: `len` elements.
    pub struct LenParams {
        len: u32,
    }
}

kernel_params! {
    /// `copy_slab`: `outer` slabs of `inner` elements,
    /// `dst[o·dst_stride + dst_offset + j] = src[o·src_stride + src_offset + j]`.
    pub struct SlabParams {
        outer: u32,
        inner: u32,
        src_stride: u32,
        src_offset: u32,
        dst_stride: u32,
        dst_offset: u32,
    }
}

/// Records `y = a + b` (elementwise, any shape; all three have the same length).
pub fn add(rec: &mut Recorder, a: &GpuTensor, b: &GpuTensor, y: &GpuTensor) -> Result<()> {
    elementwise(rec, "add", a, b, y)
}

/// Records `y = a ⊙ b` (elementwise, any shape; all three have the same length).
pub fn multiply(rec: &mut Recorder, a: &GpuTensor, b: &GpuTensor, y: &GpuTensor) -> Result<()> {
    elementwise(rec, "multiply", a, b, y)
}

fn elementwise(
    rec: &mut Recorder,
    op: &'static str,
    a: &GpuTensor,
    b: &GpuTensor,
    y: &GpuTensor,
) -> Result<()> {
    expect_len(op, "b", b, a.len())?;
    expect_len(op, "y", y, a.len())?;
    expect_u32(op, &[a.len()])?;
    rec.dispatch(
        &Kernel::new(&super::COMBINE, op),
        &[a, b],
        &[y],
        &LenParams {
            len: a.len() as u32,
        },
        grid(a.len()),
    )
}

/// For each part, `(outer, part_inner, whole_inner, offset)`: the whole tensor is
/// `outer` slabs of `whole_inner` elements, of which the part's slab of `part_inner`
/// starts at `offset`. Checks that the parts concatenate to `whole` along `axis`.
fn slabs(
    op: &str,
    whole_name: &str,
    whole: &GpuTensor,
    parts: &[&GpuTensor],
    axis: usize,
) -> Result<Vec<[usize; 4]>> {
    let shape = whole.shape();
    if axis >= shape.len() || parts.is_empty() {
        return Err(Error::gpu(
            op,
            format!(
                "cannot concatenate {} tensors along axis {axis} of {whole_name} {shape:?}",
                parts.len()
            ),
        ));
    }
    let outer: usize = shape[..axis].iter().product();
    let after: usize = shape[axis + 1..].iter().product();
    let mut offset = 0;
    let mut layout = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let p = part.shape();
        let fits = p.len() == shape.len()
            && p[..axis] == shape[..axis]
            && p[axis + 1..] == shape[axis + 1..];
        if !fits {
            return Err(Error::gpu(
                op,
                format!(
                    "part {i} {p:?} must match {whole_name} {shape:?} on every axis but {axis}"
                ),
            ));
        }
        layout.push([outer, p[axis] * after, shape[axis] * after, offset]);
        offset += p[axis] * after;
    }
    if offset != shape[axis] * after {
        let sizes: Vec<usize> = parts.iter().map(|p| p.shape()[axis]).collect();
        return Err(Error::gpu(
            op,
            format!(
                "parts of sizes {sizes:?} along axis {axis} do not add up to {whole_name} {shape:?}"
            ),
        ));
    }
    expect_u32(op, &[whole.len()])?;
    Ok(layout)
}

/// Records `y = cat(inputs, axis)`: every input has `y`'s shape except along `axis`,
/// where their sizes add up to `y`'s. One dispatch per input.
pub fn cat_forward(
    rec: &mut Recorder,
    inputs: &[&GpuTensor],
    axis: usize,
    y: &GpuTensor,
) -> Result<()> {
    let layout = slabs("cat forward", "y", y, inputs, axis)?;
    for (x, [outer, part, whole, offset]) in inputs.iter().zip(layout) {
        let u = |v: usize| v as u32;
        let slab = SlabParams {
            outer: u(outer),
            inner: u(part),
            src_stride: u(part),
            src_offset: 0,
            dst_stride: u(whole),
            dst_offset: u(offset),
        };
        rec.dispatch(
            &Kernel::new(&super::COMBINE, "copy_slab"),
            &[x],
            &[y],
            &slab,
            grid(outer * part),
        )?;
    }
    Ok(())
}

/// Records the backward of `cat` along `axis`: `grad_out` (shaped like the forward
/// output, or a `V`-major stack of it) is split into `grads_in` (shaped like the
/// forward inputs, or the same stack of them; overwritten). One dispatch per part.
pub fn cat_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    axis: usize,
    grads_in: &[&GpuTensor],
) -> Result<()> {
    let layout = slabs("cat backward", "grad_out", grad_out, grads_in, axis)?;
    for (g, [outer, part, whole, offset]) in grads_in.iter().zip(layout) {
        let u = |v: usize| v as u32;
        let slab = SlabParams {
            outer: u(outer),
            inner: u(part),
            src_stride: u(whole),
            src_offset: u(offset),
            dst_stride: u(part),
            dst_offset: 0,
        };
        rec.dispatch(
            &Kernel::new(&super::COMBINE, "copy_slab"),
            &[grad_out],
            &[g],
            &slab,
            grid(outer * part),
        )?;
    }
    Ok(())
}

/// The slab layout of a range `[start, start + part)` along `axis` of `whole` whose
/// other axes equal `part`'s: `[outer, part·after, whole·after, start·after]`.
fn range_layout(
    op: &str,
    whole: &GpuTensor,
    part: &GpuTensor,
    axis: usize,
    start: usize,
) -> Result<[usize; 4]> {
    let (w, p) = (whole.shape(), part.shape());
    let fits = axis < w.len()
        && p.len() == w.len()
        && p[..axis] == w[..axis]
        && p[axis + 1..] == w[axis + 1..]
        && start + p[axis] <= w[axis];
    if !fits {
        return Err(Error::gpu(
            op,
            format!("cannot take {p:?} at {start} along axis {axis} of {w:?}"),
        ));
    }
    expect_u32(op, &[whole.len()])?;
    let outer: usize = w[..axis].iter().product();
    let after: usize = w[axis + 1..].iter().product();
    Ok([outer, p[axis] * after, w[axis] * after, start * after])
}

/// Records `y = x.narrow(axis, start, n)` with `n` `y`'s size along `axis` (`x` and `y`
/// equal on every other axis). One dispatch.
pub fn narrow(
    rec: &mut Recorder,
    x: &GpuTensor,
    axis: usize,
    start: usize,
    y: &GpuTensor,
) -> Result<()> {
    let [outer, part, whole, offset] = range_layout("narrow", x, y, axis, start)?;
    let u = |v: usize| v as u32;
    let slab = SlabParams {
        outer: u(outer),
        inner: u(part),
        src_stride: u(whole),
        src_offset: u(offset),
        dst_stride: u(part),
        dst_offset: 0,
    };
    rec.dispatch(
        &Kernel::new(&super::COMBINE, "copy_slab"),
        &[x],
        &[y],
        &slab,
        grid(outer * part),
    )
}

/// Records the backward of [`narrow`]: `grad_out` (shaped like its `y`, or a `V`-major
/// stack of it) is written into `grad_in` (shaped like its `x`, or the same stack; zero
/// outside the range, which the caller provides) at `start` along `axis`. One dispatch.
pub fn narrow_backward(
    rec: &mut Recorder,
    grad_out: &GpuTensor,
    axis: usize,
    start: usize,
    grad_in: &GpuTensor,
) -> Result<()> {
    let [outer, part, whole, offset] =
        range_layout("narrow backward", grad_in, grad_out, axis, start)?;
    let u = |v: usize| v as u32;
    let slab = SlabParams {
        outer: u(outer),
        inner: u(part),
        src_stride: u(part),
        src_offset: 0,
        dst_stride: u(whole),
        dst_offset: u(offset),
    };
    rec.dispatch(
        &Kernel::new(&super::COMBINE, "copy_slab"),
        &[grad_out],
        &[grad_in],
        &slab,
        grid(outer * part),
    )
}
