// SiLU (swish), y = x * sigma(x), forward and backward over flat f32 arrays.
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params), each entry
// point through its own globals:
//   silu_forward:  x;            y;       fparams
//   silu_backward: x, grad_out;  grad_in; bparams
// Backward rows are V-major stacks of the forward input: grad element i belongs to
// x[i % x_len], so the saved input is never repeated.
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct ElementwiseParams {
    len: u32,
}

struct StackedParams {
    len: u32,
    x_len: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read> fparams: ElementwiseParams;
@group(0) @binding(2) var<storage, read_write> grad_in: array<f32>;
@group(0) @binding(3) var<storage, read> bparams: StackedParams;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// (sigma(v), sigma'(v)) with exp(-|v|) <= 1 so nothing overflows, and
// sigma' = e / (1 + e)^2 keeps its relative accuracy in both tails.
fn logistic(v: f32) -> vec2<f32> {
    let e = exp(-abs(v));
    let r = 1.0 / (1.0 + e);
    return vec2<f32>(select(e * r, r, v >= 0.0), e * r * r);
}

@compute @workgroup_size(256)
fn silu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= fparams.len) {
        return;
    }
    let v = x[i];
    y[i] = v * logistic(v).x;
}

// d/dx x sigma(x) = sigma(x) + x sigma'(x).
@compute @workgroup_size(256)
fn silu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= bparams.len || bparams.x_len == 0u) {
        return;
    }
    let v = x[i % bparams.x_len];
    let s = logistic(v);
    grad_in[i] = grad_out[i] * (s.x + v * s.y);
}
