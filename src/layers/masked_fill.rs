//! `Tensor.masked_fill(mask, value)` with a constant boolean mask (e.g. causal
//! attention's, constant-folded from `torch.ones(T, T).tril()`): attributes
//! `mask_shape` (broadcasting numpy-style against the trailing dims of the input, the
//! batch axis included), `mask` (flat row-major 0/1, 1 = fill) and `value` (a number,
//! or `"-inf"`/`"inf"`). Backward zeroes the gradient where filled.
//!
//! A constant mask is stored as its *period*: the mask broadcast to the trailing dims
//! of the input from the first dim it varies over, so element `i` of the flat batch
//! (and of a stack of gradients) uses flag `i mod period`. The scaled dot-product
//! attention layer reads its `attn_mask` the same way ([`ConstMask`]).

use serde_json::Value;

use crate::error::Result;
use crate::gpu::GpuTensor;
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape, one_input,
};
use crate::ops::masked_fill;
use crate::reference::attention;

/// A constant boolean mask over a per-example shape, as one period of flags over the
/// flat elements (see the module docs). Its length is a multiple of the last dim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConstMask {
    pub period: Vec<bool>,
}

impl ConstMask {
    /// Reads the mask `values_key` of shape `shape_key` and broadcasts it against
    /// `[B, *target]`: at most as many dims as that, each 1 or equal to the target's dim
    /// it aligns with (from the right), 1 on the batch axis; 0/1 (or boolean) values,
    /// as many as the shape holds.
    pub fn read(
        a: &Attrs,
        node: &Node,
        shape_key: &str,
        values_key: &str,
        target: &[usize],
    ) -> Result<Self> {
        let shape: Vec<usize> = match node.attrs.get(shape_key) {
            Some(Value::Array(dims)) => dims
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    a.err(format!(
                        "\"{shape_key}\": expected a list of non-negative integers, found {}",
                        brief(&node.attrs[shape_key])
                    ))
                })?,
            Some(v) => {
                return Err(a.err(format!(
                    "\"{shape_key}\": expected a list of non-negative integers, found {}",
                    brief(v)
                )));
            }
            None => return Err(a.err(format!("missing attribute \"{shape_key}\""))),
        };
        let flags: Vec<bool> = match node.attrs.get(values_key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    v if v.as_u64() == Some(0) => Some(false),
                    v if v.as_u64() == Some(1) => Some(true),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    a.err(format!("\"{values_key}\": expected a flat list of 0 and 1"))
                })?,
            Some(v) => {
                return Err(a.err(format!(
                    "\"{values_key}\": expected a flat list of 0 and 1, found {}",
                    brief(v)
                )));
            }
            None => return Err(a.err(format!("missing attribute \"{values_key}\""))),
        };
        let size: usize = shape.iter().product();
        if flags.len() != size {
            return Err(a.err(format!(
                "\"{values_key}\" has {} values, but \"{shape_key}\" {shape:?} holds {size}",
                flags.len()
            )));
        }
        let misfit = || {
            a.err(format!(
                "\"{shape_key}\" {shape:?} does not broadcast against the input {} (each dim \
                 must be 1 or equal to the input's, from the right, and 1 on the batch axis)",
                batched_shape(target)
            ))
        };
        let d = target.len();
        if shape.len() > d + 1 || (shape.len() == d + 1 && shape[0] != 1) {
            return Err(misfit());
        }
        // aligned[i]: the mask dim over target dim d − 1 − i (1 beyond the mask's dims).
        let aligned = |i: usize| {
            if i < shape.len() {
                shape[shape.len() - 1 - i]
            } else {
                1
            }
        };
        if (0..d).any(|i| aligned(i) != 1 && aligned(i) != target[d - 1 - i]) {
            return Err(misfit());
        }
        // The period spans the trailing dims from the outermost one the mask varies
        // over (at least the last dim).
        let span = (0..d)
            .rev()
            .find(|&i| aligned(i) != 1)
            .map_or(1, |i| i + 1)
            .min(d);
        let dims = &target[d - span..];
        let len: usize = dims.iter().product();
        let mut period = Vec::with_capacity(len);
        for flat in 0..len {
            // The mask element of period element `flat` (row-major over `dims`).
            let (mut rest, mut index, mut stride) = (flat, 0, 1);
            for i in 0..span {
                let (dim, m) = (dims[span - 1 - i], aligned(i));
                if m != 1 {
                    index += (rest % dim) * stride;
                }
                rest /= dim;
                stride *= m;
            }
            period.push(flags[index]);
        }
        Ok(Self { period })
    }

    /// The period as u32 words (1 for true) on the GPU.
    pub fn upload(&self, pass: &Pass) -> Result<GpuTensor> {
        let words: Vec<u32> = self.period.iter().map(|&f| u32::from(f)).collect();
        pass.ctx().upload_u32(&words, &[words.len()])
    }
}

/// A masked fill with a constant mask.
#[derive(Debug)]
pub struct MaskedFill {
    shape: Vec<usize>,
    /// True where filled.
    mask: ConstMask,
    value: f64,
}

/// Builds a masked_fill from `mask_shape`, `mask` and `value`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let input = one_input(node, inputs)?;
    let a = Attrs::new(node, &["mask_shape", "mask", "value"])?;
    if input.is_empty() || input.contains(&0) {
        return Err(a.err(format!(
            "masked_fill needs a non-empty input with at least one dim per example, found {}",
            batched_shape(input)
        )));
    }
    let mask = ConstMask::read(&a, node, "mask_shape", "mask", input)?;
    let value = match node.attrs.get("value") {
        Some(Value::String(s)) if s == "-inf" => f64::NEG_INFINITY,
        Some(Value::String(s)) if s == "inf" => f64::INFINITY,
        Some(v) if v.is_number() => {
            let x = v.as_f64().unwrap_or(f64::NAN);
            if !x.is_finite() || (x as f32).is_infinite() {
                return Err(a.err(format!(
                    "\"value\": {} cannot be converted to float32 without overflow (use \
                     \"-inf\" or \"inf\" for infinities)",
                    brief(v)
                )));
            }
            x
        }
        Some(v) => {
            return Err(a.err(format!(
                "\"value\": expected a number, \"-inf\" or \"inf\", found {}",
                brief(v)
            )));
        }
        None => return Err(a.err("missing attribute \"value\"")),
    };
    // A row of the last dim filled with -inf entirely has no finite entry: the softmax
    // that follows such a fill is NaN in PyTorch.
    let n = input[input.len() - 1];
    if value == f64::NEG_INFINITY
        && let Some(row) = mask.period.chunks(n).position(|row| row.iter().all(|&f| f))
    {
        return Err(a.err(format!(
            "the mask fills every entry of row {row} of the last dim with -inf (period of \
             the mask over {}): a softmax over it is NaN, as in PyTorch",
            batched_shape(input)
        )));
    }
    Ok(Box::new(MaskedFill {
        shape: input.to_vec(),
        mask,
        value,
    }))
}

impl Layer for MaskedFill {
    fn op(&self) -> &'static str {
        "masked_fill"
    }

    fn saved(&self) -> Saved {
        Saved::NOTHING
    }

    fn output_shape(&self) -> &[usize] {
        &self.shape
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.shape))?;
        let mask = self.mask.upload(pass)?;
        masked_fill::masked_fill_forward(
            &mut pass.rec,
            args.inputs[0],
            &mask,
            self.value as f32,
            &y,
        )?;
        pass.keep(mask);
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let input = if args.input_grads[0] {
            let gx = pass.zeros(args.grad_out.shape())?;
            let mask = self.mask.upload(pass)?;
            masked_fill::masked_fill_backward(&mut pass.rec, args.grad_out, &mask, &gx)?;
            pass.keep(mask);
            Some(gx)
        } else {
            None
        };
        Ok(Grads::one_input(input))
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        attention::masked_fill_forward(args.inputs[0], &self.mask.period, self.value)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let input = args.input_grads[0]
            .then(|| attention::masked_fill_backward(args.grad_out, &self.mask.period));
        Grads::one_input(input)
    }
}
