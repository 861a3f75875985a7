//! `torch.nn.Linear`: `[B, in] → [B, out]`, `y = x Wᵀ + b`, weight `[out, in]`, bias
//! `[out]`. A curvature layer without weight sharing (`S = 1`).

use crate::curvature::layer::CurvatureLayer;
use crate::error::Result;
use crate::geometry::LinearGeometry;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::linear::{LinearBackward, linear_backward, linear_forward};
use crate::reference::ops;

/// A linear layer.
#[derive(Debug)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    bias: bool,
    output: Vec<usize>,
}

/// Builds a linear layer from `in_features`, `out_features`, `bias` (default true).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["in_features", "out_features", "bias"])?;
    let (in_features, out_features) = (a.usize("in_features")?, a.usize("out_features")?);
    let bias = a.bool_or("bias", true)?;
    if in_features == 0 || out_features == 0 {
        return Err(a.err(format!(
            "in_features and out_features must be positive, found {in_features} and \
             {out_features}"
        )));
    }
    if input.len() != 1 {
        return Err(a.err(format!(
            "a linear layer takes a 2-D input [B, in_features], but its input is {}; add a \
             flatten before it",
            batched_shape(input)
        )));
    }
    if input[0] != in_features {
        return Err(a.err(format!(
            "in_features is {in_features} but the input has {} features (input {})",
            input[0],
            batched_shape(input)
        )));
    }
    Ok(Box::new(Linear {
        in_features,
        out_features,
        bias,
        output: vec![out_features],
    }))
}

impl Linear {
    fn geometry(&self, batch: usize) -> LinearGeometry {
        LinearGeometry {
            batch,
            in_features: self.in_features,
            out_features: self.out_features,
        }
    }
}

impl Layer for Linear {
    fn op(&self) -> &'static str {
        "linear"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![ParamSpec {
            suffix: "weight",
            shape: self.weight_shape(),
        }];
        if self.bias {
            p.push(ParamSpec {
                suffix: "bias",
                shape: vec![self.out_features],
            });
        }
        p
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        let geo = self.geometry(args.batch);
        linear_forward(
            &mut pass.rec,
            &geo,
            args.inputs[0],
            &args.params[0],
            args.params.get(1),
            &y,
        )?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let x = args
            .param_grads
            .then(|| pass.repeat(args.inputs[0], args.stack))
            .transpose()?;
        let grad_in = args.input_grads[0]
            .then(|| pass.zeros(&[rows, self.in_features]))
            .transpose()?;
        let params = args
            .param_grads
            .then(|| zeros_like(pass, args.params))
            .transpose()?;
        linear_backward(
            &mut pass.rec,
            &self.geometry(rows),
            &LinearBackward {
                grad_out: args.grad_out,
                x: x.as_ref(),
                weight: Some(&args.params[0]),
                grad_in: grad_in.as_ref(),
                grad_weight: params.as_ref().map(|p| &p[0]),
                grad_bias: params.as_ref().and_then(|p| p.get(1)),
                accumulate: false,
            },
        )?;
        pass.keep(x);
        Ok(Grads {
            inputs: vec![grad_in],
            params,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        ops::linear_forward(
            args.inputs[0],
            &args.params[0],
            args.params.get(1).map(Vec::as_slice),
            args.batch,
            self.in_features,
            self.out_features,
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let rows = args.stack * args.batch;
        let (n_in, n_out) = (self.in_features, self.out_features);
        let params = args.param_grads.then(|| {
            let x = args.inputs[0].repeat(args.stack);
            let mut p = vec![ops::linear_backward_weight(
                args.grad_out,
                &x,
                rows,
                n_in,
                n_out,
            )];
            if self.bias {
                p.push(ops::linear_backward_bias(args.grad_out, rows, n_out));
            }
            p
        });
        let input = args.input_grads[0]
            .then(|| ops::linear_backward_input(args.grad_out, &args.params[0], rows, n_in, n_out));
        Grads {
            inputs: vec![input],
            params,
        }
    }

    fn curvature(&self) -> Option<&dyn CurvatureLayer> {
        Some(self)
    }
}

/// Zeroed tensors shaped like `params`.
pub(crate) fn zeros_like(pass: &Pass, params: &[GpuTensor]) -> Result<Vec<GpuTensor>> {
    params.iter().map(|p| pass.zeros(p.shape())).collect()
}

impl CurvatureLayer for Linear {
    fn out_features(&self) -> usize {
        self.out_features
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn positions(&self) -> usize {
        1
    }

    fn has_bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }

    fn expand_inputs(&self, _: &mut Pass, input: &GpuTensor, _: usize) -> Result<GpuTensor> {
        input.view(input.shape())
    }

    fn reduce_inputs(&self, _: &mut Pass, input: &GpuTensor, _: usize) -> Result<GpuTensor> {
        input.view(input.shape())
    }

    fn expand_grads(&self, _: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        grads.view(grads.shape())
    }

    fn summed_grads(&self, _: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        grads.view(grads.shape())
    }

    fn reference_expand_inputs(&self, input: &[f64], _: usize) -> Vec<f64> {
        input.to_vec()
    }

    fn reference_expand_grads(&self, grads: &[f64]) -> Vec<f64> {
        grads.to_vec()
    }
}
