//! `mul_constant` and `div_constant`: `x * value` and `x / value` elementwise with a
//! finite constant `value` (attention's `1/√d` scaling); backward scales the gradient
//! the same way. One strided gather each way (`shaders/shape.wgsl`).

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::shape::Gather;
use crate::reference::shape as reference;

/// Multiplication or division by a constant.
#[derive(Debug)]
pub struct Scale {
    value: f64,
    divide: bool,
    output: Vec<usize>,
}

/// Builds `mul_constant` from its `value`.
pub fn build_mul(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, false)
}

/// Builds `div_constant` from its `value`.
pub fn build_div(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, true)
}

fn build(node: &Node, inputs: &[&[usize]], divide: bool) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["value"])?;
    let value = match node.attrs.get("value") {
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && (*x as f32).is_finite())
            .ok_or_else(|| {
                a.err(format!(
                    "\"value\": expected a finite number (within f32), found {}",
                    brief(v)
                ))
            })?,
        None => return Err(a.err("missing attribute \"value\"")),
    };
    if divide && value == 0.0 {
        return Err(a.err("\"value\": division by zero"));
    }
    Ok(Box::new(Scale {
        value,
        divide,
        output: input.to_vec(),
    }))
}

impl Scale {
    fn gather(&self, len: usize) -> Gather {
        let v = self.value as f32;
        if self.divide {
            Gather::scaled(len, 1.0, v)
        } else {
            Gather::scaled(len, v, 1.0)
        }
    }
}

impl Layer for Scale {
    fn op(&self) -> &'static str {
        if self.divide {
            "div_constant"
        } else {
            "mul_constant"
        }
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
        let x = args.inputs[0];
        pass.gather(&self.gather(x.len()), x, &batched(args.batch, &self.output))
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let g = args.grad_out;
            Some(pass.gather(&self.gather(g.len()), g, g.shape())?)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::scale(args.inputs[0], self.value, self.divide)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input =
            args.input_grads[0].then(|| reference::scale(args.grad_out, self.value, self.divide));
        Grads::one_input(input)
    }
}
