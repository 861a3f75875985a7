//! `torch.softmax` over the last dimension (attribute `dim`: -1, or the last dim's
//! index counting the batch axis): numerically stable (the row maximum subtracted), so
//! large logits and `-inf` entries (masked positions) are exact; backward
//! `y ⊙ (g − Σ g y)` reads the saved output.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
};
use crate::ops::softmax;
use crate::reference::attention;

/// A softmax over the last dimension.
#[derive(Debug)]
pub struct Softmax {
    shape: Vec<usize>,
}

/// Builds a softmax from `dim` (required; the last dim).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["dim"])?;
    let ndim = input.len() as i64 + 1;
    let dim = a.i64_or("dim", i64::MIN)?;
    if dim == i64::MIN {
        return Err(a.err("missing attribute \"dim\""));
    }
    if input.is_empty() || (dim != -1 && dim != ndim - 1) {
        return Err(a.err(format!(
            "\"dim\": softmax is implemented over the last dim only (-1 or {}) of input {}, \
             found {dim}",
            ndim - 1,
            batched_shape(input)
        )));
    }
    if input.contains(&0) {
        return Err(a.err(format!(
            "softmax over an empty input {}",
            batched_shape(input)
        )));
    }
    Ok(Box::new(Softmax {
        shape: input.to_vec(),
    }))
}

impl Softmax {
    fn row(&self) -> usize {
        *self.shape.last().expect("softmax input has a last dim")
    }
}

impl Layer for Softmax {
    fn op(&self) -> &'static str {
        "softmax"
    }

    fn saved(&self) -> Saved {
        Saved::OUTPUT
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
        softmax::softmax_forward(&mut pass.rec, args.inputs[0], &y, self.row(), None)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            softmax::softmax_backward(&mut pass.rec, args.output, args.grad_out, &gx, self.row())?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        attention::softmax_forward(args.inputs[0], self.row(), None)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0]
            .then(|| attention::softmax_backward(args.output, args.grad_out, self.row()));
        Grads::one_input(input)
    }
}
