// Layout shuffles and bias kernels around the conv2d / linear GEMMs. Tensors are
// row-major f32; "NCHW" activations are seen as [B, C, S] with S = OH * OW positions
// (S = 1 for a linear layer's [B, C]). With G channel groups of Cg = C / G channels,
// the "grouped rows" layout of examples first .. first + count is
//   rows[(g * count + b) * S + s][o] = y[first + b, g * Cg + o, s]      ([G, count * S, Cg]),
// the GEMM output/input of a grouped conv (for G = 1 it is channel-last [count * S, C]).
//
// Bindings: src (read), dst (read_write), params.
//   groups_to_nchw: src = rows, dst = y (examples first .. first + count overwritten)
//   nchw_to_groups: src = y,    dst = rows
//   add_bias:       src = bias [C], dst = y [B, C, S] += bias[c]
//   bias_grad:      src = dy [B, C, S], dst = db [C] = beta * db + sum over b, s
// Elementwise entry points run one invocation per dst element (grid_1d(ceil(n / 256))
// workgroups of 256); bias_grad runs one workgroup per channel (grid_1d(C)) and reduces
// in a fixed order (strided partial sums, then a tree), so it is deterministic.

struct ConvParams {
    first: u32,
    count: u32,
    c: u32,
    s: u32,
    groups: u32,
    beta: f32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> params: ConvParams;

var<workgroup> partial: array<f32, 256>;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// Index into rows of element (b, channel, s) of the chunk.
fn rows_index(b: u32, channel: u32, s: u32) -> u32 {
    let p = params;
    let cg = p.c / p.groups;
    let g = channel / cg;
    return ((g * p.count + b) * p.s + s) * cg + channel % cg;
}

@compute @workgroup_size(256)
fn groups_to_nchw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.count * p.c * p.s) {
        return;
    }
    let s = i % p.s;
    let channel = (i / p.s) % p.c;
    let b = i / (p.s * p.c);
    dst[p.first * p.c * p.s + i] = src[rows_index(b, channel, s)];
}

@compute @workgroup_size(256)
fn nchw_to_groups(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.count * p.c * p.s) {
        return;
    }
    // Walk dst in order: i = ((g * count + b) * S + s) * Cg + o.
    let cg = p.c / p.groups;
    let o = i % cg;
    let s = (i / cg) % p.s;
    let b = (i / (cg * p.s)) % p.count;
    let g = i / (cg * p.s * p.count);
    dst[i] = src[((p.first + b) * p.c + g * cg + o) * p.s + s];
}

// y[b, c, s] += bias[c] for all count examples starting at first.
@compute @workgroup_size(256)
fn add_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let i = flat(wid, nwg, lid);
    if (i >= p.count * p.c * p.s) {
        return;
    }
    let j = p.first * p.c * p.s + i;
    dst[j] = dst[j] + src[(i / p.s) % p.c];
}

// db[c] = beta * db[c] + sum_{b < count, s} dy[first + b, c, s]; beta = 0 overwrites.
@compute @workgroup_size(256)
fn bias_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let p = params;
    let channel = wid.x + wid.y * nwg.x;
    // The whole workgroup takes the same branch: the barriers below stay uniform.
    if (channel >= p.c) {
        return;
    }
    let n = p.count * p.s;
    var acc = 0.0;
    for (var e = lid; e < n; e += 256u) {
        acc += src[((p.first + e / p.s) * p.c + channel) * p.s + e % p.s];
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (lid < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var total = partial[0];
        if (p.beta != 0.0) {
            total += p.beta * dst[channel];
        }
        dst[channel] = total;
    }
}
