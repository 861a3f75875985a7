//! Elementwise activations (`shaders/activation.wgsl`): ReLU (backward reads the
//! input), sigmoid and tanh (backward reads the output). Shape-preserving.

use crate::error::Result;
use crate::gpu::{GpuTensor, Recorder};
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::activation;
use crate::reference::ops;

type GpuForward = fn(&mut Recorder, &GpuTensor, &GpuTensor) -> Result<()>;
type GpuBackward = fn(&mut Recorder, &GpuTensor, &GpuTensor, &GpuTensor) -> Result<()>;

/// One elementwise activation `y = f(x)`.
#[derive(Debug)]
pub struct Activation {
    op: &'static str,
    /// Whether the derivative is computed from the output `y` (else from `x`).
    from_output: bool,
    gpu_forward: GpuForward,
    gpu_backward: GpuBackward,
    reference_forward: fn(&[f64]) -> Vec<f64>,
    /// `(saved, grad_out) → grad_in`.
    reference_backward: fn(&[f64], &[f64]) -> Vec<f64>,
    output: Vec<usize>,
}

fn build(node: &Node, inputs: &[&[usize]], template: Activation) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["inplace"])?;
    a.bool_or("inplace", false)?;
    Ok(Box::new(Activation {
        output: input.to_vec(),
        ..template
    }))
}

/// `max(x, 0)`.
pub fn build_relu(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(
        node,
        inputs,
        Activation {
            op: "relu",
            from_output: false,
            gpu_forward: activation::relu_forward,
            gpu_backward: activation::relu_backward,
            reference_forward: ops::relu_forward,
            reference_backward: ops::relu_backward,
            output: Vec::new(),
        },
    )
}

/// `1 / (1 + e^{-x})`.
pub fn build_sigmoid(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(
        node,
        inputs,
        Activation {
            op: "sigmoid",
            from_output: true,
            gpu_forward: activation::sigmoid_forward,
            gpu_backward: activation::sigmoid_backward,
            reference_forward: ops::sigmoid_forward,
            reference_backward: ops::sigmoid_backward,
            output: Vec::new(),
        },
    )
}

/// `tanh(x)`.
pub fn build_tanh(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(
        node,
        inputs,
        Activation {
            op: "tanh",
            from_output: true,
            gpu_forward: activation::tanh_forward,
            gpu_backward: activation::tanh_backward,
            reference_forward: ops::tanh_forward,
            reference_backward: ops::tanh_backward,
            output: Vec::new(),
        },
    )
}

impl Layer for Activation {
    fn op(&self) -> &'static str {
        self.op
    }

    fn saved(&self) -> Saved {
        if self.from_output {
            Saved::OUTPUT
        } else {
            Saved::INPUTS
        }
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
        (self.gpu_forward)(&mut pass.rec, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        if !args.input_grads[0] {
            return Ok(Grads {
                inputs: vec![None],
                params: None,
            });
        }
        let saved = if self.from_output {
            args.output
        } else {
            args.inputs[0]
        };
        let saved = pass.repeat(saved, args.stack)?;
        let gx = pass.zeros(args.grad_out.shape())?;
        (self.gpu_backward)(&mut pass.rec, &saved, args.grad_out, &gx)?;
        pass.keep(saved);
        Ok(Grads {
            inputs: vec![Some(gx)],
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        (self.reference_forward)(args.inputs[0])
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let saved = if self.from_output {
            args.output
        } else {
            args.inputs[0]
        };
        let input = args.input_grads[0]
            .then(|| (self.reference_backward)(&saved.repeat(args.stack), args.grad_out));
        Grads::one_input(input)
    }
}
