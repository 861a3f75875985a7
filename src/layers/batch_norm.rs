//! `torch.nn.BatchNorm2d` (op `batch_norm2d`, `[B, C, H, W]`) and `torch.nn.BatchNorm1d`
//! (op `batch_norm1d`, `[B, C]` or `[B, C, L]`) in eval mode:
//! `y = (x − running_mean)/√(running_var + eps)·weight + bias` per channel with the
//! running statistics (and, with `affine`, the weights) of the weights file
//! (`num_batches_tracked` is accepted and ignored); the output has the input's shape. Its
//! parameters and buffers are not curvature parameters: backward computes the input
//! gradient only.

use serde_json::json;

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
    one_input,
};
use crate::ops::norm::{self, BatchNormParams};
use crate::reference::graph_ops;

/// A BatchNorm1d or BatchNorm2d layer in eval mode.
#[derive(Debug)]
pub struct BatchNorm {
    op: &'static str,
    /// Per-example `[C, H, W]` (2d), `[C]` or `[C, L]` (1d).
    shape: Vec<usize>,
    affine: bool,
    eps: f64,
}

/// Builds a batch_norm2d or batch_norm1d layer from `num_features`, `eps` (default 1e-5) and `affine`
/// (default true); `momentum` is accepted and unused (eval mode), and
/// `track_running_stats` must be true (without running statistics eval mode normalises
/// with batch statistics).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(
        node,
        &[
            "num_features",
            "eps",
            "affine",
            "momentum",
            "track_running_stats",
        ],
    )?;
    a.only("track_running_stats", json!(true))?;
    let (op, c) = match (node.op.as_str(), input) {
        ("batch_norm2d", [c, _, _]) => ("batch_norm2d", c),
        ("batch_norm1d", [c] | [c, _]) => ("batch_norm1d", c),
        ("batch_norm2d", _) => {
            return Err(a.err(format!(
                "batch_norm2d takes a 4-D input [B, C, H, W], but its input is {}",
                batched_shape(input)
            )));
        }
        _ => {
            return Err(a.err(format!(
                "batch_norm1d takes an input [B, C] or [B, C, L], but its input is {}",
                batched_shape(input)
            )));
        }
    };
    let num_features = a.usize("num_features")?;
    if num_features != *c {
        return Err(a.err(format!(
            "num_features = {num_features}, but the input {} has {c} channels",
            batched_shape(input)
        )));
    }
    let eps = a.eps()?;
    Ok(Box::new(BatchNorm {
        op,
        shape: input.to_vec(),
        affine: a.bool_or("affine", true)?,
        eps,
    }))
}

/// The f64 parameters and buffers, each `[C]`.
struct ReferenceParams<'a> {
    mean: &'a [f64],
    var: &'a [f64],
    /// `(weight, bias)` with `affine`.
    affine: Option<(&'a [f64], &'a [f64])>,
}

impl BatchNorm {
    /// The GPU parameters from the tensors in the order of [`Layer::params`].
    fn gpu_params<'a>(&self, params: &'a [GpuTensor]) -> BatchNormParams<'a> {
        let (affine, stats) = if self.affine {
            (Some((&params[0], &params[1])), &params[2..])
        } else {
            (None, params)
        };
        BatchNormParams {
            running_mean: &stats[0],
            running_var: &stats[1],
            affine,
            eps: self.eps as f32,
        }
    }

    /// The f64 parameters by name.
    fn reference_params<'a>(&self, params: &'a [Vec<f64>]) -> ReferenceParams<'a> {
        let (affine, stats) = if self.affine {
            (Some((&params[0][..], &params[1][..])), &params[2..])
        } else {
            (None, params)
        };
        ReferenceParams {
            mean: &stats[0],
            var: &stats[1],
            affine,
        }
    }
}

impl Layer for BatchNorm {
    fn op(&self) -> &'static str {
        self.op
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    /// `weight`, `bias` (with `affine`), then the buffers `running_mean`, `running_var`,
    /// each `[C]`.
    fn params(&self) -> Vec<ParamSpec> {
        let c = vec![self.shape[0]];
        let mut names = Vec::new();
        if self.affine {
            names.extend(["weight", "bias"]);
        }
        names.extend(["running_mean", "running_var"]);
        names
            .into_iter()
            .map(|suffix| ParamSpec {
                suffix,
                shape: c.clone(),
            })
            .collect()
    }

    /// PyTorch's counter of training batches, unused in eval mode.
    fn ignored_params(&self) -> &'static [&'static str] {
        &["num_batches_tracked"]
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.shape))?;
        norm::batch_norm_forward(
            &mut pass.rec,
            args.inputs[0],
            &self.gpu_params(args.params),
            &y,
        )?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            norm::batch_norm_backward(
                &mut pass.rec,
                args.grad_out,
                &self.gpu_params(args.params),
                &gx,
            )?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let p = self.reference_params(args.params);
        graph_ops::batch_norm_eval_forward(
            args.inputs[0],
            &batched(args.batch, &self.shape),
            p.mean,
            p.var,
            p.affine,
            self.eps,
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let p = self.reference_params(args.params);
        let input = args.input_grads[0].then(|| {
            graph_ops::batch_norm_eval_backward(
                args.grad_out,
                &batched(args.stack * args.batch, &self.shape),
                p.var,
                p.affine.map(|(w, _)| w),
                self.eps,
            )
        });
        Grads::one_input(input)
    }
}
