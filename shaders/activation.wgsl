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
