//! `torch.nn.Conv2d` (zero padding): `[B, C_in, H, W] → [B, C_out, OH, OW]`, weight
//! `[C_out, C_in/groups, KH, KW]`, bias `[C_out]`, through im2col and GEMM. A curvature
//! layer sharing its weight over `S = OH·OW` positions; its expand-format inputs are
//! the im2col patches averaged over channel groups, as curvlinops forms them.

use crate::curvature::layer::CurvatureLayer;
use crate::error::Result;
use crate::geometry::Conv2dGeometry;
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::linear::WeightedGrads;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input, spatial_input,
};
use crate::ops::conv::{ConvWorkspace, conv2d_backward, conv2d_forward};
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::im2col::{im2col, im2col_group_mean};
use crate::ops::reduce::{Sum, sum_cols, transpose};
use crate::reference::ops;

/// Scratch memory a conv layer may use for its im2col patches per chunk of examples
/// (less when the context's memory budget is small, see [`conv_workspace_bytes`]).
const CONV_WORKSPACE_BYTES: u64 = 64 << 20;

/// Bytes of im2col scratch one conv layer may hold during a pass: 64 MiB, or a
/// sixteenth of the context's memory budget when that is less.
fn conv_workspace_bytes(ctx: &GpuContext) -> usize {
    CONV_WORKSPACE_BYTES.min(ctx.memory_budget() / 16) as usize
}

/// A 2-D convolution.
#[derive(Debug)]
pub struct Conv2d {
    /// The geometry of one example (`batch` 1).
    geometry: Conv2dGeometry,
    bias: bool,
    output: Vec<usize>,
}

/// Builds a conv2d layer from PyTorch's attributes (`in_channels`, `out_channels`,
/// `kernel_size`, `stride` 1, `padding` 0, `dilation` 1, `groups` 1, `bias` true,
/// `padding_mode` "zeros").
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(
        node,
        &[
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
            "padding_mode",
        ],
    )?;
    a.only("padding_mode", serde_json::json!("zeros"))?;
    let in_channels = a.usize("in_channels")?;
    let out_channels = a.usize("out_channels")?;
    let kernel_size = a.required_pair("kernel_size")?;
    let stride = a.pair("stride")?.unwrap_or([1, 1]);
    let dilation = a.pair("dilation")?.unwrap_or([1, 1]);
    let padding = a.conv_padding(kernel_size, stride, dilation)?;
    let groups = a.usize_or("groups", 1)?;
    let bias = a.bool_or("bias", true)?;
    let [h, w] = spatial_input(input).ok_or_else(|| {
        a.err(format!(
            "conv2d takes a 4-D input [B, C, H, W], but its input is {}",
            batched_shape(input)
        ))
    })?;
    if in_channels == 0 || out_channels == 0 || groups == 0 {
        return Err(a.err(format!(
            "in_channels, out_channels and groups must be positive, found {in_channels}, \
             {out_channels} and {groups}"
        )));
    }
    if kernel_size.contains(&0) || stride.contains(&0) || dilation.contains(&0) {
        return Err(a.err(format!(
            "kernel_size, stride and dilation must be positive, found {kernel_size:?}, \
             {stride:?} and {dilation:?}"
        )));
    }
    if !in_channels.is_multiple_of(groups) {
        return Err(a.err(format!(
            "in_channels ({in_channels}) is not divisible by groups ({groups})"
        )));
    }
    if !out_channels.is_multiple_of(groups) {
        return Err(a.err(format!(
            "out_channels ({out_channels}) is not divisible by groups ({groups})"
        )));
    }
    if input[0] != in_channels {
        return Err(a.err(format!(
            "in_channels is {in_channels} but the input has {} channels (input {})",
            input[0],
            batched_shape(input)
        )));
    }
    let mut out = [0; 2];
    for axis in 0..2 {
        let size = [h, w][axis];
        // ⌊(H + 2p − d(k−1) − 1)/s⌋ + 1 in checked arithmetic.
        let padded = padding[axis]
            .checked_mul(2)
            .and_then(|p| p.checked_add(size))
            .ok_or_else(|| {
                a.err(format!(
                    "padding {:?} overflows with input [H, W] = [{h}, {w}]",
                    padding
                ))
            })?;
        let span = dilation[axis]
            .checked_mul(kernel_size[axis] - 1)
            .and_then(|s| s.checked_add(1))
            .ok_or_else(|| {
                a.err(format!(
                    "kernel_size {kernel_size:?} with dilation {dilation:?} overflows"
                ))
            })?;
        if padded < span {
            return Err(a.err(format!(
                "output size would be ≤ 0: input [H, W] = [{h}, {w}], kernel_size \
                 {kernel_size:?}, stride {stride:?}, padding {padding:?}, dilation \
                 {dilation:?} (the dilated kernel must fit the padded input)"
            )));
        }
        out[axis] = (padded - span) / stride[axis] + 1;
    }
    let positions = out[0].checked_mul(out[1]);
    let weight = (in_channels / groups)
        .checked_mul(kernel_size[0])
        .and_then(|v| v.checked_mul(kernel_size[1]))
        .and_then(|v| v.checked_mul(out_channels));
    if positions
        .and_then(|s| s.checked_mul(out_channels))
        .is_none()
        || weight.is_none()
    {
        return Err(a.err("the output or the weight has more elements than fit in memory"));
    }
    Ok(Box::new(Conv2d {
        geometry: Conv2dGeometry {
            batch: 1,
            in_channels,
            out_channels,
            in_size: [h, w],
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
        },
        bias,
        output: vec![out_channels, out[0], out[1]],
    }))
}

impl Conv2d {
    fn geometry(&self, batch: usize) -> Conv2dGeometry {
        Conv2dGeometry {
            batch,
            ..self.geometry
        }
    }
}

impl Layer for Conv2d {
    fn op(&self) -> &'static str {
        "conv2d"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        ParamSpec::weight_and_bias(
            self.weight_shape(),
            self.bias.then_some(self.geometry.out_channels),
        )
    }

    fn workspace_bytes(&self, ctx: &GpuContext) -> u64 {
        conv_workspace_bytes(ctx) as u64
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        let geo = self.geometry(args.batch);
        let ws = ConvWorkspace::new(pass.ctx(), &geo, conv_workspace_bytes(pass.ctx()))?;
        conv2d_forward(
            &mut pass.rec,
            &geo,
            &ws,
            args.inputs[0],
            &args.params[0],
            args.params.get(1),
            &y,
        )?;
        pass.keep(ws);
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let geo = self.geometry(args.stack * args.batch);
        let in_shape = [geo.in_channels, geo.in_size[0], geo.in_size[1]];
        let grads = WeightedGrads::new(pass, args, &in_shape)?;
        let ws = ConvWorkspace::new(pass.ctx(), &geo, conv_workspace_bytes(pass.ctx()))?;
        conv2d_backward(&mut pass.rec, &geo, &ws, &grads.op_args(args))?;
        pass.keep(ws);
        Ok(grads.finish(pass))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        ops::conv2d_forward(
            args.inputs[0],
            &args.params[0],
            args.params.get(1).map(Vec::as_slice),
            &self.geometry(args.batch),
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let geo = self.geometry(args.stack * args.batch);
        let params = args.param_grads.then(|| {
            let x = args.inputs[0].repeat(args.stack);
            let mut p = vec![ops::conv2d_backward_weight(args.grad_out, &x, &geo)];
            if self.bias {
                p.push(ops::conv2d_backward_bias(args.grad_out, &geo));
            }
            p
        });
        let input = args.input_grads[0]
            .then(|| ops::conv2d_backward_input(args.grad_out, &args.params[0], &geo));
        Grads {
            inputs: vec![input],
            params,
        }
    }

    fn curvature(&self) -> Option<&dyn CurvatureLayer> {
        Some(self)
    }
}

impl CurvatureLayer for Conv2d {
    fn out_features(&self) -> usize {
        self.geometry.out_channels
    }

    fn in_features(&self) -> usize {
        self.geometry.patch_len()
    }

    fn positions(&self) -> usize {
        self.geometry.positions()
    }

    fn has_bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        let g = &self.geometry;
        vec![
            g.out_channels,
            g.in_channels / g.groups,
            g.kernel_size[0],
            g.kernel_size[1],
        ]
    }

    fn expand_inputs(&self, pass: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor> {
        let geo = self.geometry(batch);
        let patches = pass.zeros(&[batch * self.positions(), self.in_features()])?;
        im2col_group_mean(&mut pass.rec, &geo, input, 0..batch, &patches)?;
        Ok(patches)
    }

    fn groups(&self) -> usize {
        self.geometry.groups
    }

    fn gradient_inputs(
        &self,
        pass: &mut Pass,
        input: &GpuTensor,
        batch: usize,
    ) -> Result<GpuTensor> {
        let geo = self.geometry(batch);
        let patches = pass.zeros(&[geo.groups, batch * self.positions(), self.in_features()])?;
        im2col(&mut pass.rec, &geo, input, 0..batch, &patches)?;
        Ok(patches)
    }

    fn reduce_inputs(&self, pass: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor> {
        let (s, d) = (self.positions(), self.in_features());
        let patches = self.expand_inputs(pass, input, batch)?;
        let mean = pass.zeros(&[batch, d])?;
        let ones = pass.ctx().upload(&vec![1.0; s], &[1, s])?;
        let mut average = Gemm::new(1, d, s, false, false)
            .batched(batch)
            .scaled(1.0 / s as f32, 0.0);
        average.stride_a = 0;
        gemm(&mut pass.rec, &average, &ones, &patches, &mean)?;
        pass.keep(patches);
        pass.keep(ones);
        Ok(mean)
    }

    fn expand_grads(&self, pass: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        let (s, d_out) = (self.positions(), self.out_features());
        let rows = grads.len() / (s * d_out);
        let out = pass.zeros(&[rows * s, d_out])?;
        transpose(&mut pass.rec, grads, &out, rows, d_out, s)?;
        Ok(out)
    }

    fn summed_grads(&self, pass: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        let (s, d_out) = (self.positions(), self.out_features());
        let rows = grads.len() / s;
        let out = pass.zeros(&[rows / d_out, d_out])?;
        sum_cols(&mut pass.rec, grads, &out, &Sum::new(rows, s))?;
        Ok(out)
    }

    fn reference_expand_inputs(&self, input: &[f64], batch: usize) -> Vec<f64> {
        ops::im2col_group_mean(input, &self.geometry(batch))
    }

    fn reference_expand_grads(&self, grads: &[f64]) -> Vec<f64> {
        let (s, d_out) = (self.positions(), self.out_features());
        let rows = grads.len() / (s * d_out);
        let mut out = vec![0.0; grads.len()];
        for vb in 0..rows {
            for o in 0..d_out {
                for p in 0..s {
                    out[(vb * s + p) * d_out + o] = grads[(vb * d_out + o) * s + p];
                }
            }
        }
        out
    }
}
