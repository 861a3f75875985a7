// Kernels of the eigenvalue correction and of products in the Kronecker eigenbasis.
// Bindings follow src/gpu/pipeline.rs: reads, then writes, then params.
// Linear workgroup index = wid.x + wid.y * nwg.x (2-D grids for large arrays).

struct ScaleParams {
    x_offset: u32,
    len: u32,
    m_offset: u32,
    period: u32,
}

@group(0) @binding(0) var<storage, read> scale_m: array<f32>;
@group(0) @binding(1) var<storage, read_write> scale_x: array<f32>;
@group(0) @binding(2) var<storage, read> scale_params: ScaleParams;

// x[x_offset + i] *= m[m_offset + i % period]: an eigenvalue matrix [d_out, D] applied
// to K stacked [d_out, D] matrices.
@compute @workgroup_size(256)
fn scale_broadcast(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= scale_params.len) {
        return;
    }
    let p = scale_params;
    scale_x[p.x_offset + i] = scale_x[p.x_offset + i] * scale_m[p.m_offset + i % p.period];
}

struct StackParams {
    // Elements of one stacked matrix, rows × cols.
    len: u32,
    // Number of stacked matrices V.
    stack: u32,
}

@group(0) @binding(0) var<storage, read> stack_x: array<f32>;
@group(0) @binding(1) var<storage, read_write> stack_sum: array<f32>;
@group(0) @binding(2) var<storage, read> stack_params: StackParams;

// sum[i] = Σ_v x[v·len + i]², in v order: the squared projections of the V
// backpropagated vectors of one example, summed before the correction GEMM.
@compute @workgroup_size(256)
fn square_sum_stack(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= stack_params.len) {
        return;
    }
    var acc = 0.0;
    for (var v = 0u; v < stack_params.stack; v = v + 1u) {
        let value = stack_x[v * stack_params.len + i];
        acc = acc + value * value;
    }
    stack_sum[i] = acc;
}

struct SharedParams {
    // Backpropagated vectors V, examples B, positions S.
    stack: u32,
    batch: u32,
    positions: u32,
    // Λ is [d_out, d].
    d_out: u32,
    d: u32,
    kappa: f32,
}

@group(0) @binding(0) var<storage, read> shared_g: array<f32>;
@group(0) @binding(1) var<storage, read> shared_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> shared_lambda: array<f32>;
@group(0) @binding(3) var<storage, read> shared_params: SharedParams;

const TILE: u32 = 16u;
var<workgroup> g_tile: array<array<f32, 16>, 16>;
var<workgroup> x_tile: array<array<f32, 16>, 16>;

// The eigenvalue correction of a weight-sharing layer, fused:
//   Λ[k, l] += κ Σ_{v,n} (Σ_s g̃[v, n, s, k] · x̃[n, s, l])²
// with g̃ = g Q_G ([V, B, S, d_out], channel-last rotated output gradients) and
// x̃ = ã Q_A ([B, S, d], rotated patches). Each workgroup owns a 16×16 tile of Λ and
// loops over the examples, forming that tile of the rotated per-example gradient in
// registers: no [B, d_out, d] tensor, no atomics. Each Λ entry is written by one
// invocation, so the result is deterministic.
@compute @workgroup_size(16, 16)
fn correct_shared(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let p = shared_params;
    let k = wid.y * TILE + lid.y;
    let l = wid.x * TILE + lid.x;
    var acc = 0.0;
    for (var v = 0u; v < p.stack; v = v + 1u) {
        for (var n = 0u; n < p.batch; n = n + 1u) {
            let g_base = (v * p.batch + n) * p.positions;
            let x_base = n * p.positions;
            var gamma = 0.0;
            for (var s0 = 0u; s0 < p.positions; s0 = s0 + TILE) {
                // Row s0 + lid.y of this example's g̃ (columns of the tile's k range)
                // and of x̃ (columns of the tile's l range).
                let s = s0 + lid.y;
                let gk = wid.y * TILE + lid.x;
                var gv = 0.0;
                if (s < p.positions && gk < p.d_out) {
                    gv = shared_g[(g_base + s) * p.d_out + gk];
                }
                var xv = 0.0;
                if (s < p.positions && l < p.d) {
                    xv = shared_x[(x_base + s) * p.d + l];
                }
                g_tile[lid.y][lid.x] = gv;
                x_tile[lid.y][lid.x] = xv;
                workgroupBarrier();
                for (var ss = 0u; ss < TILE; ss = ss + 1u) {
                    gamma = gamma + g_tile[ss][lid.y] * x_tile[ss][lid.x];
                }
                workgroupBarrier();
            }
            acc = acc + gamma * gamma;
        }
    }
    if (k < p.d_out && l < p.d) {
        let i = k * p.d + l;
        shared_lambda[i] = shared_lambda[i] + p.kappa * acc;
    }
}
