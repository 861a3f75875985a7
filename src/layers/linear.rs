//! `torch.nn.Linear`: `[B, *shared, in] → [B, *shared, out]`, `y = x Wᵀ + b`, weight
//! `[out, in]`, bias `[out]`. A curvature layer sharing its weight over the
//! `S = Π shared` positions (SPEC §2.1; `S = 1` for a 2-D input): its expand-format
//! inputs are the input rows `[B·S, in]` as they lie in memory, and its output
//! gradients `[V·B, *shared, out]` are already the rows `[V·B·S, out]`.

use crate::curvature::layer::CurvatureLayer;
use crate::error::Result;
use crate::geometry::LinearGeometry;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::mean::sum_middle;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::conv::WeightedBackward;
use crate::ops::linear::{linear_backward, linear_forward};
use crate::reference::ops;

/// A linear layer.
#[derive(Debug)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    bias: bool,
    /// `S`, the product of the input's leading per-example dims.
    positions: usize,
    output: Vec<usize>,
}

/// Builds a linear layer from `in_features`, `out_features`, `bias` (default true); the
/// input is `[B, *shared, in_features]` with any number of shared dims.
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
    let Some((&features, shared)) = input.split_last() else {
        return Err(a.err("a linear layer needs an input [B, *, in_features]"));
    };
    if features != in_features {
        let hint = if shared.is_empty() {
            ""
        } else {
            "; a linear layer acts on the last dimension (add a flatten before it to \
             take several)"
        };
        return Err(a.err(format!(
            "in_features is {in_features} but the input's last dimension is {features} \
             (input {}){hint}",
            batched_shape(input)
        )));
    }
    let positions = shared.iter().product();
    let mut output = shared.to_vec();
    output.push(out_features);
    if output
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none()
    {
        return Err(a.err("the output has more elements than fit in memory"));
    }
    Ok(Box::new(Linear {
        in_features,
        out_features,
        bias,
        positions,
        output,
    }))
}

impl Linear {
    /// The GEMM geometry of `examples` examples: `examples·S` rows.
    fn geometry(&self, examples: usize) -> LinearGeometry {
        LinearGeometry {
            batch: examples * self.positions,
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
        ParamSpec::weight_and_bias(self.weight_shape(), self.bias.then_some(self.out_features))
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
        let in_shape = args.inputs[0].shape().get(1..).unwrap_or(&[]);
        let grads = WeightedGrads::new(pass, args, in_shape)?;
        linear_backward(&mut pass.rec, &self.geometry(rows), &grads.op_args(args))?;
        Ok(grads.finish(pass))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        ops::linear_forward(
            args.inputs[0],
            &args.params[0],
            args.params.get(1).map(Vec::as_slice),
            args.batch * self.positions,
            self.in_features,
            self.out_features,
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let rows = args.stack * args.batch * self.positions;
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

/// The tensors of the backward pass of a layer with a weight (linear, conv2d) beyond
/// the arguments: the input repeated `V` times (`[V·B, *in]`, for the weight
/// gradient) and zeroed gradients, each only where asked for.
pub(crate) struct WeightedGrads {
    x: Option<GpuTensor>,
    /// `[V·B, *in]`.
    grad_in: Option<GpuTensor>,
    /// Shaped as the parameters (weight, then bias).
    params: Option<Vec<GpuTensor>>,
}

impl WeightedGrads {
    /// Allocates what `args` asks for; `in_shape` is the per-example input shape.
    pub(crate) fn new(
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
        in_shape: &[usize],
    ) -> Result<Self> {
        let x = args
            .param_grads
            .then(|| pass.repeat(args.inputs[0], args.stack))
            .transpose()?;
        let rows = args.stack * args.batch;
        let grad_in = args.input_grads[0]
            .then(|| pass.zeros(&batched(rows, in_shape)))
            .transpose()?;
        let params = args
            .param_grads
            .then(|| args.params.iter().map(|p| pass.zeros(p.shape())).collect())
            .transpose()?;
        Ok(Self { x, grad_in, params })
    }

    /// The op's arguments: `args`' output gradient and weight, these tensors
    /// (overwritten).
    pub(crate) fn op_args<'a>(
        &'a self,
        args: &BackwardArgs<'a, GpuTensor, GpuTensor>,
    ) -> WeightedBackward<'a> {
        WeightedBackward {
            grad_out: args.grad_out,
            x: self.x.as_ref(),
            weight: Some(&args.params[0]),
            grad_in: self.grad_in.as_ref(),
            grad_weight: self.params.as_ref().map(|p| &p[0]),
            grad_bias: self.params.as_ref().and_then(|p| p.get(1)),
            accumulate: false,
        }
    }

    /// The gradients, keeping the repeated input alive until `pass` is submitted.
    pub(crate) fn finish(self, pass: &mut Pass) -> Grads<GpuTensor> {
        pass.keep(self.x);
        Grads {
            inputs: vec![self.grad_in],
            params: self.params,
        }
    }
}

impl CurvatureLayer for Linear {
    fn out_features(&self) -> usize {
        self.out_features
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn positions(&self) -> usize {
        self.positions
    }

    fn has_bias(&self) -> bool {
        self.bias
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![self.out_features, self.in_features]
    }

    fn expand_inputs(&self, _: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor> {
        input.view(&[batch * self.positions, self.in_features])
    }

    fn reduce_inputs(&self, pass: &mut Pass, input: &GpuTensor, batch: usize) -> Result<GpuTensor> {
        if self.positions == 1 {
            return input.view(&[batch, self.in_features]);
        }
        let (s, d) = (self.positions, self.in_features);
        sum_middle(pass, input, [batch, s, d], 1.0 / s as f32)
    }

    fn expand_grads(&self, _: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        grads.view(&[grads.len() / self.out_features, self.out_features])
    }

    fn summed_grads(&self, pass: &mut Pass, grads: &GpuTensor) -> Result<GpuTensor> {
        if self.positions == 1 {
            return grads.view(&[grads.len() / self.out_features, self.out_features]);
        }
        let (s, d_out) = (self.positions, self.out_features);
        sum_middle(pass, grads, [grads.len() / (s * d_out), s, d_out], 1.0)
    }

    fn reference_expand_inputs(&self, input: &[f64], _: usize) -> Vec<f64> {
        input.to_vec()
    }

    fn reference_expand_grads(&self, grads: &[f64]) -> Vec<f64> {
        grads.to_vec()
    }
}
