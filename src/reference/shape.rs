//! The f64 reference of the shape ops (`transpose`, `permute`, `mean`,
//! `mul_constant`, `div_constant`, `add_parameter`), written plainly with explicit
//! index arithmetic. Tensors are flat, row-major `[f64]` batches `[B, *shape]` of
//! per-example `shape`; `B` follows from the length. Backward functions take a stack of
//! `V` gradients as a batch of `V·B` examples, as the GPU passes do.

/// The row-major coordinates of flat index `i` in `shape`.
fn coords(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        c[k] = i % shape[k];
        i /= shape[k];
    }
    c
}

/// The flat index of coordinates `c` in `shape`.
fn flat(c: &[usize], shape: &[usize]) -> usize {
    c.iter().zip(shape).fold(0, |i, (&c, &d)| i * d + c)
}

/// `[B, *shape]` with `B` from the length of `x`.
fn batched(x: &[f64], shape: &[usize]) -> Vec<usize> {
    let example: usize = shape.iter().product();
    assert!(
        example > 0 && x.len().is_multiple_of(example),
        "{} values are not a batch of {shape:?}",
        x.len()
    );
    let mut s = vec![x.len() / example];
    s.extend(shape);
    s
}

/// The permutation `q` with `q[perm[k]] = k`.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut q = vec![0; perm.len()];
    for (k, &p) in perm.iter().enumerate() {
        q[p] = k;
    }
    q
}

/// `x.permute(0, 1 + perm[0], 1 + perm[1], …)` for `x` `[B, *shape]`: output example
/// dim `k` is input example dim `perm[k]`.
pub fn permute(x: &[f64], shape: &[usize], perm: &[usize]) -> Vec<f64> {
    let in_shape = batched(x, shape);
    let out_shape: Vec<usize> = std::iter::once(in_shape[0])
        .chain(perm.iter().map(|&p| shape[p]))
        .collect();
    (0..x.len())
        .map(|i| {
            let out = coords(i, &out_shape);
            let mut c = vec![out[0]; in_shape.len()];
            for (k, &p) in perm.iter().enumerate() {
                c[p + 1] = out[k + 1];
            }
            x[flat(&c, &in_shape)]
        })
        .collect()
}

/// `x.mean(dims)` for `x` `[B, *shape]` where `reduced[k]` says whether example dim `k`
/// is averaged: `[B, *kept]` (with or without the kept size-1 dims, the same values).
pub fn mean_forward(x: &[f64], shape: &[usize], reduced: &[bool]) -> Vec<f64> {
    let in_shape = batched(x, shape);
    let kept = kept_shape(&in_shape, reduced);
    let count: usize = shape
        .iter()
        .zip(reduced)
        .filter(|(_, r)| **r)
        .map(|(d, _)| d)
        .product();
    let mut y = vec![0.0; kept.iter().product()];
    for (i, &v) in x.iter().enumerate() {
        y[flat(&kept_coords(&coords(i, &in_shape), reduced), &kept)] += v;
    }
    y.iter().map(|s| s / count as f64).collect()
}

/// The mean's input gradient: `grad_out` `[V·B, *kept]` spread over the averaged dims
/// and divided by their size → `[V·B, *shape]`.
pub fn mean_backward(grad_out: &[f64], shape: &[usize], reduced: &[bool]) -> Vec<f64> {
    let kept_example: Vec<usize> = shape
        .iter()
        .zip(reduced)
        .filter(|(_, r)| !**r)
        .map(|(d, _)| *d)
        .collect();
    let kept = batched(grad_out, &kept_example);
    let count: usize = shape.iter().product::<usize>() / kept_example.iter().product::<usize>();
    let in_shape: Vec<usize> = std::iter::once(kept[0])
        .chain(shape.iter().copied())
        .collect();
    (0..in_shape.iter().product())
        .map(|i| grad_out[flat(&kept_coords(&coords(i, &in_shape), reduced), &kept)] / count as f64)
        .collect()
}

/// The shape `[B, *kept]` of a batched shape without its reduced example dims.
fn kept_shape(in_shape: &[usize], reduced: &[bool]) -> Vec<usize> {
    kept_coords(in_shape, reduced)
}

/// Coordinates (or sizes) of a batched index without its reduced example dims.
fn kept_coords(c: &[usize], reduced: &[bool]) -> Vec<usize> {
    std::iter::once(c[0])
        .chain(
            c[1..]
                .iter()
                .zip(reduced)
                .filter(|(_, r)| !**r)
                .map(|(c, _)| *c),
        )
        .collect()
}

/// `x·value` (`mul_constant`) or `x/value` (`div_constant`) elementwise.
pub fn scale(x: &[f64], value: f64, divide: bool) -> Vec<f64> {
    x.iter()
        .map(|&v| if divide { v / value } else { v * value })
        .collect()
}

/// Embedding lookup: `ids` (token ids as exact f64 values, `[B, *shape]`) → the rows
/// of `table` (`[num_embeddings, dim]`), `[B, *shape, dim]`.
pub fn embedding_forward(ids: &[f64], table: &[f64], dim: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| {
            let j = id as usize;
            table[j * dim..(j + 1) * dim].iter().copied()
        })
        .collect()
}

/// The table gradient: `grad_out` `[V·B, *shape, dim]` added into the rows its ids
/// (`[B, *shape]`, repeated over the stack) select → `[num_embeddings, dim]`.
pub fn embedding_table_grad(
    ids: &[f64],
    grad_out: &[f64],
    num_embeddings: usize,
    dim: usize,
) -> Vec<f64> {
    let mut grad = vec![0.0; num_embeddings * dim];
    for (r, g) in grad_out.chunks_exact(dim).enumerate() {
        let j = ids[r % ids.len()] as usize;
        for (acc, v) in grad[j * dim..(j + 1) * dim].iter_mut().zip(g) {
            *acc += v;
        }
    }
    grad
}

/// For each element of a batched `[B, *shape]` tensor, the index of the parameter
/// element (PyTorch shape `param`, broadcast numpy-style from the right) it reads.
fn broadcast_index(i: usize, in_shape: &[usize], param: &[usize]) -> usize {
    let c = coords(i, in_shape);
    let offset = in_shape.len() - param.len();
    let pc: Vec<usize> = param
        .iter()
        .enumerate()
        .map(|(k, &d)| if d == 1 { 0 } else { c[offset + k] })
        .collect();
    flat(&pc, param)
}

/// `x + p` with `p` (PyTorch shape `param`) broadcast against `x` `[B, *shape]`.
pub fn add_parameter_forward(x: &[f64], shape: &[usize], p: &[f64], param: &[usize]) -> Vec<f64> {
    let in_shape = batched(x, shape);
    x.iter()
        .enumerate()
        .map(|(i, &v)| v + p[broadcast_index(i, &in_shape, param)])
        .collect()
}

/// The parameter's gradient: `grad_out` `[V·B, *shape]` summed into the elements of
/// `p` (PyTorch shape `param`) each entry was broadcast from.
pub fn add_parameter_grad(grad_out: &[f64], shape: &[usize], param: &[usize]) -> Vec<f64> {
    let in_shape = batched(grad_out, shape);
    let mut grad = vec![0.0; param.iter().product()];
    for (i, &g) in grad_out.iter().enumerate() {
        grad[broadcast_index(i, &in_shape, param)] += g;
    }
    grad
}

/// `x ⊙ p` for a parameter `p` of PyTorch shape `param` broadcast against `x`
/// (`[rows, *shape]`, any number of rows).
pub fn mul_parameter_forward(x: &[f64], shape: &[usize], p: &[f64], param: &[usize]) -> Vec<f64> {
    let in_shape = batched(x, shape);
    x.iter()
        .enumerate()
        .map(|(i, &v)| v * p[broadcast_index(i, &in_shape, param)])
        .collect()
}
