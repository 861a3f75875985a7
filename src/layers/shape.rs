//! Shape ops: `reshape` (a view: row-major order unchanged), and `transpose` and
//! `permute` (one strided gather, `shaders/shape.wgsl`). Dim attributes count the batch
//! axis as PyTorch does (negative from the end); the batch axis stays first.

use serde_json::Value;

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::view::View;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
};
use crate::ops::shape::{Gather, MAX_RANK};
use crate::reference::shape as reference;

/// The per-example axis of the dim `d` of a batched tensor `[B, *shape]` (`d` counts
/// the batch axis, negative from the end); the batch axis itself is refused.
pub(crate) fn example_dim(a: &Attrs, key: &str, d: i64, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as i64 + 1;
    let k = if d < 0 { d + rank } else { d };
    if k < 1 || k >= rank {
        return Err(a.err(format!(
            "{key} = {d} is out of range for an input {} of {rank} dimensions (dim 0, the \
             batch axis, may not be {})",
            batched_shape(shape),
            if k == 0 { "used" } else { "exceeded" }
        )));
    }
    Ok(k as usize - 1)
}

/// The integer, or list of integers, under `key` (required).
pub(crate) fn int_list(node: &Node, a: &Attrs, key: &str) -> Result<Vec<i64>> {
    let bad = |v: &Value| {
        a.err(format!(
            "\"{key}\": expected a list of integers, found {}",
            brief(v)
        ))
    };
    match node.attrs.get(key) {
        None => Err(a.err(format!("missing attribute \"{key}\""))),
        Some(v @ Value::Number(_)) => v.as_i64().map(|d| vec![d]).ok_or_else(|| bad(v)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_i64().ok_or_else(|| bad(i)))
            .collect(),
        Some(v) => Err(bad(v)),
    }
}

/// Errors unless a batched tensor of per-example `shape` fits the gather kernel.
pub(crate) fn check_rank(a: &Attrs, shape: &[usize]) -> Result<()> {
    if shape.len() + 1 > MAX_RANK {
        return Err(a.err(format!(
            "the input {} has more than the {MAX_RANK} dimensions (batch axis included) \
             supported",
            batched_shape(shape)
        )));
    }
    Ok(())
}

/// Builds `x.reshape(B, *shape)`, a [`View`], from `shape` (the per-example target shape: no batch axis, no −1).
pub fn build_reshape(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["shape"])?;
    let shape = int_list(node, &a, "shape")?;
    let output = shape
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            a.err(format!(
                "\"shape\": expected positive sizes per example (no batch axis, no -1), \
                 found {shape:?}"
            ))
        })?;
    let count = output.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if output.is_empty() || count != Some(input.iter().product()) {
        return Err(a.err(format!(
            "cannot reshape an input {} into {}: the element counts differ",
            batched_shape(input),
            batched_shape(&output)
        )));
    }
    Ok(View::boxed("reshape", input, output))
}

/// A permutation of the per-example dims: output dim `k` is input dim `perm[k]`.
#[derive(Debug)]
pub struct Permute {
    op: &'static str,
    input: Vec<usize>,
    perm: Vec<usize>,
    output: Vec<usize>,
}

/// Builds `x.transpose(dim0, dim1)`.
pub fn build_transpose(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["dim0", "dim1"])?;
    let dim = |key: &str| -> Result<usize> {
        let d = match node.attrs.get(key) {
            Some(v) => v.as_i64().ok_or_else(|| {
                a.err(format!(
                    "\"{key}\": expected an integer, found {}",
                    brief(v)
                ))
            })?,
            None => return Err(a.err(format!("missing attribute \"{key}\""))),
        };
        example_dim(&a, key, d, input)
    };
    let (d0, d1) = (dim("dim0")?, dim("dim1")?);
    let mut perm: Vec<usize> = (0..input.len()).collect();
    perm.swap(d0, d1);
    permute_layer(&a, "transpose", input, perm)
}

/// Builds `x.permute(*dims)` (`dims` counts the batch axis, which must stay first).
pub fn build_permute(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["dims"])?;
    let dims = int_list(node, &a, "dims")?;
    let rank = input.len() + 1;
    let resolved: Option<Vec<usize>> = dims
        .iter()
        .map(|&d| {
            let k = if d < 0 { d + rank as i64 } else { d };
            usize::try_from(k).ok().filter(|&k| k < rank)
        })
        .collect();
    let valid = resolved.filter(|r| {
        let mut seen = vec![false; rank];
        r.len() == rank && r.iter().all(|&k| !std::mem::replace(&mut seen[k], true))
    });
    let Some(resolved) = valid else {
        return Err(a.err(format!(
            "\"dims\" = {dims:?} is not a permutation of the {rank} dims of the input {}",
            batched_shape(input)
        )));
    };
    if resolved[0] != 0 {
        return Err(a.err(format!(
            "\"dims\" = {dims:?} moves the batch axis: dims[0] must be 0"
        )));
    }
    let perm = resolved[1..].iter().map(|&k| k - 1).collect();
    permute_layer(&a, "permute", input, perm)
}

fn permute_layer(
    a: &Attrs,
    op: &'static str,
    input: &[usize],
    perm: Vec<usize>,
) -> Result<Box<dyn Layer>> {
    check_rank(a, input)?;
    Ok(Box::new(Permute {
        op,
        input: input.to_vec(),
        output: perm.iter().map(|&p| input[p]).collect(),
        perm,
    }))
}

impl Permute {
    /// The gather of a batch of `rows` examples: forward (`inverse` false) over inputs
    /// `[rows, *input]`, or backward over gradients `[rows, *output]`.
    fn gather(&self, rows: usize, inverse: bool) -> Gather {
        let (shape, perm) = if inverse {
            (&self.output, reference::inverse_permutation(&self.perm))
        } else {
            (&self.input, self.perm.clone())
        };
        Gather::permute_examples(rows, shape, &perm)
    }
}

impl Layer for Permute {
    fn op(&self) -> &'static str {
        self.op
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
        let g = self.gather(args.batch, false);
        pass.gather(&g, args.inputs[0], &batched(args.batch, &self.output))
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let input = if args.input_grads[0] {
            let g = self.gather(rows, true);
            Some(pass.gather(&g, args.grad_out, &batched(rows, &self.input))?)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::permute(args.inputs[0], &self.input, &self.perm)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            let inverse = reference::inverse_permutation(&self.perm);
            reference::permute(args.grad_out, &self.output, &inverse)
        });
        Grads::one_input(input)
    }
}
