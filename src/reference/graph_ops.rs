//! The f64 reference of the graph ops that only shape the forward and backward pass:
//! BatchNorm in eval mode, LayerNorm, `add`, `cat`, nearest upsampling, adaptive
//! average pooling, GELU and SiLU. Forward functions and input vector–Jacobian
//! products, written plainly (no GPU code).
//!
//! Tensors are flat, row-major `[f64]` with their shapes passed alongside; images are
//! NCHW. Backward functions take a stack of `V` output gradients as a batch of `V·B`
//! examples (`V`-major), as the GPU backward passes do. Functions panic when a slice
//! length does not match the sizes given: the callers validate user input first.

fn check_len(what: &str, got: usize, want: usize) {
    assert_eq!(got, want, "{what}: expected {want} elements, got {got}");
}

/// BatchNorm in eval mode: `y = (x − running_mean)/√(running_var + eps)·weight + bias`
/// per channel, `x` of `shape = [N, C, ...]`, `running_mean`, `running_var` `[C]`,
/// `affine = (weight, bias)` (each `[C]`) or `None` → `y` of the same shape.
pub fn batch_norm_eval_forward(
    x: &[f64],
    shape: &[usize],
    running_mean: &[f64],
    running_var: &[f64],
    affine: Option<(&[f64], &[f64])>,
    eps: f64,
) -> Vec<f64> {
    let channel = channel_of(x.len(), shape);
    check_len("batch_norm running_mean", running_mean.len(), shape[1]);
    check_len("batch_norm running_var", running_var.len(), shape[1]);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = channel(i);
            let normalised = (v - running_mean[c]) / (running_var[c] + eps).sqrt();
            affine.map_or(normalised, |(w, b)| normalised * w[c] + b[c])
        })
        .collect()
}

/// BatchNorm's eval-mode input gradient, `grad_in = grad_out·weight/√(running_var +
/// eps)` per channel: `grad_out` of `shape = [V·B, C, ...]` → the same shape.
pub fn batch_norm_eval_backward(
    grad_out: &[f64],
    shape: &[usize],
    running_var: &[f64],
    weight: Option<&[f64]>,
    eps: f64,
) -> Vec<f64> {
    let channel = channel_of(grad_out.len(), shape);
    check_len("batch_norm running_var", running_var.len(), shape[1]);
    grad_out
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let c = channel(i);
            g * weight.map_or(1.0, |w| w[c]) / (running_var[c] + eps).sqrt()
        })
        .collect()
}

/// The channel of each element of a `[N, C, ...]` tensor of `len` elements.
fn channel_of(len: usize, shape: &[usize]) -> impl Fn(usize) -> usize {
    assert!(
        shape.len() >= 2,
        "batch_norm: shape {shape:?} is not [N, C, ...]"
    );
    check_len("batch_norm input", len, shape.iter().product());
    let (channels, spatial) = (shape[1], shape[2..].iter().product::<usize>());
    move |i| (i / spatial) % channels
}

/// Mean and `1/√(var + eps)` of one row (biased variance, two passes).
fn row_statistics(row: &[f64], eps: f64) -> (f64, f64) {
    let d = row.len() as f64;
    let mean = row.iter().sum::<f64>() / d;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm over the last `d` elements: each row of `x [R, d]` becomes
/// `(x − mean)/√(var + eps)·weight + bias` (biased variance); `affine = (weight, bias)`
/// (each `[d]`) or `None` → `[R, d]`.
pub fn layer_norm_forward(
    x: &[f64],
    d: usize,
    affine: Option<(&[f64], &[f64])>,
    eps: f64,
) -> Vec<f64> {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer_norm: rows of {d}"
    );
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let (mean, rstd) = row_statistics(row, eps);
        y.extend(row.iter().enumerate().map(|(j, &v)| {
            let xhat = (v - mean) * rstd;
            affine.map_or(xhat, |(w, b)| xhat * w[j] + b[j])
        }));
    }
    y
}

/// LayerNorm's input gradient for a stack of output gradients: `x [R, d]` the forward
/// input, `grad_out [V·R, d]` (`V`-major), `weight [d]` or `None` → `[V·R, d]`. With
/// `g = grad_out·weight` and `x̂` the normalised row,
/// `grad_in = (g − mean(g) − x̂·mean(g·x̂))/√(var + eps)`.
pub fn layer_norm_backward(
    x: &[f64],
    d: usize,
    weight: Option<&[f64]>,
    eps: f64,
    grad_out: &[f64],
) -> Vec<f64> {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer_norm: rows of {d}"
    );
    assert!(
        !x.is_empty() && grad_out.len().is_multiple_of(x.len()),
        "layer_norm: grad_out must stack gradients shaped like x"
    );
    let x_rows = x.len() / d;
    let mut grad_in = Vec::with_capacity(grad_out.len());
    for (r, grad_row) in grad_out.chunks(d).enumerate() {
        let row = &x[(r % x_rows) * d..(r % x_rows + 1) * d];
        let (mean, rstd) = row_statistics(row, eps);
        let g: Vec<f64> = grad_row
            .iter()
            .enumerate()
            .map(|(j, &v)| v * weight.map_or(1.0, |w| w[j]))
            .collect();
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let mean_g = g.iter().sum::<f64>() / d as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
        grad_in.extend(
            g.iter()
                .zip(&xhat)
                .map(|(gj, xj)| (gj - mean_g - xj * mean_gx) * rstd),
        );
    }
    grad_in
}

/// `a + b`, elementwise (its backward passes the gradient to both inputs unchanged).
pub fn add_forward(a: &[f64], b: &[f64]) -> Vec<f64> {
    check_len("add b", b.len(), a.len());
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Slabs of `shape` around `axis`: (everything before it, everything after it).
fn around(shape: &[usize], axis: usize) -> (usize, usize) {
    assert!(axis < shape.len(), "axis {axis} of {shape:?}");
    (
        shape[..axis].iter().product(),
        shape[axis + 1..].iter().product(),
    )
}

/// Concatenation along `axis`: `inputs` are `(values, shape)` pairs of the same rank,
/// equal on every axis but `axis` → the concatenation and its shape.
pub fn cat_forward(inputs: &[(&[f64], &[usize])], axis: usize) -> (Vec<f64>, Vec<usize>) {
    let mut shape = inputs[0].1.to_vec();
    shape[axis] = inputs.iter().map(|(_, s)| s[axis]).sum();
    let (outer, after) = around(&shape, axis);
    let mut y = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (x, s) in inputs {
            check_len("cat input", x.len(), s.iter().product());
            let slab = s[axis] * after;
            y.extend_from_slice(&x[o * slab..(o + 1) * slab]);
        }
    }
    check_len("cat output", y.len(), shape.iter().product());
    (y, shape)
}

/// The backward of `cat` along `axis`: `grad_out` of `shape` split into parts of
/// `sizes` along `axis` (a stack of gradients is a larger leading axis).
pub fn cat_backward(
    grad_out: &[f64],
    shape: &[usize],
    axis: usize,
    sizes: &[usize],
) -> Vec<Vec<f64>> {
    check_len("cat grad_out", grad_out.len(), shape.iter().product());
    check_len("cat sizes", sizes.iter().sum(), shape[axis]);
    let (outer, after) = around(shape, axis);
    let mut parts: Vec<Vec<f64>> = sizes.iter().map(|_| Vec::new()).collect();
    let mut rest = grad_out;
    for _ in 0..outer {
        for (part, size) in parts.iter_mut().zip(sizes) {
            let (slab, tail) = rest.split_at(size * after);
            part.extend_from_slice(slab);
            rest = tail;
        }
    }
    parts
}

/// Nearest upsampling by `factor = [SH, SW]`: `x [N, C, H, W]` (`shape`) →
/// `[N, C, H·SH, W·SW]`, `y[.., oh, ow] = x[.., oh/SH, ow/SW]`.
pub fn upsample_nearest2d_forward(x: &[f64], shape: [usize; 4], factor: [usize; 2]) -> Vec<f64> {
    check_len("upsample input", x.len(), shape.iter().product());
    let [n, c, h, w] = shape;
    let (oh, ow) = (h * factor[0], w * factor[1]);
    let mut y = Vec::with_capacity(n * c * oh * ow);
    for plane in x.chunks(h * w) {
        for r in 0..oh {
            y.extend((0..ow).map(|col| plane[(r / factor[0]) * w + col / factor[1]]));
        }
    }
    y
}

/// The backward of nearest upsampling: `grad_out [N, C, H·SH, W·SW]` → `[N, C, H, W]`
/// (`shape` is the input's), each element the sum of its `SH×SW` block.
pub fn upsample_nearest2d_backward(
    grad_out: &[f64],
    shape: [usize; 4],
    factor: [usize; 2],
) -> Vec<f64> {
    let [n, c, h, w] = shape;
    let (oh, ow) = (h * factor[0], w * factor[1]);
    check_len("upsample grad_out", grad_out.len(), n * c * oh * ow);
    let mut grad_in = vec![0.0; n * c * h * w];
    for (p, plane) in grad_out.chunks(oh * ow).enumerate() {
        for r in 0..oh {
            for col in 0..ow {
                grad_in[p * h * w + (r / factor[0]) * w + col / factor[1]] += plane[r * ow + col];
            }
        }
    }
    grad_in
}

/// PyTorch's adaptive pooling window of output `o` of `count` along an axis of `size`:
/// input indices `⌊o·size/count⌋ .. ⌈(o+1)·size/count⌉`.
fn adaptive_window(o: usize, size: usize, count: usize) -> std::ops::Range<usize> {
    o * size / count..((o + 1) * size).div_ceil(count)
}

/// Adaptive average pooling: `x [N, C, H, W]` (`shape`) → `[N, C, OH, OW]`
/// (`out_size = [OH, OW]`), each output the mean of its adaptive window.
pub fn adaptive_avg_pool2d_forward(x: &[f64], shape: [usize; 4], out_size: [usize; 2]) -> Vec<f64> {
    check_len("adaptive_avg_pool2d input", x.len(), shape.iter().product());
    let [_, _, h, w] = shape;
    let [oh, ow] = out_size;
    let mut y = Vec::new();
    for plane in x.chunks(h * w) {
        for r in 0..oh {
            for col in 0..ow {
                let (rows, cols) = (adaptive_window(r, h, oh), adaptive_window(col, w, ow));
                let count = (rows.len() * cols.len()) as f64;
                let sum: f64 = rows
                    .flat_map(|i| cols.clone().map(move |j| plane[i * w + j]))
                    .sum();
                y.push(sum / count);
            }
        }
    }
    y
}

/// The backward of adaptive average pooling: `grad_out [N, C, OH, OW]` → `[N, C, H, W]`
/// (`shape` is the input's), each output's gradient spread evenly over its window.
pub fn adaptive_avg_pool2d_backward(
    grad_out: &[f64],
    shape: [usize; 4],
    out_size: [usize; 2],
) -> Vec<f64> {
    let [n, c, h, w] = shape;
    let [oh, ow] = out_size;
    check_len(
        "adaptive_avg_pool2d grad_out",
        grad_out.len(),
        n * c * oh * ow,
    );
    let mut grad_in = vec![0.0; n * c * h * w];
    for (p, plane) in grad_out.chunks(oh * ow).enumerate() {
        for r in 0..oh {
            for col in 0..ow {
                let (rows, cols) = (adaptive_window(r, h, oh), adaptive_window(col, w, ow));
                let share = plane[r * ow + col] / (rows.len() * cols.len()) as f64;
                for i in rows {
                    for j in cols.clone() {
                        grad_in[p * h * w + i * w + j] += share;
                    }
                }
            }
        }
    }
    grad_in
}

/// `Φ(v)`, the standard normal CDF, accurate in both tails: `erfc(−v/√2)/2`.
fn normal_cdf(v: f64) -> f64 {
    0.5 * libm::erfc(-v * std::f64::consts::FRAC_1_SQRT_2)
}

/// `√(2/π)`, the tanh form's scale.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// The tanh form's `(1 + tanh(u))/2 = σ(2u)` with `u = √(2/π)(v + 0.044715v³)`, and
/// its derivative in `v`, without cancellation in either tail.
fn tanh_cdf(v: f64) -> (f64, f64) {
    let two_u = 2.0 * SQRT_2_OVER_PI * (v + 0.044715 * v.powi(3));
    let e = (-two_u.abs()).exp();
    let s = if two_u >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    // σ′ = e/(1 + e)²; where e underflows the cubic may have overflowed: σ′ is 0.
    let ds = if e == 0.0 {
        0.0
    } else {
        e / (1.0 + e).powi(2) * 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v)
    };
    (s, ds)
}

/// GELU, `x·Φ(x)` elementwise (PyTorch's `approximate="none"`), or its tanh form
/// `x·(1 + tanh(√(2/π)(x + 0.044715x³)))/2` with `tanh_form`.
pub fn gelu_forward(x: &[f64], tanh_form: bool) -> Vec<f64> {
    x.iter()
        .map(|&v| {
            v * if tanh_form {
                tanh_cdf(v).0
            } else {
                normal_cdf(v)
            }
        })
        .collect()
}

/// GELU's input gradient for a stack of output gradients: `x` the forward input,
/// `grad_out` `V` times as long (`V`-major). The exact form's derivative is
/// `Φ(x) + x·φ(x)`.
pub fn gelu_backward(x: &[f64], grad_out: &[f64], tanh_form: bool) -> Vec<f64> {
    stacked_elementwise(x, grad_out, |v| {
        if tanh_form {
            let (s, ds) = tanh_cdf(v);
            s + v * ds
        } else {
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            normal_cdf(v) + v * pdf
        }
    })
}

/// `grad_out[i]·derivative(x[i mod len(x)])`: a stack of gradients through an
/// elementwise function of the saved input `x`.
fn stacked_elementwise(x: &[f64], grad_out: &[f64], derivative: impl Fn(f64) -> f64) -> Vec<f64> {
    assert!(
        !x.is_empty() && grad_out.len().is_multiple_of(x.len()),
        "grad_out must stack gradients shaped like x"
    );
    let d: Vec<f64> = x.iter().map(|&v| derivative(v)).collect();
    grad_out
        .iter()
        .zip(d.iter().cycle())
        .map(|(g, d)| g * d)
        .collect()
}

/// `σ(v) = 1/(1 + e^{−v})` without overflow.
fn logistic(v: f64) -> f64 {
    let e = (-v.abs()).exp();
    if v >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// SiLU, `x·σ(x)` elementwise.
pub fn silu_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v * logistic(v)).collect()
}

/// SiLU's input gradient for a stack of output gradients: `x` the forward input,
/// `grad_out` `V` times as long (`V`-major); the derivative is `σ(x)·(1 + x·(1 − σ(x)))`.
pub fn silu_backward(x: &[f64], grad_out: &[f64]) -> Vec<f64> {
    stacked_elementwise(x, grad_out, |v| {
        let s = logistic(v);
        s * (1.0 + v * (1.0 - s))
    })
}
