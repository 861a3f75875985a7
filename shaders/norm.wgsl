// BatchNorm in eval mode and LayerNorm, forward and input backward, over f32 tensors.
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params), each entry
// point through its own globals:
//   batch_norm_forward:        src = x, mean, var2, bn_weight, bn_bias; out5 = y; bn_params6
//   batch_norm_backward:       src = grad_out, weight, var2; out3 = grad_in; bn_params4
//   layer_norm_forward:        src = x, weight, bias;    out3 = y;       row_params4
//   layer_norm_forward_plain:  src = x;                  out1 = y;       row_params2
//   layer_norm_backward:       src = x, weight, grad_ln; out3 = grad_in; row_params4
// Without affine parameters (AFFINE = 0) batch_norm_forward binds mean in place of
// bn_weight and bn_bias, batch_norm_backward var in place of weight, layer_norm_backward
// x in place of weight.
//
// BatchNorm in eval mode is a per-channel affine map,
// y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c] (weight 1 and bias 0
// without affine parameters); its input gradient is grad_out * weight[c] /
// sqrt(var[c] + eps). Tensors are [N, C, S] (S = H * W, or 1), one invocation per
// element, grid_1d(ceil(N * C * S / 256)) workgroups of 256.
//
// LayerNorm normalises each row of the last `d` elements: mean and biased variance of
// the row, xhat = (x - mean) / sqrt(var + eps), y = xhat * weight + bias. Rows as in
// rows.wgsl (prepended), grid_1d(ceil(rows / (256 / lanes))) workgroups; the row
// statistics take two reductions (the mean, then the mean squared deviation). Backward
// rows are V-major stacks of the forward rows: grad row r belongs to forward row
// r % x_rows, so the saved input is never repeated. With g = grad_out * weight,
// grad_in = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps).

struct ChannelParams {
    len: u32,
    channels: u32,
    spatial: u32,
    eps: f32,
}

struct RowParams {
    // Rows of the tensor this dispatch writes (V * x_rows in backward).
    rows: u32,
    // Rows of the saved forward input x.
    x_rows: u32,
    d: u32,
    eps: f32,
    // Invocations per row: a power of two, at most 256.
    lanes: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> mean: array<f32>;
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(1) var<storage, read_write> out1: array<f32>;
@group(0) @binding(2) var<storage, read> var2: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(2) var<storage, read> grad_ln: array<f32>;
@group(0) @binding(2) var<storage, read> row_params2: RowParams;
@group(0) @binding(3) var<storage, read> bn_weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out3: array<f32>;
@group(0) @binding(4) var<storage, read> bn_bias: array<f32>;
@group(0) @binding(4) var<storage, read> bn_params4: ChannelParams;
@group(0) @binding(4) var<storage, read> row_params4: RowParams;
@group(0) @binding(5) var<storage, read_write> out5: array<f32>;
@group(0) @binding(6) var<storage, read> bn_params6: ChannelParams;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// 1 with affine parameters (weight, bias); 0 without: the wrapper binds another input
// in their place, which is then never read.
override AFFINE: u32 = 1u;

fn channel_of(i: u32, p: ChannelParams) -> u32 {
    return (i / p.spatial) % p.channels;
}

@compute @workgroup_size(256)
fn batch_norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let p = bn_params6;
    let i = flat(wid, nwg, lid);
    if (i >= p.len) {
        return;
    }
    let c = channel_of(i, p);
    let xhat = (src[i] - mean[c]) * inverseSqrt(var2[c] + p.eps);
    if (AFFINE == 1u) {
        out5[i] = xhat * bn_weight[c] + bn_bias[c];
    } else {
        out5[i] = xhat;
    }
}

@compute @workgroup_size(256)
fn batch_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let p = bn_params4;
    let i = flat(wid, nwg, lid);
    if (i >= p.len) {
        return;
    }
    let c = channel_of(i, p);
    var scale = inverseSqrt(var2[c] + p.eps);
    if (AFFINE == 1u) {
        scale = weight[c] * scale;
    }
    out3[i] = src[i] * scale;
}

// Mean and 1 / sqrt(var + eps) of the `d` elements of src starting at `base` (d = 0:
// a row past the end, taking part in the reductions only).
fn row_statistics(l: Lane, lid: u32, lanes: u32, base: u32, d: u32, eps: f32) -> vec2<f32> {
    var s = 0.0;
    for (var j = l.lane; j < d; j += lanes) {
        s += src[base + j];
    }
    let mean = row_sum2(l, lid, lanes, s, 0.0).x / f32(d);
    var q = 0.0;
    for (var j = l.lane; j < d; j += lanes) {
        let t = src[base + j] - mean;
        q += t * t;
    }
    let var_ = row_sum2(l, lid, lanes, q, 0.0).x / f32(d);
    return vec2<f32>(mean, inverseSqrt(var_ + eps));
}

@compute @workgroup_size(256)
fn layer_norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let p = row_params4;
    let l = lane_of(wid, nwg, lid, p.lanes);
    let d = select(0u, p.d, l.row < p.rows);
    let base = l.row * p.d;
    let stats = row_statistics(l, lid, p.lanes, base, d, p.eps);
    for (var j = l.lane; j < d; j += p.lanes) {
        out3[base + j] = (src[base + j] - stats.x) * stats.y * weight[j] + bias[j];
    }
}

@compute @workgroup_size(256)
fn layer_norm_forward_plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let p = row_params2;
    let l = lane_of(wid, nwg, lid, p.lanes);
    let d = select(0u, p.d, l.row < p.rows);
    let base = l.row * p.d;
    let stats = row_statistics(l, lid, p.lanes, base, d, p.eps);
    for (var j = l.lane; j < d; j += p.lanes) {
        out1[base + j] = (src[base + j] - stats.x) * stats.y;
    }
}

// g of element `i` of the gradient stack, in column `j`.
fn layer_norm_g(i: u32, j: u32) -> f32 {
    if (AFFINE == 1u) {
        return grad_ln[i] * weight[j];
    }
    return grad_ln[i];
}

@compute @workgroup_size(256)
fn layer_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let p = row_params4;
    let l = lane_of(wid, nwg, lid, p.lanes);
    let d = select(0u, p.d, l.row < p.rows && p.x_rows != 0u);
    let base = l.row * p.d;
    let x_base = (l.row % max(p.x_rows, 1u)) * p.d;
    let stats = row_statistics(l, lid, p.lanes, x_base, d, p.eps);
    var sg = 0.0;
    var sgx = 0.0;
    for (var j = l.lane; j < d; j += p.lanes) {
        let g = layer_norm_g(base + j, j);
        sg += g;
        sgx += g * (src[x_base + j] - stats.x) * stats.y;
    }
    let sums = row_sum2(l, lid, p.lanes, sg, sgx) / f32(p.d);
    for (var j = l.lane; j < d; j += p.lanes) {
        let g = layer_norm_g(base + j, j);
        let xhat = (src[x_base + j] - stats.x) * stats.y;
        out3[base + j] = (g - sums.x - xhat * sums.y) * stats.y;
    }
}
