//! `torch.matmul` of two activations over equal leading dims: `[*, M, K]` and
//! `[*, K, N]` → `[*, M, N]` (`aten.matmul`/`bmm`, e.g. `Q·Kᵀ` and `attention·V`; a
//! transpose is a separate node). One batched GEMM over the batch and the leading dims;
//! backward `G·Bᵀ` and `Aᵀ·G` per stacked vector, reading the saved inputs.

use crate::error::{Error, Result};
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape};
use crate::ops::matmul::BatchedMatmul;
use crate::reference::attention;

/// A batched product of two values.
#[derive(Debug)]
pub struct Matmul {
    /// Product of the leading per-example dims (the per-example batch of products).
    lead: usize,
    m: usize,
    k: usize,
    n: usize,
    output: Vec<usize>,
}

/// Builds a matmul from two inputs `[*, M, K]` and `[*, K, N]` with equal leading dims
/// (no attributes).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    Attrs::new(node, &[])?;
    let [a, b] = inputs else {
        return Err(Error::model(
            node.label(),
            format!("matmul takes two inputs, found {}", inputs.len()),
        ));
    };
    let shapes_err = |why: &str| {
        Error::model(
            node.label(),
            format!(
                "matmul needs inputs [B, *, M, K] and [B, *, K, N] with equal leading dims \
                 ({why}), found {} and {}",
                batched_shape(a),
                batched_shape(b)
            ),
        )
    };
    let (&[m, k], &[k_b, n]) = (&a[a.len().max(2) - 2..], &b[b.len().max(2) - 2..]) else {
        return Err(shapes_err("each at least 2 dims per example"));
    };
    let (lead_a, lead_b) = (&a[..a.len() - 2], &b[..b.len() - 2]);
    if lead_a != lead_b {
        return Err(shapes_err("the leading dims differ"));
    }
    if k != k_b {
        return Err(shapes_err("the inner dims differ"));
    }
    if m * k * n == 0 {
        return Err(shapes_err("no dim may be 0"));
    }
    let mut output = lead_a.to_vec();
    output.extend([m, n]);
    Ok(Box::new(Matmul {
        lead: lead_a.iter().product(),
        m,
        k,
        n,
        output,
    }))
}

impl Matmul {
    fn dims(&self, batch: usize) -> BatchedMatmul {
        BatchedMatmul {
            batch: batch * self.lead,
            m: self.m,
            k: self.k,
            n: self.n,
        }
    }
}

impl Layer for Matmul {
    fn op(&self) -> &'static str {
        "matmul"
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
        self.dims(args.batch)
            .forward(&mut pass.rec, args.inputs[0], args.inputs[1], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let dims = self.dims(args.batch);
        let rows = args.stack * args.batch;
        let (a, b) = (args.inputs[0], args.inputs[1]);
        let grad_a = if args.input_grads[0] {
            let g = pass.zeros(&batched(rows, &a.shape()[1..]))?;
            dims.backward_a(&mut pass.rec, args.stack, args.grad_out, b, &g)?;
            Some(g)
        } else {
            None
        };
        let grad_b = if args.input_grads[1] {
            let g = pass.zeros(&batched(rows, &b.shape()[1..]))?;
            dims.backward_b(&mut pass.rec, args.stack, a, args.grad_out, &g)?;
            Some(g)
        } else {
            None
        };
        Ok(Grads {
            inputs: vec![grad_a, grad_b],
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let d = self.dims(args.batch);
        attention::matmul_forward(args.inputs[0], args.inputs[1], d.batch, d.m, d.k, d.n)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let d = self.dims(args.batch);
        let (ga, gb) = attention::matmul_backward(
            args.inputs[0],
            args.inputs[1],
            args.grad_out,
            d.batch,
            [d.m, d.k, d.n],
        );
        Grads {
            inputs: vec![
                args.input_grads[0].then_some(ga),
                args.input_grads[1].then_some(gb),
            ],
            params: None,
        }
    }
}
