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
    // The (v, n) pairs, v-major, are cut into `parts` runs of `per_part` (grid z).
    // 1: Λ += κ·acc in place; more: part p writes its acc to out[p·d_out·d + i]
    // (ops::reduce::sum_rows then adds the parts into Λ).
    parts: u32,
    per_part: u32,
}

@group(0) @binding(0) var<storage, read> shared_g: array<f32>;
@group(0) @binding(1) var<storage, read> shared_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> shared_out: array<f32>;
@group(0) @binding(3) var<storage, read> shared_params: SharedParams;

// Entries of Λ per invocation along each side (the block is written out below).
const BLOCK: u32 = 4u;

// One step of the per-example gradient: column s of the 4 × 4 block of
// Γ = g̃ᵀ x̃ from g̃'s row at `g` and x̃'s row at `x` (indices clamped into range:
// products of clamped entries are never stored).
struct Rows {
    g: vec4<f32>,
    x: vec4<f32>,
}

fn shared_rows(g: u32, x: u32, k0: u32, l0: u32) -> Rows {
    let p = shared_params;
    let kl = p.d_out - 1u;
    let ll = p.d - 1u;
    return Rows(
        vec4<f32>(shared_g[g + min(k0, kl)], shared_g[g + min(k0 + 1u, kl)],
                  shared_g[g + min(k0 + 2u, kl)], shared_g[g + min(k0 + 3u, kl)]),
        vec4<f32>(shared_x[x + min(l0, ll)], shared_x[x + min(l0 + 1u, ll)],
                  shared_x[x + min(l0 + 2u, ll)], shared_x[x + min(l0 + 3u, ll)]));
}

// The eigenvalue correction of a weight-sharing layer, fused:
//   Λ[k, l] += κ Σ_{v,n} (Σ_s g̃[v, n, s, k] · x̃[n, s, l])²
// with g̃ = g Q_G ([V, B, S, d_out], channel-last rotated output gradients) and
// x̃ = ã Q_A ([B, S, d], rotated patches). Each invocation owns a 4 × 4 block of Λ
// and loops over its part's (v, n) pairs, forming that block of the rotated
// per-example gradient Γ = g̃_{v,n}ᵀ x̃_n in registers (s in order), then adding its
// squares: no [B, d_out, d] tensor, no workgroup memory, no barrier, no atomics. The
// block is written out without loops over it (lavapipe does not unroll them, and
// private arrays indexed in loops live in memory). Every sum has a fixed order, so
// the result is deterministic; with one part it is that of one sequential loop.
// Grid: x (and y) = blocks / 64, z = part.
@compute @workgroup_size(64)
fn correct_shared(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let p = shared_params;
    let cols = (p.d + BLOCK - 1u) / BLOCK;
    let t = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (t >= cols * ((p.d_out + BLOCK - 1u) / BLOCK)) {
        return;
    }
    let k0 = (t / cols) * BLOCK;
    let l0 = (t % cols) * BLOCK;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    let first = wid.z * p.per_part;
    let end = min(first + p.per_part, p.stack * p.batch);
    for (var vn = first; vn < end; vn++) {
        let n = vn % p.batch;
        var c0 = vec4<f32>(0.0);
        var c1 = vec4<f32>(0.0);
        var c2 = vec4<f32>(0.0);
        var c3 = vec4<f32>(0.0);
        for (var s = 0u; s < p.positions; s++) {
            let r = shared_rows((vn * p.positions + s) * p.d_out,
                                (n * p.positions + s) * p.d, k0, l0);
            c0 = c0 + r.g.x * r.x;
            c1 = c1 + r.g.y * r.x;
            c2 = c2 + r.g.z * r.x;
            c3 = c3 + r.g.w * r.x;
        }
        a0 = a0 + c0 * c0;
        a1 = a1 + c1 * c1;
        a2 = a2 + c2 * c2;
        a3 = a3 + c3 * c3;
    }
    shared_store(k0, l0, a0, wid.z);
    shared_store(k0 + 1u, l0, a1, wid.z);
    shared_store(k0 + 2u, l0, a2, wid.z);
    shared_store(k0 + 3u, l0, a3, wid.z);
}

// Stores row k of a block, columns l0 .. l0 + 3, where inside Λ: Λ += κ·acc with one
// part, else the part's own slice of the partial sums.
fn shared_store(k: u32, l0: u32, acc: vec4<f32>, part: u32) {
    let p = shared_params;
    if (k >= p.d_out) {
        return;
    }
    for (var e = 0u; e < BLOCK; e++) {
        let l = l0 + e;
        if (l < p.d) {
            let i = k * p.d + l;
            if (p.parts == 1u) {
                shared_out[i] = shared_out[i] + p.kappa * acc[e];
            } else {
                shared_out[part * p.d_out * p.d + i] = acc[e];
            }
        }
    }
}
