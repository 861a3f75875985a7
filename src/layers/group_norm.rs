//! `torch.nn.GroupNorm` (op `group_norm`), and `torch.nn.InstanceNorm2d` without running
//! statistics as the group norm of one channel per group: input `[C, *spatial]` per
//! example, `G` groups of `C/G` consecutive channels, each normalised over its channels
//! and positions with its own mean and biased variance, then (with `affine`)
//! `·weight[c] + bias[c]` per channel. Weights `<module>.weight`, `<module>.bias` `[C]`;
//! not curvature parameters.
//!
//! A group of one example is contiguous in `[B, C, *spatial]`, so on the GPU the
//! normalisation is LayerNorm's row kernels over rows of `(C/G)·spatial`, and the affine
//! map is BatchNorm's per-channel kernel with mean 0, variance 1 and `eps` 0 (an exact
//! `x·w + b`).

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

/// A group normalisation.
#[derive(Debug)]
pub struct GroupNorm {
    /// Per-example `[C, *spatial]`.
    shape: Vec<usize>,
    groups: usize,
    affine: bool,
    eps: f64,
}

/// Builds a group_norm from `num_groups`, `num_channels`, `eps` (default 1e-5) and
/// `affine` (default true).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["num_groups", "num_channels", "eps", "affine"])?;
    let (groups, channels) = (a.usize("num_groups")?, a.usize("num_channels")?);
    if groups == 0 || channels == 0 || channels % groups != 0 {
        return Err(a.err(format!(
            "num_groups must be positive and divide num_channels, found {groups} and \
             {channels}"
        )));
    }
    if input.first() != Some(&channels) || input.contains(&0) {
        return Err(a.err(format!(
            "group_norm takes an input [B, {channels}, *] (num_channels first), but its input \
             is {}",
            batched_shape(input)
        )));
    }
    let eps = a.eps()?;
    Ok(Box::new(GroupNorm {
        shape: input.to_vec(),
        groups,
        affine: a.bool_or("affine", true)?,
        eps,
    }))
}

impl GroupNorm {
    /// Elements of one group of one example.
    fn group_len(&self) -> usize {
        self.shape.iter().product::<usize>() / self.groups
    }

    /// `t` seen as rows of one group.
    fn rows(&self, t: &GpuTensor) -> Result<GpuTensor> {
        t.view(&[t.len() / self.group_len(), self.group_len()])
    }

    /// The per-channel affine map as BatchNorm's kernel parameters (mean 0, variance 1,
    /// eps 0), with the two constant buffers it reads.
    fn affine_map<'a>(
        &self,
        pass: &mut Pass,
        params: &'a [GpuTensor],
    ) -> Result<(GpuTensor, GpuTensor, [&'a GpuTensor; 2])> {
        let c = self.shape[0];
        let zeros = pass.zeros(&[c])?;
        let ones = pass.ctx().upload(&vec![1.0; c], &[c])?;
        Ok((zeros, ones, [&params[0], &params[1]]))
    }
}

impl Layer for GroupNorm {
    fn op(&self) -> &'static str {
        "group_norm"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    fn params(&self) -> Vec<ParamSpec> {
        if !self.affine {
            return Vec::new();
        }
        ParamSpec::weight_and_bias(vec![self.shape[0]], Some(self.shape[0]))
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let shape = batched(args.batch, &self.shape);
        let eps = self.eps as f32;
        let x = self.rows(args.inputs[0])?;
        if !self.affine {
            let y = pass.zeros(&shape)?;
            norm::layer_norm_forward(&mut pass.rec, &x, None, eps, &self.rows(&y)?)?;
            return Ok(y);
        }
        let normalised = pass.zeros(&shape)?;
        norm::layer_norm_forward(&mut pass.rec, &x, None, eps, &self.rows(&normalised)?)?;
        let (zeros, ones, [w, b]) = self.affine_map(pass, args.params)?;
        let y = pass.zeros(&shape)?;
        let map = BatchNormParams {
            running_mean: &zeros,
            running_var: &ones,
            affine: Some((w, b)),
            eps: 0.0,
        };
        norm::batch_norm_forward(&mut pass.rec, &normalised, &map, &y)?;
        pass.keep((normalised, zeros, ones));
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        if !args.input_grads[0] {
            return Ok(Grads::one_input(None));
        }
        let shape = args.grad_out.shape().to_vec();
        // Through the affine map: g·weight per channel.
        let g = if self.affine {
            let (zeros, ones, [w, b]) = self.affine_map(pass, args.params)?;
            let scaled = pass.zeros(&shape)?;
            let map = BatchNormParams {
                running_mean: &zeros,
                running_var: &ones,
                affine: Some((w, b)),
                eps: 0.0,
            };
            norm::batch_norm_backward(&mut pass.rec, args.grad_out, &map, &scaled)?;
            pass.keep((zeros, ones));
            scaled
        } else {
            args.grad_out.view(&shape)?
        };
        let gx = pass.zeros(&shape)?;
        norm::layer_norm_backward(
            &mut pass.rec,
            &self.rows(args.inputs[0])?,
            None,
            self.eps as f32,
            &self.rows(&g)?,
            &self.rows(&gx)?,
        )?;
        pass.keep(g);
        Ok(Grads::one_input(Some(gx)))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let normalised =
            graph_ops::layer_norm_forward(args.inputs[0], self.group_len(), None, self.eps);
        if !self.affine {
            return normalised;
        }
        let positions = self.shape[1..].iter().product::<usize>();
        let c = self.shape[0];
        let (w, b) = (&args.params[0], &args.params[1]);
        normalised
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let ch = i / positions % c;
                v * w[ch] + b[ch]
            })
            .collect()
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            let positions = self.shape[1..].iter().product::<usize>();
            let c = self.shape[0];
            let g: Vec<f64> = if self.affine {
                let w = &args.params[0];
                args.grad_out
                    .iter()
                    .enumerate()
                    .map(|(i, &g)| g * w[i / positions % c])
                    .collect()
            } else {
                args.grad_out.to_vec()
            };
            graph_ops::layer_norm_backward(args.inputs[0], self.group_len(), None, self.eps, &g)
        });
        Grads::one_input(input)
    }
}
