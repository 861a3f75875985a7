//! `torch.cat` of an activation and a learned tensor broadcast over the batch (a ViT's
//! cls token: `torch.cat([cls.expand(B, -1, -1), x], dim=1)`). Attributes: `parameter`
//! (its full `state_dict` name, the key in the weights file), `shape` (its PyTorch
//! shape, e.g. `[1, 1, D]`), `dim` (counting the batch axis, negative from the end; not
//! the batch axis) and `index` (the parameter's place in the concatenation: 0 before the
//! input, 1 after it). The parameter broadcasts numpy-style against its part
//! `[B, *part]`, which is the input's shape except along `dim`, where it is the
//! parameter's size. Not a curvature parameter. Forward: the parameter gathered with
//! stride 0 along its broadcast dims, concatenated with the input; backward splits the
//! gradient and, when asked, sums the parameter's part over its broadcast dims.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::add_parameter::{
    broadcast_grad, check_broadcast, param_strides, parameter_attrs,
};
use crate::layers::attrs::Attrs;
use crate::layers::shape::{check_rank, example_dim};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::combine;
use crate::ops::shape::Gather;
use crate::reference::{graph_ops, shape as reference};

/// The weights-file suffix the layer's one tensor goes by internally (its key is the
/// full `parameter` name, [`Layer::param_key`]).
const SUFFIX: &str = "parameter";

/// A concatenation of an input and a broadcast parameter.
#[derive(Debug)]
pub struct CatParameter {
    /// The full `state_dict` name.
    parameter: String,
    /// Its PyTorch shape.
    shape: Vec<usize>,
    input: Vec<usize>,
    /// The parameter's per-example part: the input's shape but along the axis.
    part: Vec<usize>,
    output: Vec<usize>,
    /// The axis of the batched tensors (≥ 1).
    axis: usize,
    /// Whether the parameter comes first.
    first: bool,
}

/// Builds a cat_parameter from `parameter`, `shape`, `dim` and `index` (all required).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["parameter", "shape", "dim", "index"])?;
    let (parameter, shape) = parameter_attrs(node, &a)?;
    check_rank(&a, input)?;
    for key in ["dim", "index"] {
        if a.get(key).is_none() {
            return Err(a.err(format!("missing attribute \"{key}\"")));
        }
    }
    let k = example_dim(&a, "dim", a.i64_or("dim", 0)?, input)?;
    let first = match a.i64_or("index", 0)? {
        0 => true,
        1 => false,
        i => {
            return Err(a.err(format!(
                "\"index\" = {i}: expected 0 (the parameter first) or 1 (after the input)"
            )));
        }
    };
    // The parameter's size along the axis (aligned from the right; 1 where it has no
    // such dim).
    let from_end = input.len() - k;
    let size = if from_end <= shape.len() {
        shape[shape.len() - from_end]
    } else {
        1
    };
    let mut part = input.to_vec();
    part[k] = size;
    check_broadcast(&a, &shape, &part, "its part")?;
    let mut output = input.to_vec();
    output[k] += size;
    if output.iter().product::<usize>() == 0 {
        return Err(a.err(format!("empty input {}", batched_shape(input))));
    }
    Ok(Box::new(CatParameter {
        parameter,
        shape,
        input: input.to_vec(),
        part,
        output,
        axis: k + 1,
        first,
    }))
}

impl CatParameter {
    /// `param` and `input` (whatever describes each part) in concatenation order.
    fn order<T>(&self, param: T, input: T) -> [T; 2] {
        if self.first {
            [param, input]
        } else {
            [input, param]
        }
    }
}

impl Layer for CatParameter {
    fn op(&self) -> &'static str {
        "cat_parameter"
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            suffix: SUFFIX,
            shape: self.shape.clone(),
        }]
    }

    fn param_key(&self, _module: &str, _suffix: &str) -> String {
        self.parameter.clone()
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let dims = batched(args.batch, &self.part);
        let g = Gather::strided(dims.clone(), param_strides(&self.part, &self.shape));
        let p = pass.gather(&g, &args.params[0], &dims)?;
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        combine::cat_forward(
            &mut pass.rec,
            &self.order(&p, args.inputs[0]),
            self.axis,
            &y,
        )?;
        pass.keep(p);
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let p = pass.zeros(&batched(rows, &self.part))?;
        let x = pass.zeros(&batched(rows, &self.input))?;
        combine::cat_backward(&mut pass.rec, args.grad_out, self.axis, &self.order(&p, &x))?;
        let params = args
            .param_grads
            .then(|| broadcast_grad(pass, &p, rows, &self.part, &self.shape))
            .transpose()?
            .map(|grad| vec![grad]);
        pass.keep(p);
        Ok(Grads {
            inputs: vec![args.input_grads[0].then_some(x)],
            params,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let zeros = vec![0.0; args.batch * self.part.iter().product::<usize>()];
        let p = reference::add_parameter_forward(&zeros, &self.part, &args.params[0], &self.shape);
        let (p_shape, x_shape) = (
            batched(args.batch, &self.part),
            batched(args.batch, &self.input),
        );
        let parts = self.order((&p[..], &p_shape[..]), (args.inputs[0], &x_shape[..]));
        graph_ops::cat_forward(&parts, self.axis).0
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let rows = args.stack * args.batch;
        let k = self.axis - 1;
        let sizes = self.order(self.part[k], self.input[k]);
        let mut parts = graph_ops::cat_backward(
            args.grad_out,
            &batched(rows, &self.output),
            self.axis,
            &sizes,
        );
        let (p, x) = if self.first {
            let x = parts.pop().expect("two parts");
            (parts.pop().expect("two parts"), x)
        } else {
            let p = parts.pop().expect("two parts");
            (p, parts.pop().expect("two parts"))
        };
        let params = args
            .param_grads
            .then(|| vec![reference::add_parameter_grad(&p, &self.part, &self.shape)]);
        Grads {
            inputs: vec![args.input_grads[0].then_some(x)],
            params,
        }
    }
}
