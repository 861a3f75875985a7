//! `F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, scale)` (op
//! `scaled_dot_product_attention`): q `[*, L, E]`, k `[*, S, E]`, v `[*, S, Ev]` with
//! equal leading dims (heads among them) → `[*, L, Ev]`, `softmax(scale·q kᵀ)·v` with
//! `scale` null meaning `1/√E`. `is_causal` keeps key `j ≤` query `i` (PyTorch's
//! top-left `tril(ones(L, S))`); `attn_mask_shape` + `attn_mask` is a constant boolean
//! mask (1 = attend) broadcast over the leading dims; the two together are refused, as
//! PyTorch refuses them. A query row with every key masked is refused at build time
//! (PyTorch gives NaN there).
//!
//! On the GPU the `batch·heads·L·S` attention matrices are never held at once: forward
//! and backward run in chunks of problems within a workspace of at most 64 MiB or a
//! sixteenth of the memory budget ([`crate::ops::attention`]); backward recomputes the
//! probabilities chunk by chunk.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::Node;
use crate::layers::attrs::{Attrs, brief};
use crate::layers::masked_fill::ConstMask;
use crate::layers::{BackwardArgs, ForwardArgs, Grads, Layer, Pass, Saved, batched, batched_shape};
use crate::ops::attention::{Attention as Sizes, AttentionWorkspace, workspace_bytes_per_problem};
use crate::reference::attention::{self, AttentionDims};

/// Workspace an attention layer may use for its chunk of attention matrices (less when
/// the context's memory budget is small, see [`workspace_limit`]).
const ATTENTION_WORKSPACE_BYTES: u64 = 64 << 20;

/// Bytes of attention matrices one layer may hold during a pass: 64 MiB, or a
/// sixteenth of the context's memory budget when that is less.
pub(crate) fn workspace_limit(ctx: &GpuContext) -> u64 {
    ATTENTION_WORKSPACE_BYTES.min(ctx.memory_budget() / 16)
}

/// A scaled dot-product attention.
#[derive(Debug)]
pub struct ScaledDotProductAttention {
    /// Product of the leading per-example dims.
    lead: usize,
    l: usize,
    s: usize,
    e: usize,
    ev: usize,
    scale: f64,
    /// Which scores are kept (true = attend), as a period over `[*, L, S]`; `None`
    /// attends everywhere.
    keep: Option<ConstMask>,
    output: Vec<usize>,
}

/// Builds an attention from its three inputs and `is_causal` (default false), `scale`
/// (default null) and optionally `attn_mask_shape` with `attn_mask`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let a = Attrs::new(
        node,
        &[
            "is_causal",
            "scale",
            "attn_mask_shape",
            "attn_mask",
            "dropout_p",
            "enable_gqa",
        ],
    )?;
    a.only("dropout_p", serde_json::json!(0.0))?;
    a.only("enable_gqa", serde_json::json!(false))?;
    let [q, k, v] = inputs else {
        return Err(Error::model(
            node.label(),
            format!(
                "scaled_dot_product_attention takes three inputs (q, k, v), found {}",
                inputs.len()
            ),
        ));
    };
    let shapes_err = |why: &str| {
        a.err(format!(
            "scaled_dot_product_attention needs q [B, *, L, E], k [B, *, S, E] and v [B, *, \
             S, Ev] with equal leading dims ({why}), found {}, {} and {}",
            batched_shape(q),
            batched_shape(k),
            batched_shape(v)
        ))
    };
    if [q, k, v].iter().any(|x| x.len() < 2) {
        return Err(shapes_err("each at least 2 dims per example"));
    }
    let lead = &q[..q.len() - 2];
    if &k[..k.len() - 2] != lead || &v[..v.len() - 2] != lead {
        return Err(shapes_err("the leading dims differ"));
    }
    let [l, e] = [q[q.len() - 2], q[q.len() - 1]];
    let [s, e_k] = [k[k.len() - 2], k[k.len() - 1]];
    let [s_v, ev] = [v[v.len() - 2], v[v.len() - 1]];
    if e != e_k {
        return Err(shapes_err("q and k differ in width"));
    }
    if s != s_v {
        return Err(shapes_err("k and v differ in length"));
    }
    if q.contains(&0) || k.contains(&0) || v.contains(&0) {
        return Err(shapes_err("no dim may be 0"));
    }
    let scale = match node.attrs.get("scale") {
        None | Some(serde_json::Value::Null) => 1.0 / (e as f64).sqrt(),
        Some(x) => match x.as_f64() {
            Some(x) if x.is_finite() => x,
            _ => {
                return Err(a.err(format!(
                    "\"scale\": expected a finite number or null, found {}",
                    brief(x)
                )));
            }
        },
    };
    let is_causal = a.bool_or("is_causal", false)?;
    let has_mask =
        node.attrs.contains_key("attn_mask") || node.attrs.contains_key("attn_mask_shape");
    let scores: Vec<usize> = lead.iter().copied().chain([l, s]).collect();
    let keep = match (is_causal, has_mask) {
        (true, true) => {
            return Err(a.err(
                "an explicit attn_mask together with is_causal = true is refused, as PyTorch \
                 refuses it",
            ));
        }
        (true, false) => Some(ConstMask {
            period: (0..l * s).map(|i| i % s <= i / s).collect(),
        }),
        (false, true) => Some(ConstMask::read(
            &a,
            node,
            "attn_mask_shape",
            "attn_mask",
            &scores,
        )?),
        (false, false) => None,
    };
    if let Some(mask) = &keep
        && let Some(row) = mask.period.chunks(s).position(|r| !r.iter().any(|&f| f))
    {
        return Err(a.err(format!(
            "the attention mask masks every key of query {} (row {row} of the mask over the \
             scores {}): PyTorch gives NaN there",
            row % l,
            batched_shape(&scores)
        )));
    }
    let mut output = lead.to_vec();
    output.extend([l, ev]);
    Ok(Box::new(ScaledDotProductAttention {
        lead: lead.iter().product(),
        l,
        s,
        e,
        ev,
        scale,
        keep,
        output,
    }))
}

impl ScaledDotProductAttention {
    fn sizes(&self, batch: usize) -> Sizes {
        Sizes {
            batch: batch * self.lead,
            l: self.l,
            s: self.s,
            e: self.e,
            ev: self.ev,
            scale: self.scale as f32,
        }
    }

    fn dims(&self, batch: usize) -> AttentionDims {
        AttentionDims {
            batch: batch * self.lead,
            l: self.l,
            s: self.s,
            e: self.e,
            ev: self.ev,
        }
    }

    fn keep(&self) -> Option<&[bool]> {
        self.keep.as_ref().map(|m| &m.period[..])
    }

    fn mask(&self, pass: &Pass) -> Result<Option<GpuTensor>> {
        self.keep.as_ref().map(|m| m.upload(pass)).transpose()
    }
}

impl Layer for ScaledDotProductAttention {
    fn op(&self) -> &'static str {
        "scaled_dot_product_attention"
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    /// The chunk of attention matrices: at most [`workspace_limit`], at least one
    /// problem's three `[L, S]` matrices.
    fn workspace_bytes(&self, ctx: &GpuContext) -> u64 {
        workspace_limit(ctx).max(workspace_bytes_per_problem(self.l, self.s))
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let y = pass.zeros(&batched(args.batch, &self.output))?;
        let sizes = self.sizes(args.batch);
        let ws = AttentionWorkspace::new(pass.ctx(), &sizes, workspace_limit(pass.ctx()), false)?;
        let mask = self.mask(pass)?;
        let [q, k, v] = [args.inputs[0], args.inputs[1], args.inputs[2]];
        sizes.forward(&mut pass.rec, &ws, (q, k, v), mask.as_ref(), &y)?;
        pass.keep(ws);
        pass.keep(mask);
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let rows = args.stack * args.batch;
        let mut grads = Vec::with_capacity(3);
        for (x, &needed) in args.inputs.iter().zip(args.input_grads) {
            grads.push(
                needed
                    .then(|| pass.zeros(&batched(rows, &x.shape()[1..])))
                    .transpose()?,
            );
        }
        if grads.iter().any(Option::is_some) {
            let sizes = self.sizes(args.batch);
            let ws =
                AttentionWorkspace::new(pass.ctx(), &sizes, workspace_limit(pass.ctx()), true)?;
            let mask = self.mask(pass)?;
            let [q, k, v] = [args.inputs[0], args.inputs[1], args.inputs[2]];
            sizes.backward(
                &mut pass.rec,
                &ws,
                args.stack,
                (q, k, v),
                mask.as_ref(),
                args.grad_out,
                [grads[0].as_ref(), grads[1].as_ref(), grads[2].as_ref()],
            )?;
            pass.keep(ws);
            pass.keep(mask);
        }
        Ok(Grads {
            inputs: grads,
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let [q, k, v] = [args.inputs[0], args.inputs[1], args.inputs[2]];
        attention::sdpa_forward(q, k, v, self.dims(args.batch), self.scale, self.keep())
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let [q, k, v] = [args.inputs[0], args.inputs[1], args.inputs[2]];
        let grads = attention::sdpa_backward(
            (q, k, v),
            args.grad_out,
            self.dims(args.batch),
            self.scale,
            self.keep(),
        );
        Grads {
            inputs: grads
                .into_iter()
                .zip(args.input_grads)
                .map(|(g, &needed)| needed.then_some(g))
                .collect(),
            params: None,
        }
    }
}
