//! `x.mean(dim, keepdim)` over per-example dims (`dim` an int or a list, counting the
//! batch axis, negative from the end; the batch axis may not be averaged). Forward:
//! the averaged dims are brought next to each other (a gather when they are not
//! already) and summed by a batched GEMM with a row of ones; backward spreads the
//! gradient back over them (a stride-0 gather) divided by their size.

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::shape::{check_rank, example_dim, int_list};
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, one_input};
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::reduce::{Sum, sum_cols};
use crate::ops::shape::{Gather, strides};
use crate::reference::shape as reference;

/// `y[o, :] = alpha·Σ_k x[o, k, :]` for `x` `[outer, k, inner]` → `[outer, inner]`
/// (a new tensor): `sum_cols` when `inner` is 1, else one batched GEMM of a shared
/// ones row `[1, k]` with each `[k, inner]` slice.
pub(crate) fn sum_middle(
    pass: &mut Pass,
    x: &GpuTensor,
    [outer, k, inner]: [usize; 3],
    alpha: f32,
) -> Result<GpuTensor> {
    let y = pass.zeros(&[outer, inner])?;
    if inner == 1 {
        let sum = Sum {
            alpha,
            ..Sum::new(outer, k)
        };
        sum_cols(&mut pass.rec, x, &y, &sum)?;
        return Ok(y);
    }
    let ones = pass.ctx().upload(&vec![1.0; k], &[1, k])?;
    let mut sum = Gemm::new(1, inner, k, false, false)
        .batched(outer)
        .scaled(alpha, 0.0);
    sum.stride_a = 0;
    gemm(&mut pass.rec, &sum, &ones, x, &y)?;
    pass.keep(ones);
    Ok(y)
}

/// A mean over some per-example dims.
#[derive(Debug)]
pub struct Mean {
    input: Vec<usize>,
    /// Per input dim, whether it is averaged.
    reduced: Vec<bool>,
    output: Vec<usize>,
}

/// Builds a mean from `dim` (an int or a list) and `keepdim` (default false).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["dim", "keepdim"])?;
    let keepdim = a.bool_or("keepdim", false)?;
    check_rank(&a, input)?;
    let mut reduced = vec![false; input.len()];
    for d in int_list(node, &a, "dim")? {
        let k = example_dim(&a, "dim", d, input)?;
        if std::mem::replace(&mut reduced[k], true) {
            return Err(a.err(format!("\"dim\" names dim {d} twice")));
        }
    }
    let output: Vec<usize> = input
        .iter()
        .zip(&reduced)
        .filter_map(|(&d, &r)| match (r, keepdim) {
            (false, _) => Some(d),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect();
    if output.is_empty() {
        return Err(a.err(
            "averaging every per-example dim leaves a scalar per example; keep a dim \
             (keepdim = true) or add a flatten",
        ));
    }
    Ok(Box::new(Mean {
        input: input.to_vec(),
        reduced,
        output,
    }))
}

impl Mean {
    /// Elements averaged into each output.
    fn count(&self) -> usize {
        self.input
            .iter()
            .zip(&self.reduced)
            .filter(|(_, r)| **r)
            .map(|(d, _)| d)
            .product()
    }

    /// The kept example dims.
    fn kept(&self) -> Vec<usize> {
        self.input
            .iter()
            .zip(&self.reduced)
            .filter(|(_, r)| !**r)
            .map(|(d, _)| *d)
            .collect()
    }
}

impl Layer for Mean {
    fn op(&self) -> &'static str {
        "mean"
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
        let k = self.count();
        let first = self.reduced.iter().position(|&r| r).expect("a reduced dim");
        let last = self
            .reduced
            .iter()
            .rposition(|&r| r)
            .expect("a reduced dim");
        let y = if self.reduced[first..=last].iter().all(|&r| r) {
            // One block of adjacent dims: [B·outer, k, inner] as stored.
            let outer = args.batch * self.input[..first].iter().product::<usize>();
            let inner = self.input[last + 1..].iter().product();
            sum_middle(pass, x, [outer, k, inner], 1.0 / k as f32)?
        } else {
            // Kept dims first, then the averaged ones: [B·kept, k].
            let dims = 0..self.input.len();
            let perm: Vec<usize> = (dims.clone().filter(|&d| !self.reduced[d]))
                .chain(dims.filter(|&d| self.reduced[d]))
                .collect();
            let g = Gather::permute_examples(args.batch, &self.input, &perm);
            let moved = pass.gather(&g, x, &[x.len()])?;
            let outer = x.len() / k;
            let y = sum_middle(pass, &moved, [outer, k, 1], 1.0 / k as f32)?;
            pass.keep(moved);
            y
        };
        y.reshape(&batched(args.batch, &self.output))
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let input = if args.input_grads[0] {
            // Each input element reads its kept coordinates' gradient: stride 0 along
            // the averaged dims.
            let kept_strides = strides(&batched(rows, &self.kept()));
            let mut kept = kept_strides[1..].iter();
            let dims = batched(rows, &self.input);
            let strides = std::iter::once(kept_strides[0])
                .chain(self.reduced.iter().map(|&r| {
                    if r {
                        0
                    } else {
                        *kept.next().expect("a kept dim")
                    }
                }))
                .collect();
            let g = Gather {
                divisor: self.count() as f32,
                ..Gather::strided(dims.clone(), strides)
            };
            Some(pass.gather(&g, args.grad_out, &dims)?)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        reference::mean_forward(args.inputs[0], &self.input, &self.reduced)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0]
            .then(|| reference::mean_backward(args.grad_out, &self.input, &self.reduced));
        Grads::one_input(input)
    }
}
