// Row reductions of the row kernels (softmax.wgsl, norm.wgsl), prepended to their
// source. A row of n values has `lanes` invocations (n rounded up to a power of two, at
// most 256); a workgroup of 256 handles 256 / lanes consecutive rows, and lane j of a
// row reads its values j, j + lanes, ... The reductions are trees over the row's
// lanes in workgroup memory. A lane past the row's end holds the reduction's identity,
// so every result is the one 256 invocations per row would give, bit for bit.

var<workgroup> partial_a: array<f32, 256>;
var<workgroup> partial_b: array<f32, 256>;

// This invocation's row, its lane in the row, and the row's first slot in the
// partial arrays.
struct Lane {
    row: u32,
    lane: u32,
    first: u32,
}

// The lane of invocation `lid` of workgroup `wid` (rows numbered across a grid_1d grid).
fn lane_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32, lanes: u32) -> Lane {
    let first = lid - lid % lanes;
    return Lane((wid.x + wid.y * nwg.x) * (256u / lanes) + lid / lanes, lid % lanes, first);
}

// The maximum of `v` over the row's lanes, for each of them. Uniform control flow.
fn row_max(l: Lane, lid: u32, lanes: u32, v: f32) -> f32 {
    partial_a[lid] = v;
    workgroupBarrier();
    for (var half = lanes / 2u; half > 0u; half >>= 1u) {
        if (l.lane < half) {
            partial_a[lid] = max(partial_a[lid], partial_a[lid + half]);
        }
        workgroupBarrier();
    }
    let total = partial_a[l.first];
    // Nobody overwrites the total before everyone has read it.
    workgroupBarrier();
    return total;
}

// Sums (a, b) over the row's lanes; each of them gets the totals. Uniform control flow.
fn row_sum2(l: Lane, lid: u32, lanes: u32, a: f32, b: f32) -> vec2<f32> {
    partial_a[lid] = a;
    partial_b[lid] = b;
    workgroupBarrier();
    for (var half = lanes / 2u; half > 0u; half >>= 1u) {
        if (l.lane < half) {
            partial_a[lid] += partial_a[lid + half];
            partial_b[lid] += partial_b[lid + half];
        }
        workgroupBarrier();
    }
    let total = vec2<f32>(partial_a[l.first], partial_b[l.first]);
    workgroupBarrier();
    return total;
}
