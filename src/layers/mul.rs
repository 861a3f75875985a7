//! `a * b` of two activations (op `mul`): gating (`silu(x W₁) * (x W₃)`), squeeze-and-
//! excitation (`h * w[:, :, None, None]`). Per-example shapes of equal rank, each dim
//! equal or 1 in one of them (PyTorch's broadcasting; the batch axis is never
//! broadcast); the output has the larger size of each dim.
//!
//! Forward broadcasts an input that needs it with a gather (stride 0), then multiplies
//! elementwise. Backward: `grad_a = Σ_broadcast (g ⊙ b)` — the product, permuted so the
//! dims `a` broadcasts along come last, summed over them (`reduce::sum_cols`); likewise
//! for `b`.

use crate::error::{Error, Result};
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape};
use crate::ops::combine;
use crate::ops::reduce::{self, Sum};
use crate::ops::shape::{Gather, strides};

/// An elementwise product of two values.
#[derive(Debug)]
pub struct Mul {
    /// The inputs' per-example shapes.
    inputs: [Vec<usize>; 2],
    shape: Vec<usize>,
}

/// Builds a mul from two inputs of broadcast-compatible per-example shapes.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    Attrs::new(node, &[])?;
    let [a, b] = inputs else {
        return Err(Error::model(
            node.label(),
            format!("mul takes two inputs, found {}", inputs.len()),
        ));
    };
    let compatible =
        a.len() == b.len() && a.iter().zip(*b).all(|(&x, &y)| x == y || x == 1 || y == 1);
    if !compatible {
        return Err(Error::model(
            node.label(),
            format!(
                "mul needs two inputs of the same number of dims whose sizes are equal or 1 \
                 in one of them (PyTorch's broadcasting), found {} and {}",
                batched_shape(a),
                batched_shape(b)
            ),
        ));
    }
    Ok(Box::new(Mul {
        inputs: [a.to_vec(), b.to_vec()],
        shape: a.iter().zip(*b).map(|(&x, &y)| x.max(y)).collect(),
    }))
}

impl Mul {
    /// A gather of `rows` examples of input `i` broadcast to the output shape, or `None`
    /// when it already has it.
    fn broadcast(&self, i: usize, rows: usize) -> Option<Gather> {
        let input = &self.inputs[i];
        if *input == self.shape {
            return None;
        }
        let own = strides(input);
        let mut dims = vec![rows];
        dims.extend(&self.shape);
        let mut s = vec![input.iter().product()];
        s.extend(
            input
                .iter()
                .zip(&own)
                .zip(&self.shape)
                .map(|((&d, &st), &out)| if d == out { st } else { 0 }),
        );
        Some(Gather::strided(dims, s))
    }

    /// Input `i` of `rows` examples at the output's shape (a view when it has it).
    fn expanded(&self, pass: &mut Pass, x: &GpuTensor, i: usize, rows: usize) -> Result<GpuTensor> {
        match self.broadcast(i, rows) {
            None => x.view(x.shape()),
            Some(g) => pass.gather(&g, x, &batched(rows, &self.shape)),
        }
    }

    /// The per-example dims input `i` keeps, then those it broadcasts along.
    fn kept_then_broadcast(&self, i: usize) -> (Vec<usize>, Vec<usize>) {
        let input = &self.inputs[i];
        let (kept, broadcast): (Vec<usize>, Vec<usize>) =
            (0..self.shape.len()).partition(|&d| input[d] == self.shape[d]);
        (kept, broadcast)
    }
}

impl Layer for Mul {
    fn op(&self) -> &'static str {
        "mul"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let a = self.expanded(pass, args.inputs[0], 0, args.batch)?;
        let b = self.expanded(pass, args.inputs[1], 1, args.batch)?;
        let y = pass.zeros(&batched(args.batch, &self.shape))?;
        combine::multiply(&mut pass.rec, &a, &b, &y)?;
        pass.keep((a, b));
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let mut inputs = Vec::with_capacity(2);
        for i in 0..2 {
            if !args.input_grads[i] {
                inputs.push(None);
                continue;
            }
            // g ⊙ (the other input, broadcast and repeated over the stack).
            let other = self.expanded(pass, args.inputs[1 - i], 1 - i, args.batch)?;
            let other = pass.repeat(&other, args.stack)?;
            let product = pass.zeros(&batched(rows, &self.shape))?;
            combine::multiply(&mut pass.rec, args.grad_out, &other, &product)?;
            pass.keep(other);
            let (kept, broadcast) = self.kept_then_broadcast(i);
            if broadcast.is_empty() {
                inputs.push(Some(product));
                continue;
            }
            let perm: Vec<usize> = kept.iter().chain(&broadcast).copied().collect();
            let permuted = pass.gather(
                &Gather::permute_examples(rows, &self.shape, &perm),
                &product,
                &[product.len()],
            )?;
            pass.keep(product);
            let cols: usize = broadcast.iter().map(|&d| self.shape[d]).product();
            let grad = pass.zeros(&batched(rows, &self.inputs[i]))?;
            reduce::sum_cols(
                &mut pass.rec,
                &permuted,
                &grad,
                &Sum::new(permuted.len() / cols, cols),
            )?;
            pass.keep(permuted);
            inputs.push(Some(grad));
        }
        Ok(Grads {
            inputs,
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let a = self.reference_expand(args.inputs[0], 0);
        let b = self.reference_expand(args.inputs[1], 1);
        a.iter().zip(&b).map(|(x, y)| x * y).collect()
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let inputs = (0..2)
            .map(|i| {
                args.input_grads[i].then(|| {
                    let other = self.reference_expand(args.inputs[1 - i], 1 - i);
                    let per_example = other.len() / args.batch.max(1);
                    let own_len: usize = self.inputs[i].iter().product();
                    let mut grad = vec![0.0; args.stack * args.batch * own_len];
                    for (k, &g) in args.grad_out.iter().enumerate() {
                        let row = k / per_example;
                        let at = self.reference_source(i, k % per_example);
                        grad[row * own_len + at] += g * other[k % other.len()];
                    }
                    grad
                })
            })
            .collect();
        Grads {
            inputs,
            params: None,
        }
    }
}

impl Mul {
    /// The element of input `i`'s example that output element `flat` (within one
    /// example) reads.
    fn reference_source(&self, i: usize, flat: usize) -> usize {
        let input = &self.inputs[i];
        let (out_strides, in_strides) = (strides(&self.shape), strides(input));
        let mut at = 0;
        for d in 0..self.shape.len() {
            let index = flat / out_strides[d] % self.shape[d];
            if input[d] != 1 {
                at += index * in_strides[d];
            }
        }
        at
    }

    /// Input `i` (`[B, *input]`, f64) broadcast to `[B, *shape]`.
    fn reference_expand(&self, x: &[f64], i: usize) -> Vec<f64> {
        let own_len: usize = self.inputs[i].iter().product();
        let per_example: usize = self.shape.iter().product();
        let batch = x.len() / own_len.max(1);
        (0..batch * per_example)
            .map(|k| x[k / per_example * own_len + self.reference_source(i, k % per_example)])
            .collect()
    }
}
