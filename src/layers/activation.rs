//! Elementwise activations (`shaders/activation.wgsl`): ReLU (backward reads the
//! input), sigmoid and tanh (backward reads the output), and those with constants of
//! [`Pointwise`] (backward reads the input): `leaky_relu` (`negative_slope`, default
//! 0.01), `elu` (`alpha`, default 1), `hardtanh` (`min_val`, `max_val`, defaults −1
//! and 1; `nn.ReLU6` exports as `hardtanh` 0..6), `hardswish`, `hardsigmoid`,
//! `softplus` (`beta`, default 1, and `threshold`, default 20) and `mish`.
//! Shape-preserving.

use crate::error::{Error, Result};
use crate::gpu::{GpuTensor, Recorder};
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::activation::{self, Pointwise};
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

/// An activation with constants ([`Pointwise`]).
#[derive(Debug)]
pub struct PointwiseActivation {
    op: &'static str,
    f: Pointwise,
    output: Vec<usize>,
}

/// Builds the [`Pointwise`] activation of `node.op` from its attributes (`inplace` is
/// accepted and ignored, as for ReLU).
pub fn build_pointwise(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let (op, keys): (&'static str, &[&str]) = match node.op.as_str() {
        "leaky_relu" => ("leaky_relu", &["negative_slope"]),
        "elu" => ("elu", &["alpha"]),
        "hardtanh" => ("hardtanh", &["min_val", "max_val"]),
        "hardswish" => ("hardswish", &[]),
        "hardsigmoid" => ("hardsigmoid", &[]),
        "softplus" => ("softplus", &["beta", "threshold"]),
        "mish" => ("mish", &[]),
        other => {
            return Err(Error::model(
                node.label(),
                format!("{other} is not an activation with constants"),
            ));
        }
    };
    let allowed: Vec<&str> = keys.iter().copied().chain(["inplace"]).collect();
    let a = Attrs::new(node, &allowed)?;
    a.bool_or("inplace", false)?;
    let finite = |key: &str, default: f64| -> Result<f64> {
        let v = a.f64_or(key, default)?;
        if v.is_finite() && (v as f32).is_finite() {
            Ok(v)
        } else {
            Err(a.err(format!("\"{key}\" must be a finite f32 number, found {v}")))
        }
    };
    let f = match op {
        "leaky_relu" => Pointwise::LeakyRelu {
            negative_slope: finite("negative_slope", 0.01)?,
        },
        "elu" => Pointwise::Elu {
            alpha: finite("alpha", 1.0)?,
        },
        "hardtanh" => {
            let (min, max) = (finite("min_val", -1.0)?, finite("max_val", 1.0)?);
            if min > max {
                return Err(a.err(format!(
                    "min_val {min} must not exceed max_val {max}, as PyTorch requires"
                )));
            }
            Pointwise::Hardtanh { min, max }
        }
        "hardswish" => Pointwise::Hardswish,
        "hardsigmoid" => Pointwise::Hardsigmoid,
        "mish" => Pointwise::Mish,
        // "softplus", the only other op the first match lets through.
        _ => {
            let beta = finite("beta", 1.0)?;
            if beta == 0.0 {
                return Err(a.err("\"beta\" must not be 0"));
            }
            Pointwise::Softplus {
                beta,
                threshold: finite("threshold", 20.0)?,
            }
        }
    };
    Ok(Box::new(PointwiseActivation {
        op,
        f,
        output: input.to_vec(),
    }))
}

impl Layer for PointwiseActivation {
    fn op(&self) -> &'static str {
        self.op
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
        self.f.forward(&mut pass.rec, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        if !args.input_grads[0] {
            return Ok(Grads::one_input(None));
        }
        let x = pass.repeat(args.inputs[0], args.stack)?;
        let gx = pass.zeros(args.grad_out.shape())?;
        self.f.backward(&mut pass.rec, &x, args.grad_out, &gx)?;
        pass.keep(x);
        Ok(Grads::one_input(Some(gx)))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        ops::pointwise_forward(&self.f, args.inputs[0])
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            ops::pointwise_backward(&self.f, &args.inputs[0].repeat(args.stack), args.grad_out)
        });
        Grads::one_input(input)
    }
}
