//! `torch.nn.GELU(approximate)`: `x·Φ(x)` (`"none"`, `Φ` the standard normal CDF) or
//! its tanh form (`"tanh"`), elementwise and shape-preserving; backward reads the
//! forward input.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::gelu::{self, Gelu as Form};
use crate::reference::graph_ops;

/// A GELU activation.
#[derive(Debug)]
pub struct Gelu {
    form: Form,
    output: Vec<usize>,
}

/// Builds a gelu layer from `approximate` (`"none"`, the default, or `"tanh"`).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["approximate"])?;
    let form = match node.attrs.get("approximate") {
        None => Form::Erf,
        Some(v) if v == "none" => Form::Erf,
        Some(v) if v == "tanh" => Form::Tanh,
        Some(v) => {
            return Err(a.err(format!(
                "\"approximate\": expected \"none\" or \"tanh\", found {}",
                brief(v)
            )));
        }
    };
    Ok(Box::new(Gelu {
        form,
        output: input.to_vec(),
    }))
}

impl Layer for Gelu {
    fn op(&self) -> &'static str {
        "gelu"
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
        gelu::gelu_forward(&mut pass.rec, self.form, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            gelu::gelu_backward(&mut pass.rec, self.form, args.inputs[0], args.grad_out, &gx)?;
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
        graph_ops::gelu_forward(args.inputs[0], self.form == Form::Tanh)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            graph_ops::gelu_backward(args.inputs[0], args.grad_out, self.form == Form::Tanh)
        });
        Grads {
            inputs: vec![input],
            params: None,
        }
    }
}
