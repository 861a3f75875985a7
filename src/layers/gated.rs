//! Gated activations `x·c(x)`, elementwise and shape-preserving, backward reading the
//! forward input: `torch.nn.SiLU` (`x·σ(x)`) and `torch.nn.GELU(approximate)` (`x·Φ(x)`
//! for `"none"`, `Φ` the standard normal CDF, or its tanh form for `"tanh"`).

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::gated::{Gate, gated_backward, gated_forward};
use crate::reference::graph_ops;

/// A SiLU or GELU activation.
#[derive(Debug)]
pub struct Gated {
    gate: Gate,
    output: Vec<usize>,
}

/// Builds a gelu layer from `approximate` (`"none"`, the default, or `"tanh"`).
pub fn build_gelu(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["approximate"])?;
    let gate = match node.attrs.get("approximate") {
        None => Gate::GeluErf,
        Some(v) if v == "none" => Gate::GeluErf,
        Some(v) if v == "tanh" => Gate::GeluTanh,
        Some(v) => {
            return Err(a.err(format!(
                "\"approximate\": expected \"none\" or \"tanh\", found {}",
                brief(v)
            )));
        }
    };
    Ok(Box::new(Gated {
        gate,
        output: input.to_vec(),
    }))
}

/// Builds a silu layer (`inplace` accepted and irrelevant).
pub fn build_silu(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    Attrs::new(node, &["inplace"])?.bool_or("inplace", false)?;
    Ok(Box::new(Gated {
        gate: Gate::Silu,
        output: input.to_vec(),
    }))
}

impl Layer for Gated {
    fn op(&self) -> &'static str {
        self.gate.op()
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
        gated_forward(&mut pass.rec, self.gate, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            gated_backward(&mut pass.rec, self.gate, args.inputs[0], args.grad_out, &gx)?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let x = args.inputs[0];
        match self.gate {
            Gate::Silu => graph_ops::silu_forward(x),
            Gate::GeluErf | Gate::GeluTanh => {
                graph_ops::gelu_forward(x, self.gate == Gate::GeluTanh)
            }
        }
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let (x, g) = (args.inputs[0], args.grad_out);
        let input = args.input_grads[0].then(|| match self.gate {
            Gate::Silu => graph_ops::silu_backward(x, g),
            Gate::GeluErf | Gate::GeluTanh => {
                graph_ops::gelu_backward(x, g, self.gate == Gate::GeluTanh)
            }
        });
        Grads::one_input(input)
    }
}
