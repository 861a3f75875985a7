//! `torch.nn.Embedding`: token ids `[B, *shape]` (the graph input of dtype `i64`, u32
//! words on the GPU) → rows of the table `weight [num_embeddings, embedding_dim]`,
//! `[B, *shape, embedding_dim]`. Not a curvature layer; backward gives no input
//! gradient (ids) and, when asked, the table's gradient. `padding_idx` is accepted and
//! changes nothing we compute (it only freezes a row during training).

use serde_json::Value;

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, one_input,
};
use crate::ops::embedding::{embedding_forward, embedding_table_grad};
use crate::reference::shape as reference;

/// An embedding table.
#[derive(Debug)]
pub struct Embedding {
    num_embeddings: usize,
    embedding_dim: usize,
    output: Vec<usize>,
}

/// Builds an embedding from `num_embeddings`, `embedding_dim` and `padding_idx` (an
/// int, negative from the end, or null), plus PyTorch's other constructor fields at
/// their defaults (`max_norm` null, `scale_grad_by_freq` and `sparse` false).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(
        node,
        &[
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "scale_grad_by_freq",
            "sparse",
        ],
    )?;
    a.only("max_norm", Value::Null)?;
    a.only("scale_grad_by_freq", Value::Bool(false))?;
    a.bool_or("sparse", false)?;
    let (num_embeddings, embedding_dim) = (a.usize("num_embeddings")?, a.usize("embedding_dim")?);
    if num_embeddings == 0 || embedding_dim == 0 {
        return Err(a.err(format!(
            "num_embeddings and embedding_dim must be positive, found {num_embeddings} and \
             {embedding_dim}"
        )));
    }
    if num_embeddings > u32::MAX as usize {
        return Err(a.err(format!(
            "num_embeddings = {num_embeddings} exceeds the 2^32 ids a u32 token holds"
        )));
    }
    match node.attrs.get("padding_idx") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let n = num_embeddings as i64;
            if !v.as_i64().is_some_and(|p| (-n..n).contains(&p)) {
                return Err(a.err(format!(
                    "\"padding_idx\": expected null or an integer in [-{n}, {n}), found {}",
                    brief(v)
                )));
            }
        }
    }
    let mut output = input.to_vec();
    output.push(embedding_dim);
    if output
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none()
        || num_embeddings.checked_mul(embedding_dim).is_none()
    {
        return Err(a.err("the output or the table has more elements than fit in memory"));
    }
    Ok(Box::new(Embedding {
        num_embeddings,
        embedding_dim,
        output,
    }))
}

impl Layer for Embedding {
    fn op(&self) -> &'static str {
        "embedding"
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            suffix: "weight",
            shape: vec![self.num_embeddings, self.embedding_dim],
        }]
    }

    fn saved(&self) -> Saved {
        // The ids, for the table gradient.
        Saved::INPUTS
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        embedding_forward(&mut pass.rec, args.inputs[0], &args.params[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let params = if args.param_grads {
            let grad = pass.zeros(args.params[0].shape())?;
            embedding_table_grad(&mut pass.rec, args.inputs[0], args.grad_out, &grad)?;
            Some(vec![grad])
        } else {
            None
        };
        Ok(Grads {
            inputs: vec![None],
            params,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::embedding_forward(args.inputs[0], &args.params[0], self.embedding_dim)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let params = args.param_grads.then(|| {
            vec![reference::embedding_table_grad(
                args.inputs[0],
                args.grad_out,
                self.num_embeddings,
                self.embedding_dim,
            )]
        });
        Grads {
            inputs: vec![None],
            params,
        }
    }
}
