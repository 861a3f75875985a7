// Combining activations: the elementwise sum of the graph's `add`, the elementwise
// product of its `mul`, and slab copies
// (`cat` forward and its splitting backward). Flat f32 arrays; bindings follow
// src/gpu/pipeline.rs (reads, then writes, then params), each entry point through its
// own globals:
//   add:        a, b;  elementwise_out = a + b;  len_params3
//   multiply:   a, b;  elementwise_out = a * b;  len_params3
//   copy_slab:  a;     dst;              slab_params2
//
// copy_slab copies `outer` slabs of `inner` contiguous elements:
//   dst[o * dst_stride + dst_offset + j] = a[o * src_stride + src_offset + j]
// for o < outer, j < inner. Concatenating along an axis copies each input as the slabs
// (everything before the axis) x (its extent along the axis times everything after),
// at its offset in the output; splitting is the same copy the other way.
//
// One invocation per element: grid_1d(ceil(n / 256)) workgroups of 256, element
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct LenParams {
    len: u32,
}

struct SlabParams {
    outer: u32,
    inner: u32,
    src_stride: u32,
    src_offset: u32,
    dst_stride: u32,
    dst_offset: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read_write> elementwise_out: array<f32>;
@group(0) @binding(2) var<storage, read> slab_params2: SlabParams;
@group(0) @binding(3) var<storage, read> len_params3: LenParams;

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= len_params3.len) {
        return;
    }
    elementwise_out[i] = a[i] + b[i];
}

@compute @workgroup_size(256)
fn multiply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat(wid, nwg, lid);
    if (i >= len_params3.len) {
        return;
    }
    elementwise_out[i] = a[i] * b[i];
}

@compute @workgroup_size(256)
fn copy_slab(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let p = slab_params2;
    let i = flat(wid, nwg, lid);
    if (i >= p.outer * p.inner) {
        return;
    }
    let o = i / p.inner;
    let j = i % p.inner;
    dst[o * p.dst_stride + p.dst_offset + j] = a[o * p.src_stride + p.src_offset + j];
}
