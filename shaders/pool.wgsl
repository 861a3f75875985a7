// max_pool2d and avg_pool2d (ceil_mode = false, dilation 1) forward and backward over
// NCHW f32 tensors. A "plane" is one (example, channel) pair: input planes are H x W,
// output planes OH x OW, planes = B * C. Output (oh, ow) covers input rows
// oh * SH - PH + [0, KH) and columns ow * SW - PW + [0, KW).
//
// Bindings (reads, then writes, then params), each entry point through its own globals:
//   max_pool_forward:  src = x;        out1 = y,       argmax_out; params3
//   max_pool_backward: src = grad_out, argmax_in;      out2 = grad_in; params3
//   avg_pool_forward:  src = x;        out1 = y;       params2
//   avg_pool_backward: src = grad_out; out1 = grad_in; params2
// argmax holds, per output, the in-plane index h * W + w of its window's first maximum.
//
// Every entry point runs one invocation per output element (forward) or input element
// (backward): grid_1d(ceil(n / 256)) workgroups of 256. Backward passes gather: each
// input element sums, in increasing output order, the outputs whose window holds it,
// so results are deterministic and no atomics are needed. flat and coords: planes.wgsl
// (prepended).

struct PoolParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out1: array<f32>;
@group(0) @binding(1) var<storage, read> argmax_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> argmax_out: array<u32>;
@group(0) @binding(2) var<storage, read_write> out2: array<f32>;
@group(0) @binding(2) var<storage, read> params2: PoolParams;
@group(0) @binding(3) var<storage, read> params3: PoolParams;

// The in-image part of output o's window along one axis of `size` inputs (kernel k,
// stride s, padding p): inputs [start, end), in the window's order.
fn clipped(o: u32, k: u32, s: u32, p: u32, size: u32) -> vec2<u32> {
    let start = max(o * s, p);
    let end = max(min(o * s + k, p + size), start);
    return vec2<u32>(start - p, end - p);
}

// The in-image window of the output at (plane, oh, ow) = c: input rows [x, y) and
// columns [z, w) of its plane.
fn window(c: vec3<u32>, p: PoolParams) -> vec4<u32> {
    return vec4<u32>(clipped(c.y, p.kh, p.sh, p.ph, p.h), clipped(c.z, p.kw, p.sw, p.pw, p.w));
}

// Outputs along one axis whose window holds input coordinate i: [first, end).
fn covering(i: u32, k: u32, s: u32, p: u32, count: u32) -> vec2<u32> {
    let t = i + p;
    var first = 0u;
    if (t + 1u > k) {
        first = (t + 1u - k + s - 1u) / s;
    }
    let end = min(t / s + 1u, count);
    return vec2<u32>(first, max(first, end));
}

// The outputs whose window holds the input at (plane, h, w) = c: output rows [x, y)
// and columns [z, w) of its plane.
fn holders(c: vec3<u32>, p: PoolParams) -> vec4<u32> {
    return vec4<u32>(covering(c.y, p.kh, p.sh, p.ph, p.oh), covering(c.z, p.kw, p.sw, p.pw, p.ow));
}

@compute @workgroup_size(256)
fn max_pool_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let p = params3;
    let o = flat(wid, nwg, lid);
    if (o >= p.planes * p.oh * p.ow) {
        return;
    }
    let c = coords(o, p.oh, p.ow);
    let base = c.x * p.h * p.w;
    let win = window(c, p);
    var best = 0.0;
    var arg = 0xffffffffu;
    for (var h = win.x; h < win.y; h++) {
        for (var w = win.z; w < win.w; w++) {
            let idx = h * p.w + w;
            let v = src[base + idx];
            // Padding is -inf: the first in-image element starts the scan, and a later
            // one replaces it only when strictly greater (first maximum wins).
            if (arg == 0xffffffffu || v > best) {
                best = v;
                arg = idx;
            }
        }
    }
    out1[o] = best;
    argmax_out[o] = arg;
}

@compute @workgroup_size(256)
fn max_pool_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let p = params3;
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let c = coords(i, p.h, p.w);
    let outs = holders(c, p);
    var acc = 0.0;
    for (var oh = outs.x; oh < outs.y; oh++) {
        for (var ow = outs.z; ow < outs.w; ow++) {
            let o = (c.x * p.oh + oh) * p.ow + ow;
            if (argmax_in[o] == c.y * p.w + c.z) {
                acc += src[o];
            }
        }
    }
    out2[i] = acc;
}

// count_include_pad = true: the divisor is always KH * KW.
@compute @workgroup_size(256)
fn avg_pool_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let p = params2;
    let o = flat(wid, nwg, lid);
    if (o >= p.planes * p.oh * p.ow) {
        return;
    }
    let c = coords(o, p.oh, p.ow);
    let base = c.x * p.h * p.w;
    let win = window(c, p);
    var acc = 0.0;
    for (var h = win.x; h < win.y; h++) {
        for (var w = win.z; w < win.w; w++) {
            acc += src[base + h * p.w + w];
        }
    }
    out1[o] = acc / f32(p.kh * p.kw);
}

@compute @workgroup_size(256)
fn avg_pool_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let p = params2;
    let i = flat(wid, nwg, lid);
    if (i >= p.planes * p.h * p.w) {
        return;
    }
    let c = coords(i, p.h, p.w);
    let outs = holders(c, p);
    var acc = 0.0;
    for (var oh = outs.x; oh < outs.y; oh++) {
        for (var ow = outs.z; ow < outs.w; ow++) {
            acc += src[(c.x * p.oh + oh) * p.ow + ow];
        }
    }
    out1[i] = acc / f32(p.kh * p.kw);
}
