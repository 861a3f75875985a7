//! PyTorch's `nn.MultiheadAttention` (`batch_first=True`, eval mode) as one node (op
//! `multi_head_attention`): query `[L, E]`, key `[S, E]`, value `[S, E]` → `[L, E]`.
//!
//! With `W = in_proj_weight [3E, E]` and `b = in_proj_bias [3E]`:
//! `Q = query·W[0:E]ᵀ + b[0:E]`, `K = key·W[E:2E]ᵀ + b[E:2E]`,
//! `V = value·W[2E:3E]ᵀ + b[2E:3E]`; head `h` of `H` takes columns
//! `h·Dh .. (h+1)·Dh` (`Dh = E/H`), `A_h = softmax(Q_h K_hᵀ/√Dh)·V_h` over the keys the
//! optional constant `attn_mask` keeps (`[L, S]`, 1 = attend, broadcast over the heads);
//! the output is `concat_h(A_h)·out_projᵀ + out_proj.bias`. Self-attention lists the
//! same value three times; the executor sums the three input gradients.
//!
//! Not a curvature layer: curvlinops cannot see it either (`in_proj_weight` is a plain
//! parameter and `out_proj` is applied functionally, so its hooks never run), so its
//! parameters only shape the forward and backward passes.
//!
//! On the GPU: the projections are GEMMs on row ranges of `in_proj_weight`, the heads are
//! gathered to `[B·H, L, Dh]`, and the attention is [`crate::ops::attention`]'s (chunked
//! attention matrices). Backward keeps only the inputs and recomputes the projections.

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::Node;
use crate::layers::attention::workspace_limit;
use crate::layers::attrs::Attrs;
use crate::layers::masked_fill::ConstMask;
use crate::layers::{
    BackwardArgs, ForwardArgs, Grads, Layer, ParamSpec, Pass, Saved, batched, batched_shape,
};
use crate::ops::attention::{Attention as Sizes, AttentionWorkspace, workspace_bytes_per_problem};
use crate::ops::conv::add_bias;
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::reduce;
use crate::ops::shape::Gather;
use crate::reference::attention::{self, AttentionDims};

/// A multi-head attention.
#[derive(Debug)]
pub struct MultiHeadAttention {
    /// `E`, the embedding width.
    e: usize,
    /// `H`, the heads.
    heads: usize,
    /// Queries.
    l: usize,
    /// Keys and values.
    s: usize,
    bias: bool,
    /// Which scores are kept (true = attend), one `[L, S]` period; `None` attends
    /// everywhere.
    keep: Option<ConstMask>,
    output: Vec<usize>,
}

/// Builds a multi-head attention from its three inputs and `embed_dim`, `num_heads`,
/// `bias` (default true) and optionally `attn_mask_shape` with `attn_mask`.
pub fn build(node: &Node, inputs: &[&[usize]]) -> Result<Box<dyn Layer>> {
    let a = Attrs::new(
        node,
        &[
            "embed_dim",
            "num_heads",
            "bias",
            "attn_mask_shape",
            "attn_mask",
        ],
    )?;
    let [q, k, v] = inputs else {
        return Err(Error::model(
            node.label(),
            format!(
                "multi_head_attention takes three inputs (query, key, value), found {}",
                inputs.len()
            ),
        ));
    };
    let (e, heads) = (a.usize("embed_dim")?, a.usize("num_heads")?);
    let bias = a.bool_or("bias", true)?;
    if e == 0 || heads == 0 || e % heads != 0 {
        return Err(a.err(format!(
            "num_heads must be positive and divide embed_dim, found embed_dim {e} and \
             num_heads {heads}"
        )));
    }
    let (&[l, eq], &[s, ek], &[s_v, ev]) = (*q, *k, *v) else {
        return Err(a.err(format!(
            "multi_head_attention needs query [B, L, {e}], key [B, S, {e}] and value [B, S, \
             {e}] (batch first), found {}, {} and {}",
            batched_shape(q),
            batched_shape(k),
            batched_shape(v)
        )));
    };
    if [eq, ek, ev] != [e; 3] || s != s_v || l == 0 || s == 0 {
        return Err(a.err(format!(
            "multi_head_attention needs query [B, L, {e}], key [B, S, {e}] and value [B, S, \
             {e}] with L, S > 0 (embed_dim {e}), found {}, {} and {}",
            batched_shape(q),
            batched_shape(k),
            batched_shape(v)
        )));
    }
    let has_mask =
        node.attrs.contains_key("attn_mask") || node.attrs.contains_key("attn_mask_shape");
    let keep = has_mask
        .then(|| ConstMask::read(&a, node, "attn_mask_shape", "attn_mask", &[l, s]))
        .transpose()?;
    if let Some(mask) = &keep
        && let Some(row) = mask.period.chunks(s).position(|r| !r.iter().any(|&f| f))
    {
        return Err(a.err(format!(
            "the attention mask masks every key of query {} (over the scores [{l}, {s}]): \
             PyTorch gives NaN there",
            row % l
        )));
    }
    Ok(Box::new(MultiHeadAttention {
        e,
        heads,
        l,
        s,
        bias,
        keep,
        output: vec![l, e],
    }))
}

/// Which projection: rows `which·E .. (which+1)·E` of `in_proj_weight`.
#[derive(Clone, Copy)]
enum Projection {
    Query = 0,
    Key = 1,
    Value = 2,
}

impl MultiHeadAttention {
    fn dh(&self) -> usize {
        self.e / self.heads
    }

    /// Tokens of input `which` (L for the query, S for key and value).
    fn tokens(&self, which: Projection) -> usize {
        match which {
            Projection::Query => self.l,
            _ => self.s,
        }
    }

    fn sizes(&self, batch: usize) -> Sizes {
        Sizes {
            batch: batch * self.heads,
            l: self.l,
            s: self.s,
            e: self.dh(),
            ev: self.dh(),
            scale: (1.0 / (self.dh() as f64).sqrt()) as f32,
        }
    }

    fn dims(&self, batch: usize) -> AttentionDims {
        AttentionDims {
            batch: batch * self.heads,
            l: self.l,
            s: self.s,
            e: self.dh(),
            ev: self.dh(),
        }
    }

    fn keep(&self) -> Option<&[bool]> {
        self.keep.as_ref().map(|m| &m.period[..])
    }

    /// `[rows, T, H·Dh]` → `[rows·H, T, Dh]` (`split`) or back.
    fn heads_gather(&self, rows: usize, tokens: usize, split: bool) -> Gather {
        let (shape, perm) = if split {
            ([tokens, self.heads, self.dh()], [1, 0, 2])
        } else {
            ([self.heads, tokens, self.dh()], [1, 0, 2])
        };
        Gather::permute_examples(rows, &shape, &perm)
    }

    /// Records input `which`'s projection `x·W_whichᵀ + b_which` (`x [B, T, E]`) split
    /// into heads: `[B·H, T, Dh]`.
    fn project(
        &self,
        pass: &mut Pass,
        batch: usize,
        x: &GpuTensor,
        params: &[GpuTensor],
        which: Projection,
    ) -> Result<GpuTensor> {
        let (e, tokens) = (self.e, self.tokens(which));
        let rows = batch * tokens;
        let y = pass.zeros(&[rows, e])?;
        let mut g = Gemm::new(rows, e, e, false, true);
        g.offset_b = which as usize * e * e;
        gemm(&mut pass.rec, &g, x, &params[0], &y)?;
        if self.bias {
            let b = pass.zeros(&[e])?;
            reduce::copy(&mut pass.rec, &params[1], which as usize * e, &b, 0, e)?;
            add_bias(&mut pass.rec, e, 1, &b, &y)?;
            pass.keep(b);
        }
        let heads = self.heads_gather(batch, tokens, true);
        let out = pass.gather(&heads, &y, &[batch * self.heads, tokens, self.dh()])?;
        pass.keep(y);
        Ok(out)
    }

    /// `out_proj.weight`'s index in the parameters.
    fn out_weight(&self) -> usize {
        if self.bias { 2 } else { 1 }
    }

    fn mask(&self, pass: &Pass) -> Result<Option<GpuTensor>> {
        self.keep.as_ref().map(|m| m.upload(pass)).transpose()
    }
}

impl Layer for MultiHeadAttention {
    fn op(&self) -> &'static str {
        "multi_head_attention"
    }

    fn output_shape(&self) -> &[usize] {
        &self.output
    }

    fn params(&self) -> Vec<ParamSpec> {
        let e = self.e;
        let mut specs = vec![ParamSpec {
            suffix: "in_proj_weight",
            shape: vec![3 * e, e],
        }];
        if self.bias {
            specs.push(ParamSpec {
                suffix: "in_proj_bias",
                shape: vec![3 * e],
            });
        }
        specs.push(ParamSpec {
            suffix: "out_proj.weight",
            shape: vec![e, e],
        });
        if self.bias {
            specs.push(ParamSpec {
                suffix: "out_proj.bias",
                shape: vec![e],
            });
        }
        specs
    }

    fn saved(&self) -> Saved {
        Saved::INPUTS
    }

    /// The chunk of attention matrices, as a scaled dot-product attention's.
    fn workspace_bytes(&self, ctx: &GpuContext) -> u64 {
        workspace_limit(ctx).max(workspace_bytes_per_problem(self.l, self.s))
    }

    /// Per example, backward holds the projections of the three inputs twice (rows
    /// and heads), the gathered attention output and its gradient's copies.
    fn scratch_elements(&self) -> usize {
        self.e * (4 * self.l + 6 * self.s)
    }

    fn forward(
        &self,
        pass: &mut Pass,
        args: &ForwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<GpuTensor> {
        let (batch, e) = (args.batch, self.e);
        let [q, k, v] = [Projection::Query, Projection::Key, Projection::Value].map(|which| {
            self.project(pass, batch, args.inputs[which as usize], args.params, which)
        });
        let (q, k, v) = (q?, k?, v?);
        let sizes = self.sizes(batch);
        let ws = AttentionWorkspace::new(pass.ctx(), &sizes, workspace_limit(pass.ctx()), false)?;
        let mask = self.mask(pass)?;
        let heads_out = pass.zeros(&[batch * self.heads, self.l, self.dh()])?;
        sizes.forward(&mut pass.rec, &ws, (&q, &k, &v), mask.as_ref(), &heads_out)?;
        let merge = self.heads_gather(batch, self.l, false);
        let merged = pass.gather(&merge, &heads_out, &[batch * self.l, e])?;
        let y = pass.zeros(&batched(batch, &self.output))?;
        let out_w = &args.params[self.out_weight()];
        gemm(
            &mut pass.rec,
            &Gemm::new(batch * self.l, e, e, false, true),
            &merged,
            out_w,
            &y,
        )?;
        if self.bias {
            add_bias(&mut pass.rec, e, 1, &args.params[3], &y)?;
        }
        pass.keep((q, k, v, ws, mask, heads_out, merged));
        Ok(y)
    }

    fn backward(
        &self,
        pass: &mut Pass,
        args: &BackwardArgs<GpuTensor, GpuTensor>,
    ) -> Result<Grads<GpuTensor>> {
        let (batch, e) = (args.batch, self.e);
        let rows = args.stack * batch;
        let which = [Projection::Query, Projection::Key, Projection::Value];
        if !args.input_grads.iter().any(|&g| g) {
            return Ok(Grads {
                inputs: vec![None, None, None],
                params: None,
            });
        }
        // The gradient of the merged heads, split into heads: [V·B·H, L, Dh].
        let merged_grad = pass.zeros(&[rows * self.l, e])?;
        gemm(
            &mut pass.rec,
            &Gemm::new(rows * self.l, e, e, false, false),
            args.grad_out,
            &args.params[self.out_weight()],
            &merged_grad,
        )?;
        let split = self.heads_gather(rows, self.l, true);
        let heads_grad = pass.gather(
            &split,
            &merged_grad,
            &[rows * self.heads, self.l, self.dh()],
        )?;
        pass.keep(merged_grad);
        let [q, k, v] =
            which.map(|w| self.project(pass, batch, args.inputs[w as usize], args.params, w));
        let (q, k, v) = (q?, k?, v?);
        let head_grads: Vec<Option<GpuTensor>> = which
            .iter()
            .map(|&w| {
                args.input_grads[w as usize]
                    .then(|| pass.zeros(&[rows * self.heads, self.tokens(w), self.dh()]))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let sizes = self.sizes(batch);
        let ws = AttentionWorkspace::new(pass.ctx(), &sizes, workspace_limit(pass.ctx()), true)?;
        let mask = self.mask(pass)?;
        sizes.backward(
            &mut pass.rec,
            &ws,
            args.stack,
            (&q, &k, &v),
            mask.as_ref(),
            &heads_grad,
            [
                head_grads[0].as_ref(),
                head_grads[1].as_ref(),
                head_grads[2].as_ref(),
            ],
        )?;
        pass.keep((q, k, v, ws, mask, heads_grad));
        let mut inputs = Vec::with_capacity(3);
        for (w, head_grad) in which.into_iter().zip(head_grads) {
            let Some(head_grad) = head_grad else {
                inputs.push(None);
                continue;
            };
            // Merge the heads, then through the projection: dx = dY·W_which.
            let tokens = self.tokens(w);
            let merge = self.heads_gather(rows, tokens, false);
            let projected = pass.gather(&merge, &head_grad, &[rows * tokens, e])?;
            let dx = pass.zeros(&batched(rows, &[tokens, e]))?;
            let mut g = Gemm::new(rows * tokens, e, e, false, false);
            g.offset_b = w as usize * e * e;
            gemm(&mut pass.rec, &g, &projected, &args.params[0], &dx)?;
            pass.keep((head_grad, projected));
            inputs.push(Some(dx));
        }
        Ok(Grads {
            inputs,
            params: None,
        })
    }

    fn reference_forward(&self, args: &ForwardArgs<[f64], Vec<f64>>) -> Vec<f64> {
        let batch = args.batch;
        let [q, k, v] = [Projection::Query, Projection::Key, Projection::Value]
            .map(|w| self.reference_project(batch, args.inputs[w as usize], args.params, w));
        let heads_out = attention::sdpa_forward(
            &q,
            &k,
            &v,
            self.dims(batch),
            1.0 / (self.dh() as f64).sqrt(),
            self.keep(),
        );
        let merged = self.reference_heads(&heads_out, batch, self.l, false);
        let (w_o, b_o) = (
            &args.params[self.out_weight()],
            self.bias.then(|| &args.params[3][..]),
        );
        reference_linear(&merged, w_o, 0, b_o, self.e)
    }

    fn reference_backward(&self, args: &BackwardArgs<[f64], Vec<f64>>) -> Grads<Vec<f64>> {
        let (batch, e) = (args.batch, self.e);
        let rows = args.stack * batch;
        let which = [Projection::Query, Projection::Key, Projection::Value];
        // dMerged = dY·W_o, split into heads.
        let merged_grad = reference_grad_in(args.grad_out, &args.params[self.out_weight()], 0, e);
        let heads_grad = self.reference_heads(&merged_grad, rows, self.l, true);
        let [q, k, v] =
            which.map(|w| self.reference_project(batch, args.inputs[w as usize], args.params, w));
        let grads = attention::sdpa_backward(
            (&q, &k, &v),
            &heads_grad,
            self.dims(batch),
            1.0 / (self.dh() as f64).sqrt(),
            self.keep(),
        );
        let inputs = which
            .into_iter()
            .zip(grads)
            .map(|(w, g)| {
                args.input_grads[w as usize].then(|| {
                    let merged = self.reference_heads(&g, rows, self.tokens(w), false);
                    reference_grad_in(&merged, &args.params[0], w as usize * e * e, e)
                })
            })
            .collect();
        Grads {
            inputs,
            params: None,
        }
    }
}

impl MultiHeadAttention {
    /// The f64 [`Self::project`]: `[B·H, T, Dh]`.
    fn reference_project(
        &self,
        batch: usize,
        x: &[f64],
        params: &[Vec<f64>],
        which: Projection,
    ) -> Vec<f64> {
        let e = self.e;
        let w = which as usize;
        let bias = self.bias.then(|| &params[1][w * e..(w + 1) * e]);
        let y = reference_linear(x, &params[0], w * e * e, bias, e);
        self.reference_heads(&y, batch, self.tokens(which), true)
    }

    /// `[rows, T, H, Dh]` ↔ `[rows, H, T, Dh]` (`split`: to heads).
    fn reference_heads(&self, x: &[f64], rows: usize, tokens: usize, split: bool) -> Vec<f64> {
        let (h, dh) = (self.heads, self.dh());
        let mut out = vec![0.0; x.len()];
        for r in 0..rows {
            for t in 0..tokens {
                for head in 0..h {
                    for d in 0..dh {
                        let by_token = ((r * tokens + t) * h + head) * dh + d;
                        let by_head = ((r * h + head) * tokens + t) * dh + d;
                        if split {
                            out[by_head] = x[by_token];
                        } else {
                            out[by_token] = x[by_head];
                        }
                    }
                }
            }
        }
        out
    }
}

/// `x·Wᵀ + b` for `x [rows, E]` and the `E × E` block of `w` starting at element
/// `offset` (f64).
fn reference_linear(
    x: &[f64],
    w: &[f64],
    offset: usize,
    bias: Option<&[f64]>,
    e: usize,
) -> Vec<f64> {
    let rows = x.len() / e;
    let mut y = vec![0.0; rows * e];
    for r in 0..rows {
        for o in 0..e {
            let row = &w[offset + o * e..offset + (o + 1) * e];
            let dot: f64 = x[r * e..(r + 1) * e]
                .iter()
                .zip(row)
                .map(|(a, b)| a * b)
                .sum();
            y[r * e + o] = dot + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// `dY·W` for `dY [rows, E]` and the `E × E` block of `w` at `offset` (f64).
fn reference_grad_in(dy: &[f64], w: &[f64], offset: usize, e: usize) -> Vec<f64> {
    let rows = dy.len() / e;
    let mut dx = vec![0.0; rows * e];
    for r in 0..rows {
        for o in 0..e {
            let g = dy[r * e + o];
            for i in 0..e {
                dx[r * e + i] += g * w[offset + o * e + i];
            }
        }
    }
    dx
}
