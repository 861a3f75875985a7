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
use crate::layers::add_parameter::{BroadcastParameter, broadcast_grad};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved};
use crate::ops::combine;
use crate::reference::shape as reference;

/// Multiplying by a broadcast parameter.
#[derive(Debug)]
pub struct MulParameter(BroadcastParameter);

/// Builds a mul_parameter from `parameter` and `shape`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    Ok(Box::new(MulParameter(BroadcastParameter::new(
        node, inputs,
    )?)))
}

impl Layer for MulParameter {
    fn op(&self) -> &'static str {
        "mul_parameter"
    }

    fn output_shape(&self) -> &[usize] {
        &self.0.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        self.0.specs()
    }

    fn param_key(&self, _module: &str, _suffix: &str) -> String {
        self.0.parameter.clone()
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let p = self.0.expanded(pass, &args.params[0], args.batch)?;
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
            let p = self.0.expanded(pass, &args.params[0], rows)?;
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
            let grad = broadcast_grad(pass, &gx, rows, &self.0.output, &self.0.shape)?;
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
        reference::mul_parameter_forward(
            args.inputs[0],
            &self.0.output,
            &args.params[0],
            &self.0.shape,
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            reference::mul_parameter_forward(
                args.grad_out,
                &self.0.output,
                &args.params[0],
                &self.0.shape,
            )
        });
        let params = args.param_grads.then(|| {
            let x = args.inputs[0].repeat(args.stack);
            let gx: Vec<f64> = args.grad_out.iter().zip(&x).map(|(g, x)| g * x).collect();
            vec![reference::add_parameter_grad(
                &gx,
                &self.0.output,
                &self.0.shape,
            )]
        });
        Grads {
            inputs: vec![input],
            params,
        }
    }
}
