//! `torch.nn.AdaptiveAvgPool2d(output_size)`: `[B, C, H, W] → [B, C, OH, OW]`, output
//! `(oh, ow)` averaging input rows `⌊oh·H/OH⌋ .. ⌈(oh+1)·H/OH⌉` and the columns
//! likewise (PyTorch's windows, any output size); backward spreads each output's
//! gradient evenly over its window.

use serde_json::Value;

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
    spatial_input,
};
use crate::ops::resample;
use crate::reference::graph_ops;

/// Adaptive average pooling to a fixed plane size.
#[derive(Debug)]
pub struct AdaptiveAvgPool2d {
    input: Vec<usize>,
    output: Vec<usize>,
}

/// Builds an adaptive_avg_pool2d layer from `output_size`: a positive integer or a
/// 2-list whose entries are positive integers or `null` (keep the input's size).
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["output_size"])?;
    let [h, w] = spatial_input(input).ok_or_else(|| {
        a.err(format!(
            "adaptive_avg_pool2d takes a 4-D input [B, C, H, W], but its input is {}",
            batched_shape(input)
        ))
    })?;
    let entry = |v: &Value, keep: usize| match v {
        Value::Null => Some(keep),
        v => v.as_u64().filter(|&s| s > 0).map(|s| s as usize),
    };
    let size = match node.attrs.get("output_size") {
        None => return Err(a.err("missing attribute \"output_size\"")),
        Some(Value::Array(items)) if items.len() == 2 => [entry(&items[0], h), entry(&items[1], w)],
        Some(v @ Value::Number(_)) => [entry(v, h), entry(v, w)],
        Some(_) => [None, None],
    };
    let [Some(oh), Some(ow)] = size else {
        return Err(a.err(format!(
            "\"output_size\": expected a positive integer or a list of 2 (integers or \
             null), found {}",
            brief(&node.attrs["output_size"])
        )));
    };
    Ok(Box::new(AdaptiveAvgPool2d {
        input: input.to_vec(),
        output: vec![input[0], oh, ow],
    }))
}

impl AdaptiveAvgPool2d {
    fn nchw(&self, rows: usize) -> [usize; 4] {
        [rows, self.input[0], self.input[1], self.input[2]]
    }

    fn out_size(&self) -> [usize; 2] {
        [self.output[1], self.output[2]]
    }
}

impl Layer for AdaptiveAvgPool2d {
    fn op(&self) -> &'static str {
        "adaptive_avg_pool2d"
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
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        resample::adaptive_avg_pool2d_forward(&mut pass.rec, args.inputs[0], &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(&batched(args.stack * args.batch, &self.input))?;
            resample::adaptive_avg_pool2d_backward(&mut pass.rec, args.grad_out, &gx)?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        graph_ops::adaptive_avg_pool2d_forward(
            args.inputs[0],
            self.nchw(args.batch),
            self.out_size(),
        )
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            graph_ops::adaptive_avg_pool2d_backward(
                args.grad_out,
                self.nchw(args.stack * args.batch),
                self.out_size(),
            )
        });
        Grads::one_input(input)
    }
}
