// Softmax over the last dimension of f32 rows, optionally masked by a constant mask,
// and its backward. Bindings follow src/gpu/pipeline.rs (reads, then writes, then
// params), each entry point through its own globals:
//   softmax_forward:        src = x;              out1 = y;       params2
//   softmax_forward_masked: src = x, mask;        out2 = y;       params3
//   softmax_backward:       src = y, grad_out;    out2 = grad_in; params3
//
// Forward is numerically stable: y_j = exp(x_j - m) / sum_k exp(x_k - m) with m the
// row maximum, so logits spread over +-1e4 never overflow and entries of -inf give 0.
// The masked form treats entries whose mask word is 0 as -inf without reading them:
// they are left out of the maximum and the sum and get y = 0. Element (row r, column
// j), flat index e = r * n + j, has mask word mask[(mask_offset + e % mask_len) %
// mask_len] (a constant mask over the trailing dims of a larger tensor, of which this
// dispatch may cover a part starting mask_offset words into the mask's period).
// A row with no finite entry (all -inf, or all masked) gives 0 / 0 = NaN, as PyTorch.
//
// Backward: grad_in_j = y_j (g_j - sum_k g_k y_k). Its rows are V-major stacks of the
// forward rows: grad row r belongs to y row r % y_rows, so y is never repeated.
//
// Rows as in rows.wgsl (prepended), grid_1d(ceil(rows / (256 / lanes))) workgroups.

struct SoftmaxParams {
    // Rows this dispatch writes (V * y_rows in backward).
    rows: u32,
    // Row length.
    n: u32,
    // Rows of the saved output y (backward); rows in forward.
    y_rows: u32,
    // Masked forward: the mask's period and where this dispatch starts in it.
    mask_len: u32,
    mask_offset: u32,
    // Invocations per row: a power of two, at most 256.
    lanes: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out1: array<f32>;
@group(0) @binding(1) var<storage, read> mask: array<u32>;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read> params2: SoftmaxParams;
@group(0) @binding(2) var<storage, read_write> out2: array<f32>;
@group(0) @binding(3) var<storage, read> params3: SoftmaxParams;

// The lowest finite f32: the maximum of a row with no finite entry stays here.
const LOWEST: f32 = -3.40282347e38;

@compute @workgroup_size(256)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let p = params2;
    let l = lane_of(wid, nwg, lid, p.lanes);
    // Rows past the end take part in the reductions over no elements.
    let n = select(0u, p.n, l.row < p.rows);
    let base = l.row * p.n;
    var m = LOWEST;
    for (var j = l.lane; j < n; j += p.lanes) {
        m = max(m, src[base + j]);
    }
    m = row_max(l, lid, p.lanes, m);
    var s = 0.0;
    for (var j = l.lane; j < n; j += p.lanes) {
        s += exp(src[base + j] - m);
    }
    let inv = 1.0 / row_sum2(l, lid, p.lanes, s, 0.0).x;
    for (var j = l.lane; j < n; j += p.lanes) {
        out1[base + j] = exp(src[base + j] - m) * inv;
    }
}

fn kept(p: SoftmaxParams, e: u32) -> bool {
    return mask[(p.mask_offset + e % p.mask_len) % p.mask_len] != 0u;
}

@compute @workgroup_size(256)
fn softmax_forward_masked(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let p = params3;
    let l = lane_of(wid, nwg, lid, p.lanes);
    let n = select(0u, p.n, l.row < p.rows && p.mask_len != 0u);
    let base = l.row * p.n;
    var m = LOWEST;
    for (var j = l.lane; j < n; j += p.lanes) {
        if (kept(p, base + j)) {
            m = max(m, src[base + j]);
        }
    }
    m = row_max(l, lid, p.lanes, m);
    var s = 0.0;
    for (var j = l.lane; j < n; j += p.lanes) {
        if (kept(p, base + j)) {
            s += exp(src[base + j] - m);
        }
    }
    let inv = 1.0 / row_sum2(l, lid, p.lanes, s, 0.0).x;
    for (var j = l.lane; j < n; j += p.lanes) {
        var y = 0.0;
        if (kept(p, base + j)) {
            y = exp(src[base + j] - m) * inv;
        }
        out2[base + j] = y;
    }
}

@compute @workgroup_size(256)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let p = params3;
    let l = lane_of(wid, nwg, lid, p.lanes);
    let n = select(0u, p.n, l.row < p.rows && p.y_rows != 0u);
    let base = l.row * p.n;
    let y_base = (l.row % max(p.y_rows, 1u)) * p.n;
    var s = 0.0;
    for (var j = l.lane; j < n; j += p.lanes) {
        s += grad_out[base + j] * src[y_base + j];
    }
    let total = row_sum2(l, lid, p.lanes, s, 0.0).x;
    for (var j = l.lane; j < n; j += p.lanes) {
        out2[base + j] = src[y_base + j] * (grad_out[base + j] - total);
    }
}
