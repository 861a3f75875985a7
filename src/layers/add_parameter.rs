//! `x + p` for a learned tensor `p` (a positional embedding): `p`'s PyTorch `shape`
//! broadcasts numpy-style against `[B, *in]` and the result has the input's shape.
//! The weights file holds `p` under its full `state_dict` name (attribute
//! `parameter`, e.g. `"pos_embedding"` or `"blocks.0.pos"`). Not a curvature
//! parameter. Forward: `p` gathered with stride 0 along its broadcast dims, plus `x`;
//! backward passes the gradient through and, when asked, sums it over the broadcast
//! dims for `p`.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::shape::{check_rank, int_list};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::reduce::{Sum, axpy, sum_rows};
use crate::ops::shape::{Gather, strides};
use crate::reference::shape as reference;

/// The weights-file suffix the layer's one tensor goes by internally (its key is the
/// full `parameter` name, [`Layer::param_key`]).
const SUFFIX: &str = "parameter";

/// A learned tensor broadcast against a layer's one input, as `add_parameter` and
/// [`crate::layers::mul_parameter`] take it.
#[derive(Debug)]
pub(crate) struct BroadcastParameter {
    /// The full `state_dict` name.
    pub parameter: String,
    /// Its PyTorch shape.
    pub shape: Vec<usize>,
    /// The input's (and output's) per-example shape.
    pub output: Vec<usize>,
}

impl BroadcastParameter {
    /// From the node's one input and its `parameter` and `shape` attributes.
    pub(crate) fn new(node: &Node, inputs: &[&[usize]]) -> Result<Self> {
        let input = one_input(node, inputs)?;
        let a = Attrs::new(node, &["parameter", "shape"])?;
        let (parameter, shape) = parameter_attrs(node, &a)?;
        check_rank(&a, input)?;
        check_broadcast(&a, &shape, input, "the input")?;
        Ok(Self {
            parameter,
            shape,
            output: input.to_vec(),
        })
    }

    /// The layer's one tensor (its key is the full name, [`Layer::param_key`]).
    pub(crate) fn specs(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            suffix: SUFFIX,
            shape: self.shape.clone(),
        }]
    }

    /// `p` broadcast to `[rows, *output]` (a gather with stride 0 along its broadcast
    /// dims).
    pub(crate) fn expanded(
        &self,
        pass: &mut Pass,
        p: &GpuTensor,
        rows: usize,
    ) -> Result<GpuTensor> {
        let dims = batched(rows, &self.output);
        let g = Gather::strided(dims.clone(), param_strides(&self.output, &self.shape));
        pass.gather(&g, p, &dims)
    }
}

/// Adding a broadcast parameter.
#[derive(Debug)]
pub struct AddParameter(BroadcastParameter);

/// Builds an add_parameter from `parameter` and `shape`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    Ok(Box::new(AddParameter(BroadcastParameter::new(
        node, inputs,
    )?)))
}

/// Checks that a parameter of PyTorch shape `shape` broadcasts against `[B, *input]`
/// without varying over the batch; the error names the node and calls the value `what`.
pub(crate) fn check_broadcast(
    a: &Attrs,
    shape: &[usize],
    input: &[usize],
    what: &str,
) -> Result<()> {
    let batched_in = batched(1, input);
    let fits = shape.len() <= batched_in.len()
        && shape
            .iter()
            .rev()
            .zip(batched_in.iter().rev())
            .enumerate()
            .all(|(k, (&p, &x))| p == 1 || (p == x && k < input.len()));
    if shape.is_empty() || !fits {
        return Err(a.err(format!(
            "a parameter of shape {shape:?} does not broadcast against {what} {} (each of \
             its dims, aligned from the right, must be 1 or the value's, and not vary over \
             the batch)",
            batched_shape(input)
        )));
    }
    Ok(())
}

/// The `parameter` (a non-empty state_dict name) and `shape` (positive sizes)
/// attributes.
pub(crate) fn parameter_attrs(node: &Node, a: &Attrs) -> Result<(String, Vec<usize>)> {
    let parameter = match node.attrs.get("parameter") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(a.err("\"parameter\": expected the parameter's state_dict name")),
    };
    let shape = int_list(node, a, "shape")?
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| a.err("\"shape\": expected positive sizes"))?;
    Ok((parameter, shape))
}

/// Per dim of `[rows, *output]`, the stride in a parameter of PyTorch shape `shape`
/// broadcast against it (0 where it is broadcast).
pub(crate) fn param_strides(output: &[usize], shape: &[usize]) -> Vec<usize> {
    let rank = output.len() + 1;
    let offset = rank - shape.len();
    let s = strides(shape);
    (0..rank)
        .map(|k| {
            if k < offset || shape[k - offset] == 1 {
                0
            } else {
                s[k - offset]
            }
        })
        .collect()
}

/// The gradient of a parameter of PyTorch shape `shape` broadcast to `[rows, *output]`:
/// `grads` (of that shape) summed over the broadcast dims (a new tensor of `shape`).
pub(crate) fn broadcast_grad(
    pass: &mut Pass,
    grads: &GpuTensor,
    rows: usize,
    output: &[usize],
    shape: &[usize],
) -> Result<GpuTensor> {
    // Broadcast dims first, p's own dims last (in order): [R, len(p)].
    let kept = param_strides(output, shape);
    let rank = kept.len();
    let perm: Vec<usize> = (0..rank)
        .filter(|&k| kept[k] == 0)
        .chain((0..rank).filter(|&k| kept[k] != 0))
        .collect();
    let len: usize = shape.iter().product();
    let moved = if perm.iter().enumerate().all(|(i, &k)| i == k) {
        grads.view(&[grads.len()])?
    } else {
        let g = Gather::permute(&batched(rows, output), &perm);
        pass.gather(&g, grads, &[grads.len()])?
    };
    let grad = pass.zeros(shape)?;
    sum_rows(
        pass.ctx(),
        &mut pass.rec,
        &moved,
        &grad,
        &Sum::new(grads.len() / len, len),
    )?;
    pass.keep(moved);
    Ok(grad)
}

impl Layer for AddParameter {
    fn op(&self) -> &'static str {
        "add_parameter"
    }

    fn output_shape(&self) -> &[usize] {
        &self.0.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        self.0.specs()
    }

    fn param_key(&self, _module: &str, _suffix: &str) -> String {
        self.0.parameter.clone()
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = self.0.expanded(pass, &args.params[0], args.batch)?;
        axpy(&mut pass.rec, 1.0, args.inputs[0], 1.0, &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let input = args.input_grads[0]
            .then(|| args.grad_out.view(&batched(rows, &self.0.output)))
            .transpose()?;
        let params = args
            .param_grads
            .then(|| broadcast_grad(pass, args.grad_out, rows, &self.0.output, &self.0.shape))
            .transpose()?
            .map(|grad| vec![grad]);
        Ok(Grads {
            inputs: vec![input],
            params,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::add_parameter_forward(
            args.inputs[0],
            &self.0.output,
            &args.params[0],
            &self.0.shape,
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let params = args.param_grads.then(|| {
            vec![reference::add_parameter_grad(
                args.grad_out,
                &self.0.output,
                &self.0.shape,
            )]
        });
        Grads {
            inputs: vec![args.input_grads[0].then(|| args.grad_out.to_vec())],
            params,
        }
    }
}
