//! `torch.nn.Upsample(scale_factor=s, mode="nearest")` / `F.interpolate` with integer
//! factors: `[B, C, H, W] → [B, C, H·SH, W·SW]`, each input element repeated over an
//! `SH×SW` block; backward sums each block.

use serde_json::{Value, json};

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

/// Nearest upsampling by integer factors.
#[derive(Debug)]
pub struct UpsampleNearest2d {
    input: Vec<usize>,
    output: Vec<usize>,
    factor: [usize; 2],
}

/// A positive integer factor: an integer, or a float with an integral value (PyTorch
/// writes `2.0`).
fn factor(v: &Value) -> Option<usize> {
    let f = v.as_f64()?;
    (f >= 1.0 && f.fract() == 0.0 && f <= u32::MAX as f64).then_some(f as usize)
}

/// Builds an upsample_nearest2d layer from `scale_factor` (a positive integer or a
/// 2-list of them); `mode` must be `"nearest"` if given.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["scale_factor", "mode", "align_corners"])?;
    a.only("mode", json!("nearest"))?;
    a.only("align_corners", Value::Null)?;
    let factors = match node.attrs.get("scale_factor") {
        None => return Err(a.err("missing attribute \"scale_factor\"")),
        Some(Value::Array(items)) if items.len() == 2 => [factor(&items[0]), factor(&items[1])],
        Some(v) => [factor(v); 2],
    };
    let [Some(sh), Some(sw)] = factors else {
        return Err(a.err(format!(
            "\"scale_factor\": expected a positive integer or a list of 2, found {}",
            brief(&node.attrs["scale_factor"])
        )));
    };
    let [h, w] = spatial_input(input).ok_or_else(|| {
        a.err(format!(
            "upsample_nearest2d takes a 4-D input [B, C, H, W], but its input is {}",
            batched_shape(input)
        ))
    })?;
    let (Some(oh), Some(ow)) = (h.checked_mul(sh), w.checked_mul(sw)) else {
        return Err(a.err("the output has more elements than fit in memory"));
    };
    Ok(Box::new(UpsampleNearest2d {
        input: input.to_vec(),
        output: vec![input[0], oh, ow],
        factor: [sh, sw],
    }))
}

impl UpsampleNearest2d {
    fn nchw(&self, rows: usize) -> [usize; 4] {
        [rows, self.input[0], self.input[1], self.input[2]]
    }
}

impl Layer for UpsampleNearest2d {
    fn op(&self) -> &'static str {
        "upsample_nearest2d"
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
        resample::upsample_nearest2d_forward(&mut pass.rec, args.inputs[0], self.factor, &y)?;
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(&batched(args.stack * args.batch, &self.input))?;
            resample::upsample_nearest2d_backward(&mut pass.rec, args.grad_out, self.factor, &gx)?;
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        graph_ops::upsample_nearest2d_forward(args.inputs[0], self.nchw(args.batch), self.factor)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0].then(|| {
            graph_ops::upsample_nearest2d_backward(
                args.grad_out,
                self.nchw(args.stack * args.batch),
                self.factor,
            )
        });
        Grads::one_input(input)
    }
}
