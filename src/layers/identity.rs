//! `identity`: the value unchanged (what eval-mode `Dropout`, `nn.Identity` and an empty
//! `nn.Sequential` compute). A view on the GPU, forward and backward.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};

/// The identity on one value.
#[derive(Debug)]
pub struct Identity {
    shape: Vec<usize>,
}

/// Builds an identity of one input (no attributes).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    Attrs::new(node, &[])?;
    Ok(Box::new(Identity {
        shape: input.to_vec(),
    }))
}

impl Layer for Identity {
    fn op(&self) -> &'static str {
        "identity"
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    fn is_view(&self) -> bool {
        true
    }

    fn forward(&self, _: &mut Pass, args: &ForwardArgs<GpuTensor, GpuTensor>) -> Result<GpuTensor> {
        args.inputs[0].view(&batched(args.batch, &self.shape))
    }

    fn backward(
        &self,
        _: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = args.input_grads[0]
            .then(|| args.grad_out.view(args.grad_out.shape()))
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
