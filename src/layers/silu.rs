//! `torch.nn.SiLU`: `x·σ(x)` elementwise, shape-preserving; backward reads the forward
//! input.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::silu;
use crate::reference::graph_ops;

/// A SiLU activation.
#[derive(Debug)]
pub struct Silu {
    output: Vec<usize>,
}

/// Builds a silu layer (`inplace` accepted and irrelevant).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    Attrs::new(node, &["inplace"])?.bool_or("inplace", false)?;
    Ok(Box::new(Silu {
        output: input.to_vec(),
    }))
}

impl Layer for Silu {
    fn op(&self) -> &'static str {
        "silu"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
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
        silu::silu_forward(&mut pass.rec, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            silu::silu_backward(&mut pass.rec, args.inputs[0], args.grad_out, &gx)?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads {
            inputs: vec![input],
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        graph_ops::silu_forward(args.inputs[0])
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input =
            args.input_grads[0].then(|| graph_ops::silu_backward(args.inputs[0], args.grad_out));
        Grads {
            inputs: vec![input],
            params: None,
        }
    }
}
