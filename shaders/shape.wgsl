// Strided gathers over flat row-major f32 arrays: one kernel serves transpose and
// permute (a permuted view copied out), broadcasting (stride 0), and scaling by a
// constant (mul_constant, div_constant, the mean's backward).
//
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params):
//   gather: x; y; params
//
// y[i] = (x[offset(i)] * scale) / divisor for i < len, where offset(i) decomposes i
// row-major over the output dims d0..d5 (unused leading dims are 1) and adds each
// coordinate times its stride s0..s5 in x.
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct GatherParams {
    len: u32,
    scale: f32,
    divisor: f32,
    d0: u32,
    d1: u32,
    d2: u32,
    d3: u32,
    d4: u32,
    d5: u32,
    s0: u32,
    s1: u32,
    s2: u32,
    s3: u32,
    s4: u32,
    s5: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> params: GatherParams;

fn offset(i: u32) -> u32 {
    var r = i;
    var o = (r % params.d5) * params.s5;
    r = r / params.d5;
    o += (r % params.d4) * params.s4;
    r = r / params.d4;
    o += (r % params.d3) * params.s3;
    r = r / params.d3;
    o += (r % params.d2) * params.s2;
    r = r / params.d2;
    o += (r % params.d1) * params.s1;
    r = r / params.d1;
    o += (r % params.d0) * params.s0;
    return o;
}

@compute @workgroup_size(256)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.len) {
        return;
    }
    y[i] = (x[offset(i)] * params.scale) / params.divisor;
}
