//! Strided gathers (`shaders/shape.wgsl`): transpose and permute of a tensor, a
//! broadcast (stride 0 along the repeated dims), and scaling by a constant, all as
//! `y[i] = x[offset(i)]·scale / divisor` over the output's elements.

use super::check::{expect_len, expect_u32, grid};
use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Kernel, Recorder};
use crate::kernel_params;

/// The most dims (batch axis included) a gather indexes.
pub const MAX_RANK: usize = 6;

kernel_params! {
    /// `y[i] = x[Σ_k c_k(i)·s_k]·scale / divisor` with `c_k(i)` the row-major
    /// coordinates of `i` over the output dims `d0..d5` (leading unused dims are 1).
    pub struct GatherParams {
        len: u32,
        scale: f32,
        divisor: f32,
        d0: u32,
        d1: u32,
        d2: u32,
        d3: u32,
        d4: u32,
        d5: u32,
        s0: u32,
        s1: u32,
        s2: u32,
        s3: u32,
        s4: u32,
        s5: u32,
    }
}

/// A gather: the output's dims and, per dim, the stride of `x` (elements) it moves by.
#[derive(Clone, Debug, PartialEq)]
pub struct Gather {
    /// The output's shape (at most [`MAX_RANK`] dims).
    pub dims: Vec<usize>,
    /// Per output dim, the stride in `x`; 0 repeats (broadcasts) `x` along it.
    pub strides: Vec<usize>,
    pub scale: f32,
    pub divisor: f32,
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

impl Gather {
    /// `x` of `shape` permuted: output dim `k` is input dim `perm[k]` (PyTorch's
    /// `permute`).
    pub fn permute(shape: &[usize], perm: &[usize]) -> Self {
        let s = strides(shape);
        Self::strided(
            perm.iter().map(|&p| shape[p]).collect(),
            perm.iter().map(|&p| s[p]).collect(),
        )
    }

    /// A batch of `rows` examples of `shape` permuted per example: output dim `k` of an
    /// example is its dim `perm[k]`; the batch axis stays first.
    pub fn permute_examples(rows: usize, shape: &[usize], perm: &[usize]) -> Self {
        let mut batched_shape = vec![rows];
        batched_shape.extend(shape);
        let batched_perm: Vec<usize> = std::iter::once(0)
            .chain(perm.iter().map(|&p| p + 1))
            .collect();
        Self::permute(&batched_shape, &batched_perm)
    }

    /// `x` read with `strides` over the output `dims` (0 broadcasts), unscaled.
    pub fn strided(dims: Vec<usize>, strides: Vec<usize>) -> Self {
        Self {
            dims,
            strides,
            scale: 1.0,
            divisor: 1.0,
        }
    }

    /// `x` (`len` elements, contiguous) times `scale`, divided by `divisor`.
    pub fn scaled(len: usize, scale: f32, divisor: f32) -> Self {
        Self {
            dims: vec![len],
            strides: vec![1],
            scale,
            divisor,
        }
    }

    /// Elements of the output.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the output is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the largest element of `x` read.
    fn extent(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        1 + self
            .dims
            .iter()
            .zip(&self.strides)
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>()
    }

    fn params(&self) -> GatherParams {
        let pad = MAX_RANK - self.dims.len();
        let d = |k: usize| {
            if k < pad {
                1
            } else {
                self.dims[k - pad] as u32
            }
        };
        let s = |k: usize| {
            if k < pad {
                0
            } else {
                self.strides[k - pad] as u32
            }
        };
        GatherParams {
            len: self.len() as u32,
            scale: self.scale,
            divisor: self.divisor,
            d0: d(0),
            d1: d(1),
            d2: d(2),
            d3: d(3),
            d4: d(4),
            d5: d(5),
            s0: s(0),
            s1: s(1),
            s2: s(2),
            s3: s(3),
            s4: s(4),
            s5: s(5),
        }
    }
}

/// Records `y = gather(x)`; `y` has `g.len()` elements (overwritten).
pub fn gather(rec: &mut Recorder, g: &Gather, x: &GpuTensor, y: &GpuTensor) -> Result<()> {
    let op = "gather";
    if g.dims.len() > MAX_RANK || g.dims.len() != g.strides.len() {
        return Err(Error::gpu(
            op,
            format!(
                "{} dims with {} strides: at most {MAX_RANK} dims (batch axis included), \
                 one stride each",
                g.dims.len(),
                g.strides.len()
            ),
        ));
    }
    expect_len(op, "y", y, g.len())?;
    if g.extent() > x.len() {
        return Err(Error::gpu(
            op,
            format!(
                "dims {:?} with strides {:?} read past x {:?}",
                g.dims,
                g.strides,
                x.shape()
            ),
        ));
    }
    expect_u32(op, &[g.len(), x.len()])?;
    rec.dispatch(
        &Kernel::new(&super::SHAPE, "gather"),
        &[x],
        &[y],
        &g.params(),
        grid(g.len()),
    )
}
