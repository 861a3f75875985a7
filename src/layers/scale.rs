//! `mul_constant` and `div_constant`: `x * value` and `x / value` elementwise with a
//! finite constant `value` (attention's `1/√d` scaling); backward scales the gradient
//! the same way. One strided gather each way (`shaders/shape.wgsl`). `add_constant`:
//! `x + value` (a fill and an `axpy`); backward passes the gradient on (`x − c` exports
//! as `add_constant` of `−c`, `c − x` as `mul_constant` −1 then `add_constant` c).

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::reduce;
use crate::ops::shape::Gather;
use crate::reference::shape as reference;

/// Multiplication or division by a constant, or its addition.
#[derive(Debug)]
pub struct Scale {
    value: f64,
    kind: Kind,
    output: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mul,
    Div,
    Add,
}

/// Builds `mul_constant` from its `value`.
pub fn build_mul(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, Kind::Mul)
}

/// Builds `div_constant` from its `value`.
pub fn build_div(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, Kind::Div)
}

/// Builds `add_constant` from its `value`.
pub fn build_add(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, Kind::Add)
}

fn build(node: &Node, inputs: &[&[usize]], kind: Kind) -> Result<Box<dyn Layer>> {
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
    if kind == Kind::Div && value == 0.0 {
        return Err(a.err("\"value\": division by zero"));
    }
    Ok(Box::new(Scale {
        value,
        kind,
        output: input.to_vec(),
    }))
}

impl Scale {
    /// The gather of the backward pass (and of the forward one for `mul`, `div`).
    fn gather(&self, len: usize) -> Gather {
        let v = self.value as f32;
        match self.kind {
            Kind::Mul => Gather::scaled(len, v, 1.0),
            Kind::Div => Gather::scaled(len, 1.0, v),
            Kind::Add => Gather::scaled(len, 1.0, 1.0),
        }
    }
}

impl Layer for Scale {
    fn op(&self) -> &'static str {
        match self.kind {
            Kind::Mul => "mul_constant",
            Kind::Div => "div_constant",
            Kind::Add => "add_constant",
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
        let shape = batched(args.batch, &self.output);
        if self.kind != Kind::Add {
            return pass.gather(&self.gather(x.len()), x, &shape);
        }
        let y = pass.zeros(&shape)?;
        reduce::fill(&mut pass.rec, &y, self.value as f32)?;
        reduce::axpy(&mut pass.rec, 1.0, x, 1.0, &y)?;
        Ok(y)
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
        match self.kind {
            Kind::Add => args.inputs[0].iter().map(|x| x + self.value).collect(),
            kind => reference::scale(args.inputs[0], self.value, kind == Kind::Div),
        }
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| match self.kind {
            Kind::Add => args.grad_out.to_vec(),
            kind => reference::scale(args.grad_out, self.value, kind == Kind::Div),
        });
        Grads::one_input(input)
    }
}
