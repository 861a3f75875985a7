//! Conv2d forward and backward as im2col + GEMM (`shaders/im2col.wgsl`,
//! `shaders/gemm.wgsl`), plus the layout and bias kernels of `shaders/conv.wgsl`,
//! which linear layers share.
//!
//! Shapes (PyTorch's): input `[B, C, H, W]`, weight `[Cout, C/G, KH, KW]`, bias
//! `[Cout]`, output `[B, Cout, OH, OW]`, all row-major f32. With `S = OH·OW`,
//! `D = (C/G)·KH·KW` and `Og = Cout/G`, per group `g`:
//! - forward: `rows_g [n·S, Og] = patches_g [n·S, D] · W_gᵀ`, then rows → NCHW, + bias;
//! - input gradient: `dpatches_g = rows_g(dY) · W_g`, then col2im;
//! - weight gradient: `dW_g [Og, D] = rows_g(dY)ᵀ · patches_g`;
//! - bias gradient: `db[c] = Σ_{b,s} dY[b, c, s]`;
//!
//! one GEMM dispatch batched over the groups per chunk of examples. The
//! [`ConvWorkspace`] holds the patches and rows of one chunk, so the batch is processed
//! in as many chunks as the workspace's memory budget requires.

use std::ops::Range;

use super::check::{expect_at_least, expect_len, expect_u32, grid};
use super::gemm::{Gemm, gemm};
use super::im2col::{col2im, im2col, patches_len};
use crate::error::{Error, Result};
use crate::geometry::Conv2dGeometry;
use crate::gpu::{GpuContext, GpuTensor, Kernel, Recorder, grid_1d};
use crate::kernel_params;

kernel_params! {
    /// Every entry point of `shaders/conv.wgsl`: examples `first .. first + count` of
    /// `[B, c, s]` in `groups` channel groups.
    pub struct ConvParams {
        first: u32,
        count: u32,
        /// Channels `C`.
        c: u32,
        /// Positions `S`.
        s: u32,
        groups: u32,
        /// `bias_grad`: `db = beta·db + Σ`; unused elsewhere.
        beta: f32,
    }
}

/// A batch of activations `[B, channels, positions]` (NCHW conv activations with
/// `positions = H·W`, or `[B, features]` with `positions = 1`) whose channels form
/// `groups` consecutive groups.
///
/// Its "grouped rows" layout for examples `e0..e1` (`n = e1 − e0`) is
/// `[groups, n·positions, channels/groups]` row-major: row `(g·n + b)·positions + s`,
/// column `o` holds `y[e0 + b, g·channels/groups + o, s]`. For `groups = 1` this is the
/// channel-last `[n·positions, channels]` matrix (e.g. SPEC §3's output gradients of a
/// conv layer as `[B·S, Cout]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelGroups {
    pub channels: usize,
    pub positions: usize,
    pub groups: usize,
}

impl ChannelGroups {
    /// Elements of `n` examples.
    pub fn len(&self, n: usize) -> usize {
        n * self.channels * self.positions
    }

    /// Checks the tensor `y` (`[B, channels, positions]`), the group split and the
    /// example range, and returns the parameters of `shaders/conv.wgsl`.
    fn params(
        &self,
        op: &str,
        y: &GpuTensor,
        examples: &Range<usize>,
        beta: f32,
    ) -> Result<ConvParams> {
        let example_len = self.channels * self.positions;
        if self.groups == 0 || !self.channels.is_multiple_of(self.groups) || example_len == 0 {
            return Err(Error::gpu(
                op,
                format!(
                    "{self:?}: channels must be a positive multiple of groups, positions positive"
                ),
            ));
        }
        if !y.len().is_multiple_of(example_len)
            || examples.start > examples.end
            || examples.end * example_len > y.len()
        {
            return Err(Error::gpu(
                op,
                format!(
                    "examples {examples:?} of [B, {}, {}] do not fit a tensor of shape {:?}",
                    self.channels,
                    self.positions,
                    y.shape()
                ),
            ));
        }
        expect_u32(op, &[y.len()])?;
        Ok(ConvParams {
            first: examples.start as u32,
            count: examples.len() as u32,
            c: self.channels as u32,
            s: self.positions as u32,
            groups: self.groups as u32,
            beta,
        })
    }
}

fn conv_kernel(entry: &'static str) -> Kernel {
    Kernel::new(&super::CONV, entry)
}

/// Records `y[e0..e1] = rows` (grouped rows of examples `examples` → `[B, C, S]`).
/// `rows` needs at least `n·C·S` elements.
pub fn groups_to_nchw(
    rec: &mut Recorder,
    layout: &ChannelGroups,
    rows: &GpuTensor,
    examples: Range<usize>,
    y: &GpuTensor,
) -> Result<()> {
    let op = "groups_to_nchw";
    let params = layout.params(op, y, &examples, 0.0)?;
    let len = layout.len(examples.len());
    expect_at_least(op, "rows", rows, len)?;
    rec.dispatch(&conv_kernel(op), &[rows], &[y], &params, grid(len))
}

/// Records the grouped rows of examples `examples` of `y [B, C, S]` into the first
/// `n·C·S` elements of `rows`.
pub fn nchw_to_groups(
    rec: &mut Recorder,
    layout: &ChannelGroups,
    y: &GpuTensor,
    examples: Range<usize>,
    rows: &GpuTensor,
) -> Result<()> {
    let op = "nchw_to_groups";
    let params = layout.params(op, y, &examples, 0.0)?;
    let len = layout.len(examples.len());
    expect_at_least(op, "rows", rows, len)?;
    rec.dispatch(&conv_kernel(op), &[y], &[rows], &params, grid(len))
}

/// Records `y[b, c, s] += bias[c]` over all of `y [B, C, S]`; `bias [C]`.
pub fn add_bias(
    rec: &mut Recorder,
    channels: usize,
    positions: usize,
    bias: &GpuTensor,
    y: &GpuTensor,
) -> Result<()> {
    let op = "add_bias";
    let layout = ChannelGroups {
        channels,
        positions,
        groups: 1,
    };
    let batch = y.len() / (channels * positions).max(1);
    let params = layout.params(op, y, &(0..batch), 0.0)?;
    expect_len(op, "bias", bias, channels)?;
    rec.dispatch(&conv_kernel(op), &[bias], &[y], &params, grid(y.len()))
}

/// Records `db[c] = Σ_{b,s} dy[b, c, s]` (or `db += …` with `accumulate`) for
/// `dy [B, C, S]`, `db [C]`: a deterministic reduction, one workgroup per channel.
pub fn bias_grad(
    rec: &mut Recorder,
    channels: usize,
    positions: usize,
    dy: &GpuTensor,
    db: &GpuTensor,
    accumulate: bool,
) -> Result<()> {
    let op = "bias_grad";
    let layout = ChannelGroups {
        channels,
        positions,
        groups: 1,
    };
    let batch = dy.len() / (channels * positions).max(1);
    let beta = if accumulate { 1.0 } else { 0.0 };
    let params = layout.params(op, dy, &(0..batch), beta)?;
    expect_len(op, "db", db, channels)?;
    rec.dispatch(
        &conv_kernel(op),
        &[dy],
        &[db],
        &params,
        grid_1d(channels as u32),
    )
}

/// Scratch buffers for one chunk of examples of a conv layer: its patches
/// `[G, n·S, D]` and grouped rows `[G, n·S, Cout/G]`, for up to [`Self::chunk`]
/// examples at a time.
pub struct ConvWorkspace {
    patches: GpuTensor,
    rows: GpuTensor,
    chunk: usize,
    geometry: Conv2dGeometry,
}

impl ConvWorkspace {
    /// Buffers for as many examples of `geo` per chunk as fit in `max_bytes` (at least
    /// one, at most the batch), each buffer also within the adapter's storage binding
    /// size limit.
    pub fn new(ctx: &GpuContext, geo: &Conv2dGeometry, max_bytes: usize) -> Result<Self> {
        geo.validate("conv workspace")?;
        let per_example = [patches_len(geo, 1), geo.out_channels * geo.positions()];
        let binding = ctx.limits.max_storage_buffer_binding_size as usize / 4;
        let by_budget = max_bytes / 4 / (per_example[0] + per_example[1]);
        let by_binding = binding / per_example[0].max(per_example[1]);
        if by_binding == 0 {
            return Err(Error::Memory(format!(
                "one example of conv {geo:?} needs {} bytes of patches, more than the \
                 adapter's max_storage_buffer_binding_size of {} bytes",
                4 * per_example[0],
                4 * binding
            )));
        }
        let chunk = by_budget.clamp(1, geo.batch).min(by_binding);
        Ok(Self {
            patches: ctx.zeros(&[chunk * per_example[0]])?,
            rows: ctx.zeros(&[chunk * per_example[1]])?,
            chunk,
            geometry: *geo,
        })
    }

    /// Examples processed per chunk.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Consecutive example ranges of at most [`Self::chunk`] examples covering `geo`'s
    /// batch, after checking that `geo` fits this workspace.
    fn chunks(&self, op: &str, geo: &Conv2dGeometry) -> Result<Vec<Range<usize>>> {
        let fits = Conv2dGeometry {
            batch: self.geometry.batch,
            ..*geo
        } == self.geometry;
        if !fits {
            return Err(Error::gpu(
                op,
                format!("workspace made for {:?} used for {geo:?}", self.geometry),
            ));
        }
        Ok((0..geo.batch)
            .step_by(self.chunk)
            .map(|e0| e0..(e0 + self.chunk).min(geo.batch))
            .collect())
    }
}

/// The grouped-rows layout of a conv output.
fn output_layout(geo: &Conv2dGeometry) -> ChannelGroups {
    ChannelGroups {
        channels: geo.out_channels,
        positions: geo.positions(),
        groups: geo.groups,
    }
}

/// The GEMM of `n` examples batched over the groups, with operands in
/// `patches [G, n·S, D]`, `rows [G, n·S, Og]` and the weight `[G, Og, D]`.
enum ConvGemm {
    /// `rows_g = patches_g · W_gᵀ`.
    Forward,
    /// `patches_g = rows_g · W_g`.
    Input,
    /// `dW_g = rows_gᵀ · patches_g` (`+ β·dW_g`).
    Weight { beta: f32 },
}

fn conv_gemm(geo: &Conv2dGeometry, n: usize, which: ConvGemm) -> Gemm {
    let (ns, d, og) = (
        n * geo.positions(),
        geo.patch_len(),
        geo.group_out_channels(),
    );
    // Packed operands: `batched` steps each by one group's matrix.
    match which {
        ConvGemm::Forward => Gemm::new(ns, og, d, false, true),
        ConvGemm::Input => Gemm::new(ns, d, og, false, false),
        ConvGemm::Weight { beta } => Gemm::new(og, d, ns, true, false).scaled(1.0, beta),
    }
    .batched(geo.groups)
}

/// Records the conv2d forward pass `y = conv(x, weight) + bias` for the whole batch:
/// `x [B, C, H, W]`, `weight [Cout, C/G, KH, KW]`, `bias [Cout]`, `y [B, Cout, OH, OW]`
/// (overwritten).
pub fn conv2d_forward(
    rec: &mut Recorder,
    geo: &Conv2dGeometry,
    ws: &ConvWorkspace,
    x: &GpuTensor,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
    y: &GpuTensor,
) -> Result<()> {
    let op = "conv2d forward";
    expect_len(op, "weight", weight, geo.weight_len())?;
    expect_len(op, "y", y, geo.output_len())?;
    let layout = output_layout(geo);
    for examples in ws.chunks(op, geo)? {
        im2col(rec, geo, x, examples.clone(), &ws.patches)?;
        let g = conv_gemm(geo, examples.len(), ConvGemm::Forward);
        gemm(rec, &g, &ws.patches, weight, &ws.rows)?;
        groups_to_nchw(rec, &layout, &ws.rows, examples, y)?;
    }
    if let Some(b) = bias {
        add_bias(rec, geo.out_channels, geo.positions(), b, y)?;
    }
    Ok(())
}

/// What the backward pass of a layer with a weight (linear, conv2d) reads and which
/// gradients it writes. Parameter gradients are overwritten, or added to with
/// `accumulate`; `grad_in` is always overwritten. Shapes: linear `[B, out]` outputs,
/// `[B, in]` inputs, weight `[out, in]`; conv2d `[B, Cout, OH, OW]` outputs, `[B, C, H,
/// W]` inputs, weight `[Cout, C/G, KH, KW]`; bias `[out]` or `[Cout]`.
pub struct WeightedBackward<'a> {
    /// The gradient of the layer output.
    pub grad_out: &'a GpuTensor,
    /// The layer input; needed for `grad_weight`.
    pub x: Option<&'a GpuTensor>,
    /// Needed for `grad_in`.
    pub weight: Option<&'a GpuTensor>,
    /// The input gradient, shaped as `x`.
    pub grad_in: Option<&'a GpuTensor>,
    /// Shaped as `weight`.
    pub grad_weight: Option<&'a GpuTensor>,
    pub grad_bias: Option<&'a GpuTensor>,
    pub accumulate: bool,
}

impl<'a> WeightedBackward<'a> {
    /// The weight, which `grad_in` needs (an error naming `op` without it).
    pub(crate) fn weight_for_grad_in(&self, op: &str) -> Result<&'a GpuTensor> {
        self.weight
            .ok_or_else(|| Error::gpu(op, "grad_in needs the weight"))
    }

    /// The layer input, which `grad_weight` needs (an error naming `op` without it).
    pub(crate) fn x_for_grad_weight(&self, op: &str) -> Result<&'a GpuTensor> {
        self.x
            .ok_or_else(|| Error::gpu(op, "grad_weight needs the layer input x"))
    }
}

/// Records the conv2d backward pass for the whole batch: the gradients `args` asks
/// for, per chunk of examples sharing one reshuffle of `grad_out`.
pub fn conv2d_backward(
    rec: &mut Recorder,
    geo: &Conv2dGeometry,
    ws: &ConvWorkspace,
    args: &WeightedBackward,
) -> Result<()> {
    let op = "conv2d backward";
    expect_len(op, "grad_out", args.grad_out, geo.output_len())?;
    let input = match args.grad_in {
        Some(grad_in) => {
            let weight = args.weight_for_grad_in(op)?;
            expect_len(op, "weight", weight, geo.weight_len())?;
            Some((grad_in, weight))
        }
        None => None,
    };
    let weight_grad = match args.grad_weight {
        Some(dw) => {
            let x = args.x_for_grad_weight(op)?;
            expect_len(op, "grad_weight", dw, geo.weight_len())?;
            Some((dw, x))
        }
        None => None,
    };
    if input.is_some() || weight_grad.is_some() {
        let layout = output_layout(geo);
        for (i, examples) in ws.chunks(op, geo)?.into_iter().enumerate() {
            let n = examples.len();
            nchw_to_groups(rec, &layout, args.grad_out, examples.clone(), &ws.rows)?;
            // The weight gradient reads the patches of x before the input gradient
            // overwrites them with patch gradients.
            if let Some((dw, x)) = weight_grad {
                im2col(rec, geo, x, examples.clone(), &ws.patches)?;
                let beta = if args.accumulate || i > 0 { 1.0 } else { 0.0 };
                gemm(
                    rec,
                    &conv_gemm(geo, n, ConvGemm::Weight { beta }),
                    &ws.rows,
                    &ws.patches,
                    dw,
                )?;
            }
            if let Some((grad_in, weight)) = input {
                gemm(
                    rec,
                    &conv_gemm(geo, n, ConvGemm::Input),
                    &ws.rows,
                    weight,
                    &ws.patches,
                )?;
                col2im(rec, geo, &ws.patches, examples, grad_in)?;
            }
        }
    }
    if let Some(db) = args.grad_bias {
        bias_grad(
            rec,
            geo.out_channels,
            geo.positions(),
            args.grad_out,
            db,
            args.accumulate,
        )?;
    }
    Ok(())
}
