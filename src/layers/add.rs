//! `x + y` of two activations of the same shape (a residual connection). Backward
//! passes the gradient to both inputs unchanged; the executor sums gradients where a
//! value fans out.

use crate::error::{Error, Result};
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape};
use crate::ops::{combine, reduce};
use crate::reference::graph_ops;

/// An elementwise sum of two values.
#[derive(Debug)]
pub struct Add {
    shape: Vec<usize>,
}

/// Builds an add from two inputs of the same per-example shape (no broadcasting).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    Attrs::new(node, &[])?;
    match inputs {
        [a, b] if a == b => Ok(Box::new(Add { shape: a.to_vec() })),
        [a, b] => Err(Error::model(
            node.label(),
            format!(
                "add needs two inputs of the same shape, found {} and {}",
                batched_shape(a),
                batched_shape(b)
            ),
        )),
        _ => Err(Error::model(
            node.label(),
            format!("add takes two inputs, found {}", inputs.len()),
        )),
    }
}

impl Layer for Add {
    fn op(&self) -> &'static str {
        "add"
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.shape))?;
        combine::add(&mut pass.rec, args.inputs[0], args.inputs[1], &y)?;
        Ok(y)
    }

    /// The first input that needs a gradient gets a view of `grad_out`, a second one a
    /// copy: the executor adds into gradients in place where values fan out, so no two
    /// gradients may share a buffer.
    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let g = args.grad_out;
        let mut shared = false;
        let mut inputs = Vec::with_capacity(2);
        for &needed in args.input_grads {
            inputs.push(match (needed, shared) {
                (false, _) => None,
                (true, false) => {
                    shared = true;
                    Some(g.view(g.shape())?)
                }
                (true, true) => {
                    let copy = pass.zeros(g.shape())?;
                    reduce::copy(&mut pass.rec, g, 0, &copy, 0, g.len())?;
                    Some(copy)
                }
            });
        }
        Ok(Grads {
            inputs,
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        graph_ops::add_forward(args.inputs[0], args.inputs[1])
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        Grads {
            inputs: args
                .input_grads
                .iter()
                .map(|&needed| needed.then(|| args.grad_out.to_vec()))
                .collect(),
            params: None,
        }
    }
}
