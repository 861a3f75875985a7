//! `torch.cat(inputs, dim)`: concatenation along one axis (`dim` counts the batch axis,
//! as in PyTorch, so channels are `dim = 1`; negative counts from the end; the batch
//! axis itself cannot be concatenated). Backward splits the gradient.

use crate::error::{Error, Result};
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape};
use crate::ops::combine;
use crate::reference::graph_ops;

/// A concatenation of any number of values.
#[derive(Debug)]
pub struct Cat {
    /// Per-example input shapes.
    inputs: Vec<Vec<usize>>,
    output: Vec<usize>,
    /// The axis of the batched tensors (≥ 1).
    axis: usize,
}

/// Builds a cat from `dim` (required) and one or more inputs equal in every other
/// dimension.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let a = Attrs::new(node, &["dim"])?;
    let Some(first) = inputs.first() else {
        return Err(Error::model(node.label(), "cat takes at least one input"));
    };
    if !node.attrs.contains_key("dim") {
        return Err(a.err("missing attribute \"dim\""));
    }
    let rank = first.len() as i64 + 1;
    let dim = a.i64_or("dim", 0)?;
    let axis = if dim < 0 { dim + rank } else { dim };
    if axis < 1 || axis >= rank {
        return Err(a.err(format!(
            "dim = {dim} is out of range for inputs of {rank} dimensions (the batch axis, \
             dim 0, cannot be concatenated)"
        )));
    }
    let axis = axis as usize;
    let k = axis - 1;
    let mut output = first.to_vec();
    output[k] = 0;
    for input in inputs {
        let fits = input.len() == first.len()
            && input[..k] == first[..k]
            && input[k + 1..] == first[k + 1..];
        if !fits {
            let shapes: Vec<String> = inputs.iter().map(|s| batched_shape(s)).collect();
            return Err(a.err(format!(
                "inputs {} must agree on every dimension but dim {dim}",
                shapes.join(", ")
            )));
        }
        output[k] += input[k];
    }
    Ok(Box::new(Cat {
        inputs: inputs.iter().map(|s| s.to_vec()).collect(),
        output,
        axis,
    }))
}

impl Layer for Cat {
    fn op(&self) -> &'static str {
        "cat"
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        combine::cat_forward(&mut pass.rec, args.inputs, self.axis, &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        // Every part is split out (one copy each), the unneeded ones dropped after.
        let parts: Vec<GpuTensor> = self
            .inputs
            .iter()
            .map(|s| pass.zeros(&batched(rows, s)))
            .collect::<Result<_>>()?;
        let refs: Vec<&GpuTensor> = parts.iter().collect();
        combine::cat_backward(&mut pass.rec, args.grad_out, self.axis, &refs)?;
        Ok(Grads {
            inputs: parts
                .into_iter()
                .zip(args.input_grads)
                .map(|(p, &needed)| needed.then_some(p))
                .collect(),
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let shapes: Vec<Vec<usize>> = self.inputs.iter().map(|s| batched(args.batch, s)).collect();
        let parts: Vec<(&[f64], &[usize])> = args
            .inputs
            .iter()
            .zip(&shapes)
            .map(|(x, s)| (&x[..], &s[..]))
            .collect();
        graph_ops::cat_forward(&parts, self.axis).0
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let sizes: Vec<usize> = self.inputs.iter().map(|s| s[self.axis - 1]).collect();
        let shape = batched(args.stack * args.batch, &self.output);
        let parts = graph_ops::cat_backward(args.grad_out, &shape, self.axis, &sizes);
        Grads {
            inputs: parts
                .into_iter()
                .zip(args.input_grads)
                .map(|(p, &needed)| needed.then_some(p))
                .collect(),
            params: None,
        }
    }
}
