// masked_fill with a constant mask over flat f32 tensors, forward and backward.
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params):
//   masked_fill_forward:  src = x, mask;        out = y;       params
//   masked_fill_backward: src = grad_out, mask; out = grad_in; params
//
// The mask (u32 words, 1 = fill) is periodic: element i uses mask[i % mask_len] (a
// mask over the trailing dims of the tensor, broadcast over the leading ones, batch
// and stacked vectors included). Forward: y = value where filled, x elsewhere (value
// may be +-inf). Backward: grad_in = 0 where filled, grad_out elsewhere.
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct MaskedFillParams {
    len: u32,
    mask_len: u32,
    value: f32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> mask: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> params: MaskedFillParams;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn masked_fill_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.len || params.mask_len == 0u) {
        return;
    }
    out[i] = select(src[i], params.value, mask[i % params.mask_len] != 0u);
}

@compute @workgroup_size(256)
fn masked_fill_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.len || params.mask_len == 0u) {
        return;
    }
    out[i] = select(src[i], 0.0, mask[i % params.mask_len] != 0u);
}
