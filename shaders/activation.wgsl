// Elementwise activations and their backward passes over flat f32 arrays.
// Bindings follow src/gpu/pipeline.rs: reads, then writes, then params. Forward
// entry points bind (x; y; params), backward ones (saved, grad_out; grad_in; params),
// each through its own globals.
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct ActivationParams {
    len: u32,
}

// Forward: y = f(x).
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: ActivationParams;

// Backward: grad_in = grad_out * f'(.), with f' computed from `saved` (the forward
// input for relu, the forward output for sigmoid and tanh).
@group(0) @binding(0) var<storage, read> saved: array<f32>;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad_in: array<f32>;
@group(0) @binding(3) var<storage, read> bparams: ActivationParams;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// tanh without overflow or cancellation: an odd Taylor polynomial below |x| = 0.25
// (truncation < 1e-8 relative), sign(x)(1 - e)/(1 + e) with e = exp(-2|x|) <= 0.61
// above it (no cancellation, e underflows to 0 for large |x|: never inf/inf).
fn safe_tanh(v: f32) -> f32 {
    let a = abs(v);
    if (a < 0.25) {
        let s = v * v;
        return v * (1.0 + s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0)))));
    }
    let e = exp(-2.0 * a);
    return sign(v) * (1.0 - e) / (1.0 + e);
}

// 1 / (1 + exp(-x)), written so exp never overflows: exp(-|x|) <= 1.
fn safe_sigmoid(v: f32) -> f32 {
    let e = exp(-abs(v));
    if (v >= 0.0) {
        return 1.0 / (1.0 + e);
    }
    return e / (1.0 + e);
}

// y = max(x, 0)
@compute @workgroup_size(256)
fn relu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.len) {
        return;
    }
    y[i] = max(x[i], 0.0);
}

@compute @workgroup_size(256)
fn sigmoid_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.len) {
        return;
    }
    y[i] = safe_sigmoid(x[i]);
}

@compute @workgroup_size(256)
fn tanh_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.len) {
        return;
    }
    y[i] = safe_tanh(x[i]);
}

// saved = forward input; derivative 0 at x = 0 (as PyTorch).
@compute @workgroup_size(256)
fn relu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= bparams.len) {
        return;
    }
    grad_in[i] = select(0.0, grad_out[i], saved[i] > 0.0);
}

// saved = forward output y: grad * y * (1 - y).
@compute @workgroup_size(256)
fn sigmoid_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= bparams.len) {
        return;
    }
    let s = saved[i];
    grad_in[i] = grad_out[i] * s * (1.0 - s);
}

// saved = forward output y: grad * (1 - y^2).
@compute @workgroup_size(256)
fn tanh_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= bparams.len) {
        return;
    }
    let s = saved[i];
    grad_in[i] = grad_out[i] * (1.0 - s * s);
}

// Activations with constants (`kind`, `a`, `b`), forward from the input and backward
// from the input, each branch as PyTorch's CPU kernels take it:
//   0 leaky_relu  (a = negative_slope):  x > 0 ? x : a·x
//   1 elu         (a = alpha):           x > 0 ? x : a·(e^x − 1)
//   2 hardtanh    (a = min, b = max):    clamp(x, a, b); gradient where a < x < b
//   3 hardswish:                         x·clamp(x + 3, 0, 6)/6; gradient 0 at -3, 1 at 3
//   4 hardsigmoid:                       clamp(x + 3, 0, 6)/6
//   5 softplus    (a = beta, b = threshold): βx > b ? x : log(1 + e^{βx})/β
//   6 mish:                              x·tanh(softplus(x))
struct PointwiseParams {
    len: u32,
    kind: u32,
    a: f32,
    b: f32,
}

@group(0) @binding(2) var<storage, read> pw: PointwiseParams;
@group(0) @binding(3) var<storage, read> pwb: PointwiseParams;

// e^v − 1 without cancellation near 0: a Taylor polynomial below |v| = 2^-5
// (truncation < 1e-9 relative).
fn expm1(v: f32) -> f32 {
    if (abs(v) < 0.03125) {
        return v * (1.0 + v * (0.5 + v * (1.0 / 6.0 + v * (1.0 / 24.0))));
    }
    return exp(v) - 1.0;
}

// log(1 + e^t) for any finite t: max(t, 0) + log(1 + e^{−|t|}), the logarithm of a
// value near 1 by a Taylor polynomial when e^{−|t|} is small.
fn log1p_exp(t: f32) -> f32 {
    let u = exp(-abs(t));
    var l: f32;
    if (u < 0.03125) {
        l = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - u * 0.25)));
    } else {
        l = log(1.0 + u);
    }
    return max(t, 0.0) + l;
}

fn pointwise(kind: u32, v: f32, a: f32, b: f32) -> f32 {
    switch kind {
        case 0u: { return select(a * v, v, v > 0.0); }
        case 1u: { return select(a * expm1(v), v, v > 0.0); }
        case 2u: { return clamp(v, a, b); }
        case 3u: { return v * clamp(v + 3.0, 0.0, 6.0) / 6.0; }
        case 4u: { return clamp(v + 3.0, 0.0, 6.0) / 6.0; }
        case 5u: {
            if (a * v > b) {
                return v;
            }
            return log1p_exp(a * v) / a;
        }
        default: { return v * safe_tanh(log1p_exp(v)); }
    }
}

// d f / d x at v, times g.
fn pointwise_grad(kind: u32, v: f32, g: f32, a: f32, b: f32) -> f32 {
    switch kind {
        case 0u: { return select(a * g, g, v > 0.0); }
        case 1u: { return select(g * a * exp(v), g, v > 0.0); }
        case 2u: { return select(0.0, g, v > a && v < b); }
        case 3u: {
            if (v <= -3.0) {
                return 0.0;
            }
            if (v < 3.0) {
                return g * (v / 3.0 + 0.5);
            }
            return g;
        }
        case 4u: { return select(0.0, g / 6.0, v > -3.0 && v < 3.0); }
        case 5u: {
            if (a * v > b) {
                return g;
            }
            return g * safe_sigmoid(a * v);
        }
        default: {
            let t = safe_tanh(log1p_exp(v));
            return g * (t + v * safe_sigmoid(v) * (1.0 - t * t));
        }
    }
}

@compute @workgroup_size(256)
fn pointwise_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= pw.len) {
        return;
    }
    y[i] = pointwise(pw.kind, x[i], pw.a, pw.b);
}

// saved = forward input.
@compute @workgroup_size(256)
fn pointwise_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= pwb.len) {
        return;
    }
    grad_in[i] = pointwise_grad(pwb.kind, saved[i], grad_out[i], pwb.a, pwb.b);
}
