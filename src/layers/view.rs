//! A layer whose output is its one input seen with another per-example shape, the
//! row-major order unchanged: `flatten`, `reshape` and `identity` are built as one.
//! A view on the GPU, forward and backward; backward reads no forward value.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched};

/// `[B, *input] → [B, *output]` with the same elements in the same order.
#[derive(Debug)]
pub struct View {
    op: &'static str,
    input: Vec<usize>,
    output: Vec<usize>,
}

impl View {
    /// A view for op `op` from per-example shape `input` to `output` (equal element
    /// counts; the builders check them).
    pub fn boxed(op: &'static str, input: &[usize], output: Vec<usize>) -> Box<dyn Layer> {
        debug_assert_eq!(
            input.iter().product::<usize>(),
            output.iter().product::<usize>()
        );
        Box::new(View {
            op,
            input: input.to_vec(),
            output,
        })
    }
}

impl Layer for View {
    fn op(&self) -> &'static str {
        self.op
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
        Ok(Grads::one_input(input))
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
