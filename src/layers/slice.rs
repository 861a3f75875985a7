//! `slice`: the range `[start, end)` of one per-example dim (`x[:, start:end]` with step
//! 1; `dim` counts the batch axis, negative from the end; the batch axis itself may not
//! be sliced). `tools/export_torch.py` writes PyTorch's `x[:, i]` (`select`) as a slice
//! of length 1 followed by a `reshape` that drops the dim. Forward copies the range
//! (one slab copy, `ops::combine::narrow`); backward writes the gradient into a zeroed
//! input-shaped tensor at the same place.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::shape::example_dim;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
};
use crate::ops::combine;
use crate::reference::graph_ops;

/// A range of one per-example dim.
#[derive(Debug)]
pub struct Slice {
    input: Vec<usize>,
    output: Vec<usize>,
    /// The axis of the batched tensors (≥ 1).
    axis: usize,
    start: usize,
}

/// Builds a slice from `dim`, `start` and `end` (all required; `0 ≤ start < end ≤` the
/// dim's size).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["dim", "start", "end"])?;
    for key in ["dim", "start", "end"] {
        if a.get(key).is_none() {
            return Err(a.err(format!("missing attribute \"{key}\"")));
        }
    }
    let k = example_dim(&a, "dim", a.i64_or("dim", 0)?, input)?;
    let (start, end) = (a.i64_or("start", 0)?, a.i64_or("end", 0)?);
    let size = input[k] as i64;
    if !(0 <= start && start < end && end <= size) {
        return Err(a.err(format!(
            "start = {start}, end = {end}: expected 0 <= start < end <= {size}, the size of \
             dim {} of the input {}",
            k + 1,
            batched_shape(input)
        )));
    }
    let mut output = input.to_vec();
    output[k] = (end - start) as usize;
    Ok(Box::new(Slice {
        input: input.to_vec(),
        output,
        axis: k + 1,
        start: start as usize,
    }))
}

impl Slice {
    /// The sizes along the axis of the parts before, in and after the range.
    fn parts(&self) -> [usize; 3] {
        let (size, part) = (self.input[self.axis - 1], self.output[self.axis - 1]);
        [self.start, part, size - self.start - part]
    }
}

impl Layer for Slice {
    fn op(&self) -> &'static str {
        "slice"
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
        combine::narrow(&mut pass.rec, args.inputs[0], self.axis, self.start, &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let g = pass.zeros(&batched(args.stack * args.batch, &self.input))?;
            combine::narrow_backward(&mut pass.rec, args.grad_out, self.axis, self.start, &g)?;
            Some(g)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let shape = batched(args.batch, &self.input);
        let mut parts = graph_ops::cat_backward(args.inputs[0], &shape, self.axis, &self.parts());
        parts.swap_remove(1)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            let rows = args.stack * args.batch;
            let shapes = self.parts().map(|size| {
                let mut s = batched(rows, &self.input);
                s[self.axis] = size;
                s
            });
            let zeros: Vec<Vec<f64>> = [&shapes[0], &shapes[2]]
                .iter()
                .map(|s| vec![0.0; s.iter().product()])
                .collect();
            let parts = [
                (&zeros[0][..], &shapes[0][..]),
                (args.grad_out, &shapes[1][..]),
                (&zeros[1][..], &shapes[2][..]),
            ];
            graph_ops::cat_forward(&parts, self.axis).0
        });
        Grads::one_input(input)
    }
}
