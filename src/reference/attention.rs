//! The f64 reference of the attention ops: batched `matmul`, `softmax` over the last
//! dimension, `masked_fill` with a constant mask, and `scaled_dot_product_attention`
//! composed from them. Forward functions and input vector–Jacobian products, written
//! plainly (no GPU code).
//!
//! Tensors are flat, row-major `[f64]`. A constant mask is a period of booleans that
//! repeats over the flat elements (a mask over the trailing dims, broadcast over the
//! leading ones). Backward functions take a stack of `V` output gradients as a batch
//! of `V·B` (`V`-major) and the saved forward tensors of `B`, as the GPU passes do.

/// `batch` products `op(A[i])·op(B[i])` of `m × k` by `k × n` matrices: `A[i]` stored
/// `m × k` (`k × m` if `trans_a`), `B[i]` `k × n` (`n × k` if `trans_b`), packed.
#[allow(clippy::too_many_arguments)]
pub fn batched_product(
    a: &[f64],
    b: &[f64],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
) -> Vec<f64> {
    assert_eq!(a.len(), batch * m * k, "batched_product: A");
    assert_eq!(b.len(), batch * k * n, "batched_product: B");
    let mut c = vec![0.0; batch * m * n];
    for i in 0..batch {
        let (ai, bi) = (&a[i * m * k..][..m * k], &b[i * k * n..][..k * n]);
        for r in 0..m {
            for col in 0..n {
                c[(i * m + r) * n + col] = (0..k)
                    .map(|t| {
                        let x = if trans_a {
                            ai[t * m + r]
                        } else {
                            ai[r * k + t]
                        };
                        let y = if trans_b {
                            bi[col * k + t]
                        } else {
                            bi[t * n + col]
                        };
                        x * y
                    })
                    .sum();
            }
        }
    }
    c
}

/// `C[i] = A[i]·B[i]` for `a` `[batch, m, k]`, `b` `[batch, k, n]`.
pub fn matmul_forward(
    a: &[f64],
    b: &[f64],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    batched_product(a, b, batch, m, k, n, false, false)
}

/// The input gradients of `matmul` for `grad_out` `[V·batch, m, n]`: `(G·Bᵀ, Aᵀ·G)`,
/// `[V·batch, m, k]` and `[V·batch, k, n]`.
pub fn matmul_backward(
    a: &[f64],
    b: &[f64],
    grad_out: &[f64],
    batch: usize,
    [m, k, n]: [usize; 3],
) -> (Vec<f64>, Vec<f64>) {
    let stack = grad_out.len() / (batch * m * n).max(1);
    let (a, b) = (a.repeat(stack), b.repeat(stack));
    let rows = stack * batch;
    (
        batched_product(grad_out, &b, rows, m, n, k, false, true),
        batched_product(&a, grad_out, rows, k, m, n, true, false),
    )
}

/// Softmax over rows of `n` values, `y_j = exp(x_j − max)/Σ exp(x_k − max)`; with
/// `keep` (a period of flags over the flat elements), entries not kept are left out
/// and get 0. A row with nothing kept (or all `-inf`) gives NaN, as PyTorch.
pub fn softmax_forward(x: &[f64], n: usize, keep: Option<&[bool]>) -> Vec<f64> {
    assert!(n > 0 && x.len().is_multiple_of(n), "softmax: rows of {n}");
    let kept = |e: usize| keep.is_none_or(|k| k[e % k.len()]);
    let mut y = vec![0.0; x.len()];
    for (r, row) in x.chunks(n).enumerate() {
        let base = r * n;
        let m = (0..n)
            .filter(|&j| kept(base + j))
            .map(|j| row[j])
            .fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = (0..n)
            .filter(|&j| kept(base + j))
            .map(|j| (row[j] - m).exp())
            .sum();
        for j in 0..n {
            y[base + j] = if kept(base + j) {
                (row[j] - m).exp() / s
            } else {
                0.0
            };
        }
    }
    y
}

/// Softmax's input gradient `y ⊙ (g − Σ_row g y)` for a stack of gradients `grad_out`
/// of the saved output `y` (rows of `n`).
pub fn softmax_backward(y: &[f64], grad_out: &[f64], n: usize) -> Vec<f64> {
    assert!(
        !y.is_empty() && grad_out.len().is_multiple_of(y.len()),
        "softmax backward: a stack of gradients shaped like y"
    );
    let mut gx = vec![0.0; grad_out.len()];
    for (r, g) in grad_out.chunks(n).enumerate() {
        let yr = &y[(r * n) % y.len()..][..n];
        let s: f64 = g.iter().zip(yr).map(|(g, y)| g * y).sum();
        for j in 0..n {
            gx[r * n + j] = yr[j] * (g[j] - s);
        }
    }
    gx
}

/// `mask ? value : x` for a periodic `mask` (true = fill).
pub fn masked_fill_forward(x: &[f64], mask: &[bool], value: f64) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| if mask[i % mask.len()] { value } else { v })
        .collect()
}

/// `mask ? 0 : grad_out` for a periodic `mask` (true = fill).
pub fn masked_fill_backward(grad_out: &[f64], mask: &[bool]) -> Vec<f64> {
    masked_fill_forward(grad_out, mask, 0.0)
}

/// The sizes of a scaled dot-product attention: `batch` (examples times leading dims)
/// independent problems of `l` queries and `s` keys, query/key width `e`, value width
/// `ev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub l: usize,
    pub s: usize,
    pub e: usize,
    pub ev: usize,
}

/// The attention probabilities `softmax(scale·Q Kᵀ)` `[batch, l, s]` with the
/// periodic `keep` mask (true = attend) over their flat elements.
pub fn attention_probabilities(
    q: &[f64],
    k: &[f64],
    d: AttentionDims,
    scale: f64,
    keep: Option<&[bool]>,
) -> Vec<f64> {
    let scores: Vec<f64> = batched_product(q, k, d.batch, d.l, d.e, d.s, false, true)
        .into_iter()
        .map(|v| v * scale)
        .collect();
    softmax_forward(&scores, d.s, keep)
}

/// `softmax(scale·Q Kᵀ masked)·V` for `q` `[batch, l, e]`, `k` `[batch, s, e]`, `v`
/// `[batch, s, ev]` → `[batch, l, ev]`.
pub fn sdpa_forward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d: AttentionDims,
    scale: f64,
    keep: Option<&[bool]>,
) -> Vec<f64> {
    let p = attention_probabilities(q, k, d, scale, keep);
    batched_product(&p, v, d.batch, d.l, d.s, d.ev, false, false)
}

/// The input gradients `(dQ, dK, dV)` of [`sdpa_forward`] for a stack of gradients
/// `grad_out` `[V·batch, l, ev]`: with `P` the probabilities, `dP = G Vᵀ`,
/// `dS = P ⊙ (dP − Σ_row dP P)`, `dQ = scale·dS K`, `dK = scale·dSᵀ Q`, `dV = Pᵀ G`.
pub fn sdpa_backward(
    (q, k, v): (&[f64], &[f64], &[f64]),
    grad_out: &[f64],
    d: AttentionDims,
    scale: f64,
    keep: Option<&[bool]>,
) -> [Vec<f64>; 3] {
    let stack = grad_out.len() / (d.batch * d.l * d.ev).max(1);
    let (q, k, v) = (q.repeat(stack), k.repeat(stack), v.repeat(stack));
    let d = AttentionDims {
        batch: stack * d.batch,
        ..d
    };
    let p = attention_probabilities(&q, &k, d, scale, keep);
    let dp = batched_product(grad_out, &v, d.batch, d.l, d.ev, d.s, false, true);
    let ds: Vec<f64> = softmax_backward(&p, &dp, d.s)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    [
        batched_product(&ds, &k, d.batch, d.l, d.s, d.e, false, false),
        batched_product(&ds, &q, d.batch, d.s, d.l, d.e, true, false),
        batched_product(&p, grad_out, d.batch, d.s, d.l, d.ev, true, false),
    ]
}
