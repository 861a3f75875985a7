//! `torch.nn.LayerNorm` over the trailing `normalized_shape` dimensions (usually the
//! last): each example's rows of `D = ∏ normalized_shape` elements become
//! `(x − mean)/√(var + eps)·weight + bias`; shape-preserving. Its weights are not
//! curvature parameters: backward computes the input gradient only.

use serde_json::{Value, json};

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::norm;
use crate::reference::graph_ops;

/// A LayerNorm layer.
#[derive(Debug)]
pub struct LayerNorm {
    /// Per-example input (and output) shape.
    shape: Vec<usize>,
    /// The trailing dimensions normalised over.
    normalized_shape: Vec<usize>,
    affine: bool,
    eps: f64,
}

/// Builds a layer_norm layer from `normalized_shape` (an integer or a list: the
/// input's trailing dimensions), `eps` (default 1e-5) and `elementwise_affine`
/// (default true; `bias` must be true if given).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(
        node,
        &["normalized_shape", "eps", "elementwise_affine", "bias"],
    )?;
    a.only("bias", json!(true))?;
    let normalized_shape: Vec<usize> = match node.attrs.get("normalized_shape") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .unwrap_or_default(),
        Some(v) => v.as_u64().map(|d| vec![d as usize]).unwrap_or_default(),
        None => return Err(a.err("missing attribute \"normalized_shape\"")),
    };
    if normalized_shape.is_empty()
        || normalized_shape.contains(&0)
        || !input.ends_with(&normalized_shape)
    {
        return Err(a.err(format!(
            "normalized_shape = {} must be the trailing dimensions of the input {}",
            brief(&node.attrs["normalized_shape"]),
            batched_shape(input)
        )));
    }
    let eps = a.eps()?;
    Ok(Box::new(LayerNorm {
        shape: input.to_vec(),
        normalized_shape,
        affine: a.bool_or("elementwise_affine", true)?,
        eps,
    }))
}

impl LayerNorm {
    /// `D`, the elements normalised together.
    fn row(&self) -> usize {
        self.normalized_shape.iter().product()
    }

    /// `t` seen as rows of `D`.
    fn rows(&self, t: &GpuTensor) -> Result<GpuTensor> {
        t.view(&[t.len() / self.row(), self.row()])
    }
}

impl Layer for LayerNorm {
    fn op(&self) -> &'static str {
        "layer_norm"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    /// `weight` and `bias`, each shaped `normalized_shape` (with `elementwise_affine`).
    fn params(&self) -> Vec<ParamSpec> {
        if !self.affine {
            return Vec::new();
        }
        ["weight", "bias"]
            .map(|suffix| ParamSpec {
                suffix,
                shape: self.normalized_shape.clone(),
            })
            .to_vec()
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.shape))?;
        let affine = self.affine.then(|| (&args.params[0], &args.params[1]));
        let (x_rows, y_rows) = (self.rows(args.inputs[0])?, self.rows(&y)?);
        norm::layer_norm_forward(&mut pass.rec, &x_rows, affine, self.eps as f32, &y_rows)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            let weight = self.affine.then(|| &args.params[0]);
            norm::layer_norm_backward(
                &mut pass.rec,
                &self.rows(args.inputs[0])?,
                weight,
                self.eps as f32,
                &self.rows(args.grad_out)?,
                &self.rows(&gx)?,
            )?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let affine = self
            .affine
            .then(|| (&args.params[0][..], &args.params[1][..]));
        graph_ops::layer_norm_forward(args.inputs[0], self.row(), affine, self.eps)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            let weight = self.affine.then(|| &args.params[0][..]);
            graph_ops::layer_norm_backward(
                args.inputs[0],
                self.row(),
                weight,
                self.eps,
                args.grad_out,
            )
        });
        Grads::one_input(input)
    }
}
