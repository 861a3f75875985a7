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
@group(0) @binding(2) var<uniform> scale_params: ScaleParams;

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
@group(0) @binding(2) var<uniform> stack_params: StackParams;

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
