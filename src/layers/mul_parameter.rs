//! `x * p` for a learned tensor `p` (ConvNeXt's and CaiT's layer scale `γ`): `p`'s
//! PyTorch `shape` broadcasts numpy-style against `[B, *in]` (without varying over the
//! batch) and the result has the input's shape; the weights file holds `p` under its
//! full `state_dict` name (attribute `parameter`). Not a curvature parameter. Forward:
//! `p` gathered with stride 0 along its broadcast dims, times `x`; backward multiplies
//! the gradient by the same and, when asked, sums `g ⊙ x` over the broadcast dims for
//! `p`.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::add_parameter::{
    broadcast_grad, check_broadcast, param_strides, parameter_attrs,
};
use crate::layers::attrs::Attrs;
use crate::layers::shape::check_rank;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, one_input,
};
use crate::ops::combine;
use crate::ops::shape::Gather;
use crate::reference::shape as reference;

/// Multiplying by a broadcast parameter.
#[derive(Debug)]
pub struct MulParameter {
    /// The full `state_dict` name.
    parameter: String,
    /// Its PyTorch shape.
    shape: Vec<usize>,
    output: Vec<usize>,
}

/// Builds a mul_parameter from `parameter` and `shape`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["parameter", "shape"])?;
    let (parameter, shape) = parameter_attrs(node, &a)?;
    check_rank(&a, input)?;
    check_broadcast(&a, &shape, input, "the input")?;
    Ok(Box::new(MulParameter {
        parameter,
        shape,
        output: input.to_vec(),
    }))
}

impl MulParameter {
    /// `p` broadcast to `[rows, *output]`.
    fn expanded(&self, pass: &mut Pass, p: &GpuTensor, rows: usize) -> Result<GpuTensor> {
        let dims = batched(rows, &self.output);
        let g = Gather::strided(dims.clone(), param_strides(&self.output, &self.shape));
        pass.gather(&g, p, &dims)
    }
}

impl Layer for MulParameter {
    fn op(&self) -> &'static str {
        "mul_parameter"
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            suffix: "parameter",
            shape: self.shape.clone(),
        }]
    }

    fn param_key(&self, _module: &str, _suffix: &str) -> String {
        self.parameter.clone()
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let p = self.expanded(pass, &args.params[0], args.batch)?;
        let y = pass.zeros(p.shape())?;
        combine::multiply(&mut pass.rec, args.inputs[0], &p, &y)?;
        pass.keep(p);
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let input = if args.input_grads[0] {
            let p = self.expanded(pass, &args.params[0], rows)?;
            let gx = pass.zeros(p.shape())?;
            combine::multiply(&mut pass.rec, args.grad_out, &p, &gx)?;
            pass.keep(p);
            Some(gx)
        } else {
            None
        };
        let params = if args.param_grads {
            let x = pass.repeat(args.inputs[0], args.stack)?;
            let gx = pass.zeros(x.shape())?;
            combine::multiply(&mut pass.rec, args.grad_out, &x, &gx)?;
            let grad = broadcast_grad(pass, &gx, rows, &self.output, &self.shape)?;
            pass.keep((x, gx));
            Some(vec![grad])
        } else {
            None
        };
        Ok(Grads {
            inputs: vec![input],
            params,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::mul_parameter_forward(args.inputs[0], &self.output, &args.params[0], &self.shape)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            reference::mul_parameter_forward(
                args.grad_out,
                &self.output,
                &args.params[0],
                &self.shape,
            )
        });
        let params = args.param_grads.then(|| {
            let x = args.inputs[0].repeat(args.stack);
            let gx: Vec<f64> = args.grad_out.iter().zip(&x).map(|(g, x)| g * x).collect();
            vec![reference::add_parameter_grad(
                &gx,
                &self.output,
                &self.shape,
            )]
        });
        Grads {
            inputs: vec![input],
            params,
        }
    }
}
