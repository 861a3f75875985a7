//! Per-layer forward and backward maths in f64, written plainly: the oracle the GPU
//! kernels are tested against and the pieces of the whole-network CPU reference.
//!
//! Every tensor is a flat, row-major, batch-major `[f64]`: linear activations
//! `[B, features]`, images `[B, C, H, W]` (NCHW), linear weights `[out, in]`, conv
//! weights `[Cout, C/groups, KH, KW]` (PyTorch layouts). Functions panic when a slice
//! length does not match the sizes given: the callers validate user input first.

use crate::geometry::{Conv2dGeometry, Pool2dGeometry};
use crate::ops::activation::Pointwise;

fn check_len(what: &str, got: usize, want: usize) {
    assert_eq!(got, want, "{what}: expected {want} elements, got {got}");
}

/// `y = x·Wᵀ + b`: `x [batch, in_features]`, `weight [out_features, in_features]`,
/// `bias [out_features]` → `y [batch, out_features]`.
pub fn linear_forward(
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> Vec<f64> {
    check_len("linear input", x.len(), batch * in_features);
    check_len("linear weight", weight.len(), out_features * in_features);
    if let Some(b) = bias {
        check_len("linear bias", b.len(), out_features);
    }
    let mut y = vec![0.0; batch * out_features];
    for n in 0..batch {
        let xn = &x[n * in_features..(n + 1) * in_features];
        for o in 0..out_features {
            let wo = &weight[o * in_features..(o + 1) * in_features];
            let dot: f64 = xn.iter().zip(wo).map(|(a, b)| a * b).sum();
            y[n * out_features + o] = dot + bias.map_or(0.0, |b| b[o]);
        }
    }
    y
}

/// Input gradient of a linear layer, `G·W`: `grad_out [batch, out_features]`,
/// `weight [out_features, in_features]` → `[batch, in_features]`.
pub fn linear_backward_input(
    grad_out: &[f64],
    weight: &[f64],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> Vec<f64> {
    check_len(
        "linear output gradient",
        grad_out.len(),
        batch * out_features,
    );
    check_len("linear weight", weight.len(), out_features * in_features);
    accumulate_rows(
        grad_out,
        weight,
        batch,
        in_features,
        out_features,
        batch,
        |n, o| (n, o),
    )
}

/// Weight gradient of a linear layer, `Gᵀ·X`: `grad_out [batch, out_features]`,
/// `x [batch, in_features]` → `[out_features, in_features]`.
pub fn linear_backward_weight(
    grad_out: &[f64],
    x: &[f64],
    batch: usize,
    in_features: usize,
    out_features: usize,
) -> Vec<f64> {
    check_len(
        "linear output gradient",
        grad_out.len(),
        batch * out_features,
    );
    check_len("linear input", x.len(), batch * in_features);
    accumulate_rows(
        grad_out,
        x,
        batch,
        in_features,
        out_features,
        out_features,
        |n, o| (o, n),
    )
}

/// The two backward products of a linear layer: `rows` result rows of `in_features`,
/// where for every `(n, o)` in order, with `(to, from) = pair(n, o)`, row `to` gains
/// `grad_out[n, o]·src[from]` (`src` rows of `in_features`).
fn accumulate_rows(
    grad_out: &[f64],
    src: &[f64],
    batch: usize,
    in_features: usize,
    out_features: usize,
    rows: usize,
    pair: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f64> {
    let mut acc = vec![0.0; rows * in_features];
    for n in 0..batch {
        for o in 0..out_features {
            let g = grad_out[n * out_features + o];
            let (to, from) = pair(n, o);
            for i in 0..in_features {
                acc[to * in_features + i] += g * src[from * in_features + i];
            }
        }
    }
    acc
}

/// Bias gradient of a linear layer, the column sums of `grad_out [batch, out_features]`
/// → `[out_features]`.
pub fn linear_backward_bias(grad_out: &[f64], batch: usize, out_features: usize) -> Vec<f64> {
    check_len(
        "linear output gradient",
        grad_out.len(),
        batch * out_features,
    );
    (0..out_features)
        .map(|o| (0..batch).map(|n| grad_out[n * out_features + o]).sum())
        .collect()
}

/// The input coordinate `o·s + k·d − p` a kernel tap reads, or `None` in the padding.
fn tap(
    o: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    size: usize,
) -> Option<usize> {
    (o * stride + k * dilation)
        .checked_sub(pad)
        .filter(|&i| i < size)
}

/// Patches of group `group` (`torch.nn.functional.unfold` order).
///
/// `x [B, C, H, W]` → `[B·S, (C/groups)·KH·KW]` with row `n·S + oh·OW + ow` and column
/// `c·KH·KW + kh·KW + kw` holding `x[n, group·C/groups + c, oh·s + kh·d − p, ow·s + kw·d − p]`
/// (0 in the padding).
pub fn im2col(x: &[f64], geo: &Conv2dGeometry, group: usize) -> Vec<f64> {
    check_len("conv input", x.len(), geo.input_len());
    assert!(group < geo.groups, "group {group} of {}", geo.groups);
    let cg = geo.group_in_channels();
    patches(geo, |n, c, h, w| {
        x[((n * geo.in_channels + group * cg + c) * geo.in_size[0] + h) * geo.in_size[1] + w]
    })
}

/// Patches of the input averaged over channel groups (SPEC §2.2 step 1): like
/// [`im2col`] of `x̂[n, c] = (1/groups) Σ_g x[n, g·C/groups + c]`, `[B·S, (C/groups)·KH·KW]`.
pub fn im2col_group_mean(x: &[f64], geo: &Conv2dGeometry) -> Vec<f64> {
    check_len("conv input", x.len(), geo.input_len());
    let cg = geo.group_in_channels();
    let [h_in, w_in] = geo.in_size;
    patches(geo, |n, c, h, w| {
        let sum: f64 = (0..geo.groups)
            .map(|g| x[((n * geo.in_channels + g * cg + c) * h_in + h) * w_in + w])
            .sum();
        sum / geo.groups as f64
    })
}

/// `[B·S, (C/groups)·KH·KW]` patches of the per-group image `value(n, c, h, w)`.
fn patches(geo: &Conv2dGeometry, value: impl Fn(usize, usize, usize, usize) -> f64) -> Vec<f64> {
    let [oh_n, ow_n] = geo.out_size();
    let [kh_n, kw_n] = geo.kernel_size;
    let cg = geo.group_in_channels();
    let mut out = vec![0.0; geo.batch * oh_n * ow_n * geo.patch_len()];
    let mut i = 0;
    for n in 0..geo.batch {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                for c in 0..cg {
                    for kh in 0..kh_n {
                        for kw in 0..kw_n {
                            let h = tap(
                                oh,
                                kh,
                                geo.stride[0],
                                geo.dilation[0],
                                geo.padding[0],
                                geo.in_size[0],
                            );
                            let w = tap(
                                ow,
                                kw,
                                geo.stride[1],
                                geo.dilation[1],
                                geo.padding[1],
                                geo.in_size[1],
                            );
                            if let (Some(h), Some(w)) = (h, w) {
                                out[i] = value(n, c, h, w);
                            }
                            i += 1;
                        }
                    }
                }
            }
        }
    }
    out
}

/// The adjoint of [`im2col`] for group `group`: `cols [B·S, (C/groups)·KH·KW]` →
/// `[B, C, H, W]`, each input pixel of the group's channels summing the patch entries
/// that read it; the other groups' channels are 0.
pub fn col2im(cols: &[f64], geo: &Conv2dGeometry, group: usize) -> Vec<f64> {
    check_len(
        "patches",
        cols.len(),
        geo.batch * geo.positions() * geo.patch_len(),
    );
    assert!(group < geo.groups, "group {group} of {}", geo.groups);
    let [oh_n, ow_n] = geo.out_size();
    let [kh_n, kw_n] = geo.kernel_size;
    let [h_in, w_in] = geo.in_size;
    let cg = geo.group_in_channels();
    let mut x = vec![0.0; geo.input_len()];
    let mut i = 0;
    for n in 0..geo.batch {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                for c in 0..cg {
                    for kh in 0..kh_n {
                        for kw in 0..kw_n {
                            let h =
                                tap(oh, kh, geo.stride[0], geo.dilation[0], geo.padding[0], h_in);
                            let w =
                                tap(ow, kw, geo.stride[1], geo.dilation[1], geo.padding[1], w_in);
                            if let (Some(h), Some(w)) = (h, w) {
                                x[((n * geo.in_channels + group * cg + c) * h_in + h) * w_in
                                    + w] += cols[i];
                            }
                            i += 1;
                        }
                    }
                }
            }
        }
    }
    x
}

/// Calls `f([n, co, oh, ow], [ci, kh, kw], [h, w])` for every (output element, weight
/// tap) pair of a conv whose tap lies inside the image; `ci` is the absolute input
/// channel (of the group of `co`) and `(h, w)` the input pixel the tap reads.
fn for_each_conv_tap(geo: &Conv2dGeometry, mut f: impl FnMut([usize; 4], [usize; 3], [usize; 2])) {
    let [oh_n, ow_n] = geo.out_size();
    let [kh_n, kw_n] = geo.kernel_size;
    let (cg, og) = (geo.group_in_channels(), geo.group_out_channels());
    for n in 0..geo.batch {
        for co in 0..geo.out_channels {
            let group = co / og;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    for c in 0..cg {
                        for kh in 0..kh_n {
                            let Some(h) = tap(
                                oh,
                                kh,
                                geo.stride[0],
                                geo.dilation[0],
                                geo.padding[0],
                                geo.in_size[0],
                            ) else {
                                continue;
                            };
                            for kw in 0..kw_n {
                                let Some(w) = tap(
                                    ow,
                                    kw,
                                    geo.stride[1],
                                    geo.dilation[1],
                                    geo.padding[1],
                                    geo.in_size[1],
                                ) else {
                                    continue;
                                };
                                f([n, co, oh, ow], [group * cg + c, kh, kw], [h, w]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Index helpers for the three conv tensors.
struct ConvIndex<'a>(&'a Conv2dGeometry);

impl ConvIndex<'_> {
    fn input(&self, n: usize, ci: usize, h: usize, w: usize) -> usize {
        let g = self.0;
        ((n * g.in_channels + ci) * g.in_size[0] + h) * g.in_size[1] + w
    }
    fn output(&self, [n, co, oh, ow]: [usize; 4]) -> usize {
        let g = self.0;
        let [oh_n, ow_n] = g.out_size();
        ((n * g.out_channels + co) * oh_n + oh) * ow_n + ow
    }
    fn weight(&self, co: usize, [ci, kh, kw]: [usize; 3]) -> usize {
        let g = self.0;
        let c = ci % g.group_in_channels();
        ((co * g.group_in_channels() + c) * g.kernel_size[0] + kh) * g.kernel_size[1] + kw
    }
}

/// Conv2d forward: `x [B, C, H, W]`, `weight [Cout, C/groups, KH, KW]`,
/// `bias [Cout]` → `[B, Cout, OH, OW]` (cross-correlation, as PyTorch).
pub fn conv2d_forward(
    x: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    geo: &Conv2dGeometry,
) -> Vec<f64> {
    check_len("conv input", x.len(), geo.input_len());
    check_len("conv weight", weight.len(), geo.weight_len());
    let idx = ConvIndex(geo);
    let mut y = vec![0.0; geo.output_len()];
    if let Some(b) = bias {
        check_len("conv bias", b.len(), geo.out_channels);
        let s = geo.positions();
        for (i, v) in y.iter_mut().enumerate() {
            *v = b[(i / s) % geo.out_channels];
        }
    }
    for_each_conv_tap(geo, |out, [ci, kh, kw], [h, w]| {
        y[idx.output(out)] +=
            weight[idx.weight(out[1], [ci, kh, kw])] * x[idx.input(out[0], ci, h, w)];
    });
    y
}

/// Conv2d input gradient: `grad_out [B, Cout, OH, OW]`, `weight [Cout, C/groups, KH, KW]`
/// → `[B, C, H, W]`.
pub fn conv2d_backward_input(grad_out: &[f64], weight: &[f64], geo: &Conv2dGeometry) -> Vec<f64> {
    check_len("conv output gradient", grad_out.len(), geo.output_len());
    check_len("conv weight", weight.len(), geo.weight_len());
    let idx = ConvIndex(geo);
    let mut dx = vec![0.0; geo.input_len()];
    for_each_conv_tap(geo, |out, [ci, kh, kw], [h, w]| {
        dx[idx.input(out[0], ci, h, w)] +=
            weight[idx.weight(out[1], [ci, kh, kw])] * grad_out[idx.output(out)];
    });
    dx
}

/// Conv2d weight gradient: `grad_out [B, Cout, OH, OW]`, `x [B, C, H, W]` →
/// `[Cout, C/groups, KH, KW]`.
pub fn conv2d_backward_weight(grad_out: &[f64], x: &[f64], geo: &Conv2dGeometry) -> Vec<f64> {
    check_len("conv output gradient", grad_out.len(), geo.output_len());
    check_len("conv input", x.len(), geo.input_len());
    let idx = ConvIndex(geo);
    let mut dw = vec![0.0; geo.weight_len()];
    for_each_conv_tap(geo, |out, [ci, kh, kw], [h, w]| {
        dw[idx.weight(out[1], [ci, kh, kw])] +=
            x[idx.input(out[0], ci, h, w)] * grad_out[idx.output(out)];
    });
    dw
}

/// Conv2d bias gradient: `grad_out [B, Cout, OH, OW]` summed over batch and positions
/// → `[Cout]`.
pub fn conv2d_backward_bias(grad_out: &[f64], geo: &Conv2dGeometry) -> Vec<f64> {
    check_len("conv output gradient", grad_out.len(), geo.output_len());
    let s = geo.positions();
    let mut db = vec![0.0; geo.out_channels];
    for (i, g) in grad_out.iter().enumerate() {
        db[(i / s) % geo.out_channels] += g;
    }
    db
}

/// `max(x, 0)` elementwise.
pub fn relu_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// ReLU backward from the forward input `x`: `grad_out` where `x > 0`, else 0 (the
/// derivative at 0 is 0, as PyTorch).
pub fn relu_backward(x: &[f64], grad_out: &[f64]) -> Vec<f64> {
    check_len("relu gradient", grad_out.len(), x.len());
    x.iter()
        .zip(grad_out)
        .map(|(&v, &g)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

/// `1/(1 + e^{−x})` elementwise.
pub fn sigmoid_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect()
}

/// Sigmoid backward from the forward output `y`: `grad_out·y·(1 − y)`.
pub fn sigmoid_backward(y: &[f64], grad_out: &[f64]) -> Vec<f64> {
    check_len("sigmoid gradient", grad_out.len(), y.len());
    y.iter()
        .zip(grad_out)
        .map(|(&y, &g)| g * y * (1.0 - y))
        .collect()
}

/// `tanh(x)` elementwise.
pub fn tanh_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.tanh()).collect()
}

/// Tanh backward from the forward output `y`: `grad_out·(1 − y²)`.
pub fn tanh_backward(y: &[f64], grad_out: &[f64]) -> Vec<f64> {
    check_len("tanh gradient", grad_out.len(), y.len());
    y.iter()
        .zip(grad_out)
        .map(|(&y, &g)| g * (1.0 - y * y))
        .collect()
}

/// Calls `f(plane, out_index, h, w)` for every (output, in-image window element) pair
/// of a pooling, windows scanned row-major (`kh` then `kw`); `plane = n·C + c`.
fn for_each_pool_tap(geo: &Pool2dGeometry, mut f: impl FnMut(usize, usize, usize, usize)) {
    let [oh_n, ow_n] = geo.out_size();
    let [kh_n, kw_n] = geo.kernel_size;
    for plane in 0..geo.batch * geo.channels {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                let o = (plane * oh_n + oh) * ow_n + ow;
                for kh in 0..kh_n {
                    let Some(h) = tap(oh, kh, geo.stride[0], 1, geo.padding[0], geo.in_size[0])
                    else {
                        continue;
                    };
                    for kw in 0..kw_n {
                        if let Some(w) =
                            tap(ow, kw, geo.stride[1], 1, geo.padding[1], geo.in_size[1])
                        {
                            f(plane, o, h, w);
                        }
                    }
                }
            }
        }
    }
}

/// Max pooling: `x [B, C, H, W]` → (`y [B, C, OH, OW]`, `argmax [B, C, OH, OW]`).
/// Padding counts as −∞. `argmax` is the in-plane index `h·W + w` of the first maximum
/// of the window in row-major order (a later element wins only if strictly greater;
/// NaN is not propagated).
pub fn max_pool2d_forward(x: &[f64], geo: &Pool2dGeometry) -> (Vec<f64>, Vec<usize>) {
    check_len("max_pool2d input", x.len(), geo.input_len());
    let [h_in, w_in] = geo.in_size;
    let mut y = vec![f64::NEG_INFINITY; geo.output_len()];
    let mut argmax = vec![usize::MAX; geo.output_len()];
    for_each_pool_tap(geo, |plane, o, h, w| {
        let v = x[(plane * h_in + h) * w_in + w];
        if argmax[o] == usize::MAX || v > y[o] {
            y[o] = v;
            argmax[o] = h * w_in + w;
        }
    });
    (y, argmax)
}

/// Max pooling backward: each output's gradient goes to its `argmax` element.
/// `grad_out`, `argmax [B, C, OH, OW]` → `[B, C, H, W]`.
pub fn max_pool2d_backward(grad_out: &[f64], argmax: &[usize], geo: &Pool2dGeometry) -> Vec<f64> {
    check_len(
        "max_pool2d output gradient",
        grad_out.len(),
        geo.output_len(),
    );
    check_len("max_pool2d argmax", argmax.len(), geo.output_len());
    let [oh_n, ow_n] = geo.out_size();
    let plane_len = geo.in_size[0] * geo.in_size[1];
    let mut dx = vec![0.0; geo.input_len()];
    for (o, (&g, &a)) in grad_out.iter().zip(argmax).enumerate() {
        dx[(o / (oh_n * ow_n)) * plane_len + a] += g;
    }
    dx
}

/// Average pooling with zero padding counted in the divisor (`count_include_pad =
/// true`, divisor `KH·KW`): `x [B, C, H, W]` → `[B, C, OH, OW]`.
pub fn avg_pool2d_forward(x: &[f64], geo: &Pool2dGeometry) -> Vec<f64> {
    check_len("avg_pool2d input", x.len(), geo.input_len());
    let [h_in, w_in] = geo.in_size;
    let divisor = (geo.kernel_size[0] * geo.kernel_size[1]) as f64;
    let mut y = vec![0.0; geo.output_len()];
    for_each_pool_tap(geo, |plane, o, h, w| {
        y[o] += x[(plane * h_in + h) * w_in + w] / divisor;
    });
    y
}

/// Average pooling backward: `grad_out [B, C, OH, OW]` → `[B, C, H, W]`, each input
/// element receiving `grad/(KH·KW)` from every window that contains it.
pub fn avg_pool2d_backward(grad_out: &[f64], geo: &Pool2dGeometry) -> Vec<f64> {
    check_len(
        "avg_pool2d output gradient",
        grad_out.len(),
        geo.output_len(),
    );
    let [h_in, w_in] = geo.in_size;
    let divisor = (geo.kernel_size[0] * geo.kernel_size[1]) as f64;
    let mut dx = vec![0.0; geo.input_len()];
    for_each_pool_tap(geo, |plane, o, h, w| {
        dx[(plane * h_in + h) * w_in + w] += grad_out[o] / divisor;
    });
    dx
}

/// `log(1 + eᵗ)` in f64 without overflow.
fn softplus1(t: f64) -> f64 {
    t.max(0.0) + (-t.abs()).exp().ln_1p()
}

/// [`Pointwise`] elementwise in f64.
pub fn pointwise_forward(f: &Pointwise, x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| match *f {
            Pointwise::LeakyRelu { negative_slope } => {
                if v > 0.0 {
                    v
                } else {
                    negative_slope * v
                }
            }
            Pointwise::Elu { alpha } => {
                if v > 0.0 {
                    v
                } else {
                    alpha * v.exp_m1()
                }
            }
            Pointwise::Hardtanh { min, max } => v.clamp(min, max),
            Pointwise::Hardswish => v * (v + 3.0).clamp(0.0, 6.0) / 6.0,
            Pointwise::Hardsigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
            Pointwise::Softplus { beta, threshold } => {
                if beta * v > threshold {
                    v
                } else {
                    softplus1(beta * v) / beta
                }
            }
            Pointwise::Mish => v * softplus1(v).tanh(),
        })
        .collect()
}

/// The backward of [`pointwise_forward`] from the forward input `x` (PyTorch's
/// branches: the derivative at a kink is the one its backward kernel takes).
pub fn pointwise_backward(f: &Pointwise, x: &[f64], grad_out: &[f64]) -> Vec<f64> {
    check_len("pointwise gradient", grad_out.len(), x.len());
    let sigmoid = |t: f64| 1.0 / (1.0 + (-t).exp());
    x.iter()
        .zip(grad_out)
        .map(|(&v, &g)| match *f {
            Pointwise::LeakyRelu { negative_slope } => {
                if v > 0.0 {
                    g
                } else {
                    negative_slope * g
                }
            }
            Pointwise::Elu { alpha } => {
                if v > 0.0 {
                    g
                } else {
                    g * alpha * v.exp()
                }
            }
            Pointwise::Hardtanh { min, max } => {
                if v > min && v < max {
                    g
                } else {
                    0.0
                }
            }
            Pointwise::Hardswish => {
                if v <= -3.0 {
                    0.0
                } else if v < 3.0 {
                    g * (v / 3.0 + 0.5)
                } else {
                    g
                }
            }
            // PyTorch's backward multiplies by the f32 constant `1.0f / 6.0f` (in
            // every precision), not by 1/6.
            Pointwise::Hardsigmoid => {
                if v > -3.0 && v < 3.0 {
                    g * f64::from(1.0f32 / 6.0)
                } else {
                    0.0
                }
            }
            Pointwise::Softplus { beta, threshold } => {
                if beta * v > threshold {
                    g
                } else {
                    g * sigmoid(beta * v)
                }
            }
            Pointwise::Mish => {
                let t = softplus1(v).tanh();
                g * (t + v * sigmoid(v) * (1.0 - t * t))
            }
        })
        .collect()
}
