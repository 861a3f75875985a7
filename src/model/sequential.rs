//! The network on the GPU: forward over a batch keeping what the curvature needs, and
//! backward of a stack of output gradients, all recorded into one compute pass each.
//!
//! Layouts: activations are batch-major, NCHW for images and `[B, features]` after a
//! flatten. The backward pass takes `V` gradients w.r.t. the network output at once,
//! `[V, B, C]`, and treats them as a batch of `V·B` examples: saved forward tensors are
//! repeated `V` times where a layer's backward needs them.

use std::rc::Rc;

use crate::error::{Error, Result};
use crate::geometry::{Conv2dGeometry, Pool2dGeometry};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::model::{Conv2dSpec, Layer, LinearSpec, Model, PoolSpec};
use crate::ops::conv::{ConvBackward, ConvWorkspace, conv2d_backward, conv2d_forward};
use crate::ops::linear::{LinearBackward, linear_backward, linear_forward};
use crate::ops::{activation, pool, reduce};

/// Scratch memory a conv layer may use for its im2col patches per chunk of examples
/// (less when the context's memory budget is small, see [`conv_workspace_bytes`]).
const CONV_WORKSPACE_BYTES: u64 = 64 << 20;

/// Bytes of im2col scratch one conv layer may hold during a pass: 64 MiB, or a
/// sixteenth of the context's memory budget when that is less.
fn conv_workspace_bytes(ctx: &GpuContext) -> usize {
    CONV_WORKSPACE_BYTES.min(ctx.memory_budget() / 16) as usize
}

/// A layer with its parameters on the GPU.
enum GpuLayer {
    Linear {
        spec: LinearSpec,
        weight: GpuTensor,
        bias: Option<GpuTensor>,
    },
    Conv2d {
        spec: Conv2dSpec,
        weight: GpuTensor,
        bias: Option<GpuTensor>,
    },
    Relu,
    Sigmoid,
    Tanh,
    Flatten,
    MaxPool2d(PoolSpec),
    AvgPool2d(PoolSpec),
}

/// A [`Model`] uploaded to the GPU.
pub struct Sequential {
    layers: Vec<GpuLayer>,
    /// Per-example shape entering each layer, then the output shape.
    shapes: Vec<Vec<usize>>,
}

/// What a forward pass over one batch keeps: the input of every layer and the output.
pub struct Forward {
    batch: usize,
    /// `activations[i]` is the input of layer `i` (`[B, *shape_i]`); the last entry is
    /// the network output `[B, C]`. Flatten's output is a view of its input's buffer.
    activations: Vec<Rc<GpuTensor>>,
}

impl Forward {
    /// Examples in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The network output `[B, C]`.
    pub fn output(&self) -> &GpuTensor {
        self.activations.last().expect("at least the input")
    }

    /// The input of layer `layer`, `[B, *shape]`.
    pub fn layer_input(&self, layer: usize) -> &GpuTensor {
        &self.activations[layer]
    }

    /// The output of layer `layer` (pre-activation for linear/conv2d), `[B, *shape]`.
    pub fn layer_output(&self, layer: usize) -> &GpuTensor {
        &self.activations[layer + 1]
    }
}

/// Gradients of one stacked backward pass.
pub struct Backward {
    stack: usize,
    /// Per layer index: for linear and conv2d layers the gradient w.r.t. the layer's
    /// output, `[V·B, *out_shape]` (`V`-major).
    output_grads: Vec<Option<GpuTensor>>,
    /// Per layer index: weight and bias gradients summed over the stack and the batch
    /// (PyTorch layout), when requested.
    param_grads: Vec<Option<(GpuTensor, Option<GpuTensor>)>>,
}

impl Backward {
    /// `V`.
    pub fn stack(&self) -> usize {
        self.stack
    }

    /// Gradient w.r.t. the output of linear/conv2d layer `layer`, `[V·B, *out]`.
    pub fn output_grad(&self, layer: usize) -> &GpuTensor {
        self.output_grads[layer]
            .as_ref()
            .expect("output gradients exist for linear and conv2d layers")
    }

    /// Weight and bias gradients of layer `layer`, if parameter gradients were requested.
    pub fn param_grads(&self, layer: usize) -> Option<(&GpuTensor, Option<&GpuTensor>)> {
        self.param_grads[layer]
            .as_ref()
            .map(|(w, b)| (w, b.as_ref()))
    }
}

fn conv_geometry(spec: &Conv2dSpec, batch: usize, input: &[usize]) -> Conv2dGeometry {
    spec.geometry(batch, [input[1], input[2]])
}

fn pool_geometry(spec: &PoolSpec, batch: usize, input: &[usize]) -> Pool2dGeometry {
    spec.geometry(batch, input[0], [input[1], input[2]])
}

fn batched(batch: usize, shape: &[usize]) -> Vec<usize> {
    let mut s = vec![batch];
    s.extend(shape);
    s
}

impl Sequential {
    /// Uploads the parameters of `model`.
    pub fn new(ctx: &GpuContext, model: &Model) -> Result<Self> {
        let shapes = model.spec.shapes()?;
        let mut layers = Vec::with_capacity(model.spec.layers.len());
        for (i, layer) in model.spec.layers.iter().enumerate() {
            let params = |shape: Vec<usize>| -> Result<(GpuTensor, Option<GpuTensor>)> {
                let p = model.params[i]
                    .as_ref()
                    .ok_or_else(|| Error::model(model.spec.label(i), "parameters missing"))?;
                let weight = ctx.upload(&p.weight, &shape)?;
                let bias = p
                    .bias
                    .as_ref()
                    .map(|b| ctx.upload(b, &[b.len()]))
                    .transpose()?;
                Ok((weight, bias))
            };
            layers.push(match layer {
                Layer::Linear(l) => {
                    let (weight, bias) = params(l.weight_shape())?;
                    GpuLayer::Linear {
                        spec: l.clone(),
                        weight,
                        bias,
                    }
                }
                Layer::Conv2d(c) => {
                    let (weight, bias) = params(c.weight_shape())?;
                    GpuLayer::Conv2d {
                        spec: c.clone(),
                        weight,
                        bias,
                    }
                }
                Layer::Relu => GpuLayer::Relu,
                Layer::Sigmoid => GpuLayer::Sigmoid,
                Layer::Tanh => GpuLayer::Tanh,
                Layer::Flatten => GpuLayer::Flatten,
                Layer::MaxPool2d(p) => GpuLayer::MaxPool2d(p.clone()),
                Layer::AvgPool2d(p) => GpuLayer::AvgPool2d(p.clone()),
            });
        }
        Ok(Self { layers, shapes })
    }

    /// Elements of every layer input and of the output of one example: what a forward
    /// pass keeps, and about what a backward pass holds per stacked vector.
    pub fn activation_elements(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Bytes the conv layers' im2col workspaces hold at once during a pass: each
    /// 64 MiB or a sixteenth of the memory budget, unless one example's patches alone
    /// need more.
    pub fn workspace_bytes(&self, ctx: &GpuContext) -> u64 {
        let convs = self
            .layers
            .iter()
            .filter(|l| matches!(l, GpuLayer::Conv2d { .. }))
            .count();
        convs as u64 * conv_workspace_bytes(ctx) as u64
    }

    /// Elements of the largest layer input or output of one example.
    pub fn largest_activation(&self) -> usize {
        self.shapes
            .iter()
            .map(|s| s.iter().product::<usize>())
            .max()
            .unwrap_or(0)
    }

    /// `C`, the number of network outputs per example.
    pub fn num_outputs(&self) -> usize {
        self.shapes.last().map_or(0, |s| s.iter().product())
    }

    /// Runs the network on `x` (`[B, *input_shape]`), recording every layer into one
    /// compute pass, and keeps every layer's input (`x` becomes the first).
    pub fn forward(&self, ctx: &GpuContext, x: GpuTensor) -> Result<Forward> {
        let example: usize = self.shapes[0].iter().product();
        if example == 0 || !x.len().is_multiple_of(example) {
            return Err(Error::gpu(
                "forward",
                format!(
                    "input of {} values is not a batch of examples of shape {:?}",
                    x.len(),
                    self.shapes[0]
                ),
            ));
        }
        let batch = x.len() / example;
        let input = x.reshape(&batched(batch, &self.shapes[0]))?;
        let mut rec = ctx.recorder();
        let mut workspaces = Vec::new();
        let mut activations = vec![Rc::new(input)];
        for (i, layer) in self.layers.iter().enumerate() {
            let x = activations[i].clone();
            let out_shape = batched(batch, &self.shapes[i + 1]);
            if let GpuLayer::Flatten = layer {
                activations.push(Rc::new(x.view(&out_shape)?));
                continue;
            }
            let y = ctx.zeros(&out_shape)?;
            match layer {
                GpuLayer::Linear { spec, weight, bias } => {
                    let geo = spec.geometry(batch);
                    linear_forward(&mut rec, &geo, &x, weight, bias.as_ref(), &y)?;
                }
                GpuLayer::Conv2d { spec, weight, bias } => {
                    let geo = conv_geometry(spec, batch, &self.shapes[i]);
                    let ws = ConvWorkspace::new(ctx, &geo, conv_workspace_bytes(ctx))?;
                    conv2d_forward(&mut rec, &geo, &ws, &x, weight, bias.as_ref(), &y)?;
                    workspaces.push(ws);
                }
                GpuLayer::Relu => activation::relu_forward(&mut rec, &x, &y)?,
                GpuLayer::Sigmoid => activation::sigmoid_forward(&mut rec, &x, &y)?,
                GpuLayer::Tanh => activation::tanh_forward(&mut rec, &x, &y)?,
                GpuLayer::MaxPool2d(p) => {
                    let geo = pool_geometry(p, batch, &self.shapes[i]);
                    let argmax = ctx.zeros(&out_shape)?;
                    pool::max_pool2d_forward(&mut rec, &geo, &x, &y, &argmax)?;
                }
                GpuLayer::AvgPool2d(p) => {
                    let geo = pool_geometry(p, batch, &self.shapes[i]);
                    pool::avg_pool2d_forward(&mut rec, &geo, &x, &y)?;
                }
                GpuLayer::Flatten => unreachable!("handled above"),
            }
            activations.push(Rc::new(y));
        }
        rec.submit()?;
        drop(workspaces);
        Ok(Forward { batch, activations })
    }

    /// Backpropagates `grad_output` (`[V, B, C]`, the gradients of `V` scalar functions
    /// w.r.t. the network output) through the network recorded by `forward`, in one
    /// compute pass. Returns the gradient w.r.t. every linear/conv2d layer's output and,
    /// with `param_grads`, the parameter gradients summed over `V` and `B`.
    pub fn backward(
        &self,
        ctx: &GpuContext,
        forward: &Forward,
        grad_output: &GpuTensor,
        stack: usize,
        param_grads: bool,
    ) -> Result<Backward> {
        let batch = forward.batch;
        let rows = stack * batch;
        if stack == 0 || grad_output.len() != rows * self.num_outputs() {
            return Err(Error::gpu(
                "backward",
                format!(
                    "expected gradients [{stack}, {batch}, {}], found {} values",
                    self.num_outputs(),
                    grad_output.len()
                ),
            ));
        }
        let first_with_params = self
            .layers
            .iter()
            .position(|l| matches!(l, GpuLayer::Linear { .. } | GpuLayer::Conv2d { .. }))
            .unwrap_or(self.layers.len());
        let mut output_grads: Vec<Option<GpuTensor>> =
            (0..self.layers.len()).map(|_| None).collect();
        let mut grads: Vec<Option<(GpuTensor, Option<GpuTensor>)>> =
            (0..self.layers.len()).map(|_| None).collect();
        let mut keep: Vec<GpuTensor> = Vec::new();
        let mut workspaces = Vec::new();
        let mut rec = ctx.recorder();
        // `current` is the gradient w.r.t. the output of layer `i` while walking back.
        let start = ctx.zeros(&batched(rows, &self.shapes[self.layers.len()]))?;
        reduce::copy(&mut rec, grad_output, 0, &start, 0, grad_output.len())?;
        let mut current = Some(start);
        for i in (first_with_params..self.layers.len()).rev() {
            let grad_out = current
                .take()
                .expect("a gradient flows into every visited layer");
            let in_shape = batched(rows, &self.shapes[i]);
            let needs_input_grad = i > first_with_params;
            let saved_input = forward.layer_input(i);
            let saved_output = forward.layer_output(i);
            let next = match &self.layers[i] {
                GpuLayer::Flatten => Some(grad_out.reshape(&in_shape)?),
                GpuLayer::Linear { spec, weight, bias } => {
                    let repeated = if param_grads {
                        repeat(ctx, &mut rec, saved_input, stack)?
                    } else {
                        None
                    };
                    let geo = spec.geometry(rows);
                    let grad_in = needs_input_grad.then(|| ctx.zeros(&in_shape)).transpose()?;
                    let param = param_grads
                        .then(|| parameter_grads(ctx, weight, bias.as_ref()))
                        .transpose()?;
                    linear_backward(
                        &mut rec,
                        &geo,
                        &LinearBackward {
                            grad_out: &grad_out,
                            x: param_grads.then(|| repeated.as_ref().unwrap_or(saved_input)),
                            weight: Some(weight),
                            grad_in: grad_in.as_ref(),
                            grad_weight: param.as_ref().map(|(w, _)| w),
                            grad_bias: param.as_ref().and_then(|(_, b)| b.as_ref()),
                            accumulate: false,
                        },
                    )?;
                    grads[i] = param;
                    keep.extend(repeated);
                    output_grads[i] = Some(grad_out);
                    grad_in
                }
                GpuLayer::Conv2d { spec, weight, bias } => {
                    let repeated = if param_grads {
                        repeat(ctx, &mut rec, saved_input, stack)?
                    } else {
                        None
                    };
                    let geo = conv_geometry(spec, rows, &self.shapes[i]);
                    let ws = ConvWorkspace::new(ctx, &geo, conv_workspace_bytes(ctx))?;
                    let grad_in = needs_input_grad.then(|| ctx.zeros(&in_shape)).transpose()?;
                    let param = param_grads
                        .then(|| parameter_grads(ctx, weight, bias.as_ref()))
                        .transpose()?;
                    conv2d_backward(
                        &mut rec,
                        &geo,
                        &ws,
                        &ConvBackward {
                            grad_out: &grad_out,
                            x: param_grads.then(|| repeated.as_ref().unwrap_or(saved_input)),
                            weight: Some(weight),
                            grad_in: grad_in.as_ref(),
                            grad_weight: param.as_ref().map(|(w, _)| w),
                            grad_bias: param.as_ref().and_then(|(_, b)| b.as_ref()),
                            accumulate: false,
                        },
                    )?;
                    grads[i] = param;
                    keep.extend(repeated);
                    workspaces.push(ws);
                    output_grads[i] = Some(grad_out);
                    grad_in
                }
                GpuLayer::Relu | GpuLayer::Sigmoid | GpuLayer::Tanh => {
                    let layer = &self.layers[i];
                    let saved = if let GpuLayer::Relu = layer {
                        saved_input
                    } else {
                        saved_output
                    };
                    let repeated = repeat(ctx, &mut rec, saved, stack)?;
                    let saved = repeated.as_ref().unwrap_or(saved);
                    let gx = ctx.zeros(&in_shape)?;
                    match layer {
                        GpuLayer::Relu => {
                            activation::relu_backward(&mut rec, saved, &grad_out, &gx)?
                        }
                        GpuLayer::Sigmoid => {
                            activation::sigmoid_backward(&mut rec, saved, &grad_out, &gx)?
                        }
                        _ => activation::tanh_backward(&mut rec, saved, &grad_out, &gx)?,
                    }
                    keep.extend(repeated);
                    keep.push(grad_out);
                    Some(gx)
                }
                GpuLayer::MaxPool2d(p) => {
                    // The argmax of the repeated input is the repeated argmax.
                    let repeated = repeat(ctx, &mut rec, saved_input, stack)?;
                    let x = repeated.as_ref().unwrap_or(saved_input);
                    let geo = pool_geometry(p, rows, &self.shapes[i]);
                    let pooled = ctx.zeros(grad_out.shape())?;
                    let argmax = ctx.zeros(grad_out.shape())?;
                    pool::max_pool2d_forward(&mut rec, &geo, x, &pooled, &argmax)?;
                    let gx = ctx.zeros(&in_shape)?;
                    pool::max_pool2d_backward(&mut rec, &geo, &grad_out, &argmax, &gx)?;
                    keep.extend(repeated);
                    keep.extend([pooled, argmax, grad_out]);
                    Some(gx)
                }
                GpuLayer::AvgPool2d(p) => {
                    let geo = pool_geometry(p, rows, &self.shapes[i]);
                    let gx = ctx.zeros(&in_shape)?;
                    pool::avg_pool2d_backward(&mut rec, &geo, &grad_out, &gx)?;
                    keep.push(grad_out);
                    Some(gx)
                }
            };
            match next {
                Some(n) => current = Some(n),
                None => break,
            }
        }
        rec.submit()?;
        drop(keep);
        drop(workspaces);
        Ok(Backward {
            stack,
            output_grads,
            param_grads: grads,
        })
    }
}

/// Zeroed weight and bias gradient tensors shaped like the parameters.
fn parameter_grads(
    ctx: &GpuContext,
    weight: &GpuTensor,
    bias: Option<&GpuTensor>,
) -> Result<(GpuTensor, Option<GpuTensor>)> {
    Ok((
        ctx.zeros(weight.shape())?,
        bias.map(|b| ctx.zeros(b.shape())).transpose()?,
    ))
}

/// `t` repeated `stack` times along a new leading axis, or `None` when `stack` is 1
/// (use `t` itself).
fn repeat(
    ctx: &GpuContext,
    rec: &mut Recorder,
    t: &GpuTensor,
    stack: usize,
) -> Result<Option<GpuTensor>> {
    if stack == 1 {
        return Ok(None);
    }
    let mut shape = t.shape().to_vec();
    shape[0] *= stack;
    let out = ctx.zeros(&shape)?;
    for v in 0..stack {
        reduce::copy(rec, t, 0, &out, v * t.len(), t.len())?;
    }
    Ok(Some(out))
}
