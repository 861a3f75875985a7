//! `torch.flatten(x, start_dim, end_dim)` (dims count the batch axis, as in PyTorch;
//! `start_dim` ≥ 1): a view, row-major order unchanged.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};

/// A flatten of dims `start..=end` of the batched shape.
#[derive(Debug)]
pub struct Flatten {
    input: Vec<usize>,
    output: Vec<usize>,
}

/// Builds a flatten from `start_dim` (default 1) and `end_dim` (default −1).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["start_dim", "end_dim"])?;
    let rank = input.len() as i64 + 1;
    let dim = |key: &str, default: i64| -> Result<usize> {
        let d = a.i64_or(key, default)?;
        let d = if d < 0 { d + rank } else { d };
        if d < 1 || d >= rank {
            return Err(a.err(format!(
                "{key} = {} is out of range for an input of {rank} dimensions (the batch \
                 axis, dim 0, cannot be flattened)",
                a.i64_or(key, default)?
            )));
        }
        Ok(d as usize - 1)
    };
    let (start, end) = (dim("start_dim", 1)?, dim("end_dim", -1)?);
    if start > end {
        return Err(a.err("start_dim must not come after end_dim"));
    }
    let mut output = input[..start].to_vec();
    output.push(input[start..=end].iter().product());
    output.extend(&input[end + 1..]);
    Ok(Box::new(Flatten {
        input: input.to_vec(),
        output,
    }))
}

impl Layer for Flatten {
    fn op(&self) -> &'static str {
        "flatten"
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn is_view(&self) -> bool {
        true
    }

    fn forward(&self, _: &mut Pass, args: &ForwardArgs<GpuTensor, GpuTensor>) -> Result<GpuTensor> {
        args.inputs[0].view(&batched(args.batch, &self.output))
    }

    fn backward(
        &self,
        _: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let input = args.input_grads[0]
            .then(|| args.grad_out.view(&batched(rows, &self.input)))
            .transpose()?;
        Ok(Grads {
            inputs: vec![input],
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        args.inputs[0].to_vec()
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        Grads {
            inputs: vec![args.input_grads[0].then(|| args.grad_out.to_vec())],
            params: None,
        }
    }
}
