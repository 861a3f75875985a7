//! Layers: one file per layer type behind [`Layer`], built from graph nodes through
//! [`REGISTRY`] (op name → constructor).
//!
//! A layer knows its per-example output shape (fixed when it is built from its input
//! shapes), its parameter tensors, and computes forward and backward twice: on the GPU
//! (recording kernels of [`crate::ops`] into a [`Pass`]) and in f64 for the reference
//! ([`crate::reference`]). Backward is the vector–Jacobian product of a stack of `V`
//! backpropagated vectors at once: gradients are `[V·B, *shape]`, `V`-major, while
//! the saved forward tensors are `[B, *shape]` (a layer repeats them where it needs
//! them per row).
//!
//! Adding a layer: a file here implementing [`Layer`] (and
//! [`CurvatureLayer`] if KFAC should approximate it), one line in [`REGISTRY`].

pub mod activation;
pub mod adaptive_avg_pool;
pub mod add;
pub mod add_parameter;
pub mod attention;
pub mod attrs;
pub mod batch_norm;
pub mod cat;
pub mod cat_parameter;
pub mod conv2d;
pub mod embedding;
pub mod flatten;
pub mod gated;
pub mod group_norm;
pub mod identity;
pub mod layer_norm;
pub mod linear;
pub mod masked_fill;
pub mod matmul;
pub mod mean;
pub mod mul;
pub mod mul_parameter;
pub mod multi_head_attention;
pub mod pool;
pub mod scale;
pub mod shape;
pub mod slice;
pub mod softmax;
pub mod upsample;
pub mod view;

use std::any::Any;

use crate::curvature::layer::CurvatureLayer;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::graph::Node;
use crate::ops::reduce;
use crate::ops::shape::Gather;

/// One parameter (or buffer) tensor of a layer: the weights file holds it as
/// `<module>.<suffix>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub suffix: &'static str,
    /// PyTorch shape.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// `weight` of `weight_shape`, then `bias` of `[len]` where `bias` is `Some(len)`.
    pub fn weight_and_bias(weight_shape: Vec<usize>, bias: Option<usize>) -> Vec<ParamSpec> {
        let weight = ParamSpec {
            suffix: "weight",
            shape: weight_shape,
        };
        std::iter::once(weight)
            .chain(bias.map(|len| ParamSpec {
                suffix: "bias",
                shape: vec![len],
            }))
            .collect()
    }
}

/// The arguments of a forward call: `T` is a tensor (`GpuTensor` or `[f64]`), `P` a
/// parameter tensor in the order of [`Layer::params`].
pub struct ForwardArgs<'a, T: ?Sized, P> {
    /// `B`, examples in the batch.
    pub batch: usize,
    /// The node's inputs, `[B, *shape]` each.
    pub inputs: &'a [&'a T],
    pub params: &'a [P],
}

/// The arguments of a stacked backward call.
pub struct BackwardArgs<'a, T: ?Sized, P> {
    /// `V`, backpropagated vectors.
    pub stack: usize,
    /// `B`.
    pub batch: usize,
    /// Gradient w.r.t. the node's output, `[V·B, *out]`.
    pub grad_out: &'a T,
    /// The forward inputs, `[B, *in]` each.
    pub inputs: &'a [&'a T],
    /// The forward output, `[B, *out]`.
    pub output: &'a T,
    pub params: &'a [P],
    /// Which inputs need a gradient.
    pub input_grads: &'a [bool],
    /// Whether to return the parameter gradients (summed over `V` and `B`).
    pub param_grads: bool,
}

/// What a backward call returns.
pub struct Grads<T> {
    /// Per input: `[V·B, *in]` where asked for.
    pub inputs: Vec<Option<T>>,
    /// Per parameter (PyTorch layout, summed over `V·B`) where asked for.
    pub params: Option<Vec<T>>,
}

impl<T> Grads<T> {
    /// The gradient of a layer's one input (where asked for), without parameters.
    pub fn one_input(input: Option<T>) -> Self {
        Self {
            inputs: vec![input],
            params: None,
        }
    }
}

/// One compute pass being recorded, with the tensors its dispatches use that must
/// live until it is submitted.
pub struct Pass<'c> {
    pub rec: Recorder<'c>,
    keep: Vec<Box<dyn Any>>,
}

impl<'c> Pass<'c> {
    pub fn new(ctx: &'c GpuContext) -> Self {
        Self {
            rec: ctx.recorder(),
            keep: Vec::new(),
        }
    }

    pub fn ctx(&self) -> &'c GpuContext {
        self.rec.context()
    }

    /// A zeroed tensor.
    pub fn zeros(&self, shape: &[usize]) -> Result<GpuTensor> {
        self.ctx().zeros(shape)
    }

    /// Keeps `value` (a tensor or workspace a dispatch reads) until submission.
    pub fn keep(&mut self, value: impl Any) {
        self.keep.push(Box::new(value));
    }

    /// A new tensor of `shape` (`g.len()` elements) holding `gather(x)`.
    pub fn gather(&mut self, g: &Gather, x: &GpuTensor, shape: &[usize]) -> Result<GpuTensor> {
        let y = self.zeros(shape)?;
        crate::ops::shape::gather(&mut self.rec, g, x, &y)?;
        Ok(y)
    }

    /// `t` repeated `stack` times along its leading axis (`[B, ..] → [V·B, ..]`), or
    /// a view of `t` when `stack` is 1.
    pub fn repeat(&mut self, t: &GpuTensor, stack: usize) -> Result<GpuTensor> {
        if stack == 1 {
            return t.view(t.shape());
        }
        let mut shape = t.shape().to_vec();
        shape[0] *= stack;
        let out = self.zeros(&shape)?;
        for v in 0..stack {
            reduce::copy(&mut self.rec, t, 0, &out, v * t.len(), t.len())?;
        }
        Ok(out)
    }

    /// Submits the pass and releases what it kept.
    pub fn submit(self) -> Result<()> {
        self.rec.submit()?;
        drop(self.keep);
        Ok(())
    }
}

/// `t` repeated `stack` times (the f64 counterpart of [`Pass::repeat`]).
pub fn repeat64(t: &[f64], stack: usize) -> Vec<f64> {
    t.repeat(stack)
}

/// The forward values a layer's backward reads. The executor releases every other
/// value after the forward pass (keeping the network output and the curvature layers'
/// inputs, which the curvature reads); a backward that binds a value it did not
/// declare fails with an error, never with a wrong number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The node's inputs, `[B, *in]` each.
    pub inputs: bool,
    /// The node's output, `[B, *out]`.
    pub output: bool,
}

impl Saved {
    /// Backward reads no forward value (linear maps of the gradient: add, pools that
    /// average, reshapes).
    pub const NOTHING: Saved = Saved {
        inputs: false,
        output: false,
    };
    /// Backward reads the inputs.
    pub const INPUTS: Saved = Saved {
        inputs: true,
        output: false,
    };
    /// Backward reads the output.
    pub const OUTPUT: Saved = Saved {
        inputs: false,
        output: true,
    };
    /// Backward may read everything.
    pub const ALL: Saved = Saved {
        inputs: true,
        output: true,
    };
}

/// A layer type. Built from a graph node and its input shapes by a constructor in
/// [`REGISTRY`]; shapes are per example (no batch axis).
pub trait Layer: std::fmt::Debug {
    /// The op name in `model.json`.
    fn op(&self) -> &'static str;

    /// The per-example output shape.
    fn output_shape(&self) -> &[usize];

    /// Parameter and buffer tensors, in the order forward and backward take them.
    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }

    /// The weights-file key of its parameter `suffix` when the node's module is
    /// `module`: `<module>.<suffix>`, unless the layer names its tensor in full.
    fn param_key(&self, module: &str, suffix: &str) -> String {
        format!("{module}.{suffix}")
    }

    /// Suffixes of `state_dict` entries the layer does not use, accepted in a weights
    /// file and ignored, whatever their dtype (BatchNorm's `num_batches_tracked`).
    fn ignored_params(&self) -> &'static [&'static str] {
        &[]
    }

    /// Bytes of scratch memory the layer holds during a GPU pass (conv im2col).
    fn workspace_bytes(&self, _ctx: &GpuContext) -> u64 {
        0
    }

    /// Elements per example that the layer's forward or backward holds besides its
    /// inputs and output (the multi-head attention's projections and heads), counted
    /// into the activations a pass plans for.
    fn scratch_elements(&self) -> usize {
        0
    }

    /// Whether the GPU output is a view of the (single) input's buffer: backward then
    /// needs nothing of the forward pass, and the activation costs no memory.
    fn is_view(&self) -> bool {
        false
    }

    /// Which forward values backward reads ([`BackwardArgs::inputs`],
    /// [`BackwardArgs::output`]); the others are released after the forward pass.
    fn saved(&self) -> Saved {
        Saved::ALL
    }

    /// Records the forward pass; returns the output `[B, *out]`.
    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor>;

    /// Records the backward pass of a stack of vectors.
    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>>;

    /// The f64 forward pass.
    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64>;

    /// The f64 backward pass.
    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>>;

    /// The layer as KFAC sees it, if KFAC approximates it (linear, conv2d).
    fn curvature(&self) -> Option<&dyn CurvatureLayer> {
        None
    }
}

/// Builds a layer from its node and the per-example shapes of its inputs.
pub type Constructor = fn(&Node, &[&[usize]]) -> Result<Box<dyn Layer>>;

/// Every layer type: op name → constructor.
pub static REGISTRY: &[(&str, Constructor)] = &[
    ("linear", linear::build),
    ("conv2d", conv2d::build),
    ("relu", activation::build_relu),
    ("sigmoid", activation::build_sigmoid),
    ("tanh", activation::build_tanh),
    ("flatten", flatten::build),
    ("max_pool2d", pool::build_max),
    ("avg_pool2d", pool::build_avg),
    ("adaptive_avg_pool2d", adaptive_avg_pool::build),
    ("add", add::build),
    ("batch_norm2d", batch_norm::build),
    ("batch_norm1d", batch_norm::build),
    ("cat", cat::build),
    ("layer_norm", layer_norm::build),
    ("upsample_nearest2d", upsample::build),
    ("gelu", gated::build_gelu),
    ("silu", gated::build_silu),
    ("identity", identity::build),
    ("reshape", shape::build_reshape),
    ("transpose", shape::build_transpose),
    ("permute", shape::build_permute),
    ("mean", mean::build),
    ("mul_constant", scale::build_mul),
    ("div_constant", scale::build_div),
    ("add_constant", scale::build_add),
    ("embedding", embedding::build),
    ("add_parameter", add_parameter::build),
    ("matmul", matmul::build),
    ("softmax", softmax::build),
    ("masked_fill", masked_fill::build),
    ("scaled_dot_product_attention", attention::build),
    ("slice", slice::build),
    ("cat_parameter", cat_parameter::build),
    ("multi_head_attention", multi_head_attention::build),
    ("leaky_relu", activation::build_pointwise),
    ("elu", activation::build_pointwise),
    ("hardtanh", activation::build_pointwise),
    ("hardswish", activation::build_pointwise),
    ("hardsigmoid", activation::build_pointwise),
    ("softplus", activation::build_pointwise),
    ("mish", activation::build_pointwise),
    ("mul", mul::build),
    ("group_norm", group_norm::build),
    ("mul_parameter", mul_parameter::build),
];

/// Builds `node`'s layer through [`REGISTRY`].
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let Some((_, constructor)) = REGISTRY.iter().find(|(op, _)| *op == node.op) else {
        let ops: Vec<&str> = REGISTRY.iter().map(|(op, _)| *op).collect();
        return Err(Error::model(
            node.label(),
            format!("unknown op \"{}\" (supported: {})", node.op, ops.join(", ")),
        ));
    };
    constructor(node, inputs)
}

/// Formats a per-example shape with its batch axis, e.g. `[B, 16, 8, 8]`.
pub fn batched_shape(shape: &[usize]) -> String {
    let mut s = String::from("[B");
    for d in shape {
        s.push_str(&format!(", {d}"));
    }
    s.push(']');
    s
}

/// `(H, W)` of a per-example `[C, H, W]` shape.
pub(crate) fn spatial_input(input: &[usize]) -> Option<[usize; 2]> {
    match input {
        [_, h, w] => Some([*h, *w]),
        _ => None,
    }
}

/// The single input of a one-input layer, or an error naming the node.
pub(crate) fn one_input<'s>(node: &Node, inputs: &[&'s [usize]]) -> Result<&'s [usize]> {
    match inputs {
        [x] => Ok(x),
        _ => Err(Error::model(
            node.label(),
            format!("{} takes one input, found {}", node.op, inputs.len()),
        )),
    }
}

/// A per-example shape `[..]` with the batch axis `rows` in front.
pub(crate) fn batched(rows: usize, shape: &[usize]) -> Vec<usize> {
    let mut s = vec![rows];
    s.extend(shape);
    s
}
