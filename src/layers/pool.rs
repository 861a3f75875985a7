//! `torch.nn.MaxPool2d` (`ceil_mode = false`, `dilation = 1`, padding counts as −∞) and
//! `torch.nn.AvgPool2d` (`ceil_mode = false`, `count_include_pad = true`):
//! `[B, C, H, W] → [B, C, OH, OW]`, `OH = ⌊(H + 2p − k)/s⌋ + 1`.

use serde_json::{Value, json};

use crate::error::Result;
use crate::geometry::Pool2dGeometry;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::Attrs;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
    spatial_input,
};
use crate::ops::pool;
use crate::reference::ops;

/// A 2-D pooling layer.
#[derive(Debug)]
pub struct Pool2d {
    max: bool,
    /// The geometry of one example (`batch` 1).
    geometry: Pool2dGeometry,
    output: Vec<usize>,
}

/// Builds a max_pool2d layer.
pub fn build_max(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, true)
}

/// Builds an avg_pool2d layer.
pub fn build_avg(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    build(node, inputs, false)
}

fn build(node: &Node, inputs: &[&[usize]], max: bool) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let options: &[&str] = if max {
        &["dilation", "ceil_mode", "return_indices"]
    } else {
        &["ceil_mode", "count_include_pad", "divisor_override"]
    };
    let mut allowed = vec!["kernel_size", "stride", "padding"];
    allowed.extend_from_slice(options);
    let a = Attrs::new(node, &allowed)?;
    a.only("ceil_mode", json!(false))?;
    if max {
        if a.pair("dilation")?.is_some_and(|d| d != [1, 1]) {
            return Err(a.err("dilation other than 1 is unsupported for max_pool2d"));
        }
        a.only("return_indices", json!(false))?;
    } else {
        a.only("count_include_pad", json!(true))?;
        a.only("divisor_override", Value::Null)?;
    }
    let kernel_size = a.required_pair("kernel_size")?;
    // PyTorch's `stride=None` means stride = kernel_size.
    let stride = a.pair("stride")?.unwrap_or(kernel_size);
    let padding = a.pair("padding")?.unwrap_or([0, 0]);
    let [h, w] = spatial_input(input).ok_or_else(|| {
        a.err(format!(
            "pooling takes a 4-D input [B, C, H, W], but its input is {}",
            batched_shape(input)
        ))
    })?;
    if kernel_size.contains(&0) || stride.contains(&0) {
        return Err(a.err(format!(
            "kernel_size and stride must be positive, found {kernel_size:?} and {stride:?}"
        )));
    }
    // Checked: padding ≤ kernel/2, so 2p + H cannot overflow unless H is huge.
    if (0..2).any(|x| padding[x] > kernel_size[x] / 2) {
        return Err(a.err(format!(
            "padding must be at most half the kernel size (as PyTorch requires), found \
             padding {padding:?} for kernel_size {kernel_size:?}"
        )));
    }
    let mut out = [0; 2];
    for axis in 0..2 {
        let padded = [h, w][axis].checked_add(2 * padding[axis]);
        match padded {
            Some(p) if p >= kernel_size[axis] => {
                out[axis] = (p - kernel_size[axis]) / stride[axis] + 1;
            }
            _ => {
                return Err(a.err(format!(
                    "output size would be ≤ 0: input [H, W] = [{h}, {w}], kernel_size \
                     {kernel_size:?}, stride {stride:?}, padding {padding:?}"
                )));
            }
        }
    }
    Ok(Box::new(Pool2d {
        max,
        geometry: Pool2dGeometry {
            batch: 1,
            channels: input[0],
            in_size: [h, w],
            kernel_size,
            stride,
            padding,
        },
        output: vec![input[0], out[0], out[1]],
    }))
}

impl Pool2d {
    fn geometry(&self, batch: usize) -> Pool2dGeometry {
        Pool2dGeometry {
            batch,
            ..self.geometry
        }
    }
}

impl Layer for Pool2d {
    fn op(&self) -> &'static str {
        if self.max { "max_pool2d" } else { "avg_pool2d" }
    }

    fn saved(&self) -> Saved {
        if self.max {
            Saved::INPUTS
        } else {
            Saved::NOTHING
        }
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let out_shape = batched(args.batch, &self.output);
        let y = pass.zeros(&out_shape)?;
        let geo = self.geometry(args.batch);
        if self.max {
            let argmax = pass.zeros(&out_shape)?;
            pool::max_pool2d_forward(&mut pass.rec, &geo, args.inputs[0], &y, &argmax)?;
            pass.keep(argmax);
        } else {
            pool::avg_pool2d_forward(&mut pass.rec, &geo, args.inputs[0], &y)?;
        }
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        if !args.input_grads[0] {
            return Ok(Grads {
                inputs: vec![None],
                params: None,
            });
        }
        let rows = args.stack * args.batch;
        let geo = self.geometry(rows);
        let gx = pass.zeros(&batched(
            rows,
            &[geo.channels, geo.in_size[0], geo.in_size[1]],
        ))?;
        if self.max {
            // The argmax of the repeated input is the repeated argmax.
            let x = pass.repeat(args.inputs[0], args.stack)?;
            let pooled = pass.zeros(args.grad_out.shape())?;
            let argmax = pass.zeros(args.grad_out.shape())?;
            pool::max_pool2d_forward(&mut pass.rec, &geo, &x, &pooled, &argmax)?;
            pool::max_pool2d_backward(&mut pass.rec, &geo, args.grad_out, &argmax, &gx)?;
            pass.keep([x, pooled, argmax]);
        } else {
            pool::avg_pool2d_backward(&mut pass.rec, &geo, args.grad_out, &gx)?;
        }
        Ok(Grads {
            inputs: vec![Some(gx)],
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let geo = self.geometry(args.batch);
        if self.max {
            ops::max_pool2d_forward(args.inputs[0], &geo).0
        } else {
            ops::avg_pool2d_forward(args.inputs[0], &geo)
        }
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let geo = self.geometry(args.stack * args.batch);
        let input = args.input_grads[0].then(|| {
            if self.max {
                let x = args.inputs[0].repeat(args.stack);
                let (_, argmax) = ops::max_pool2d_forward(&x, &geo);
                ops::max_pool2d_backward(args.grad_out, &argmax, &geo)
            } else {
                ops::avg_pool2d_backward(args.grad_out, &geo)
            }
        });
        Grads::one_input(input)
    }
}
