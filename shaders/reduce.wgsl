// Utility kernels over flat row-major f32 arrays: fill, scale, axpy, square, copy,
// add_diagonal, batched transpose, append a column of ones, and deterministic row and
// column sums (fixed-order tree reductions in workgroup memory, no atomics: the same
// input always gives bitwise the same output).
//
// Two binding layouts (src/gpu/pipeline.rs: reads, then writes, then params):
//   in place:       0 = y (read_write), 1 = params
//   input, output:  0 = x (read), 1 = y (read_write), 2 = params
// Each entry point uses the variables of one layout only.
//
// Elementwise kernels run on a 1-D grid split as in `grid_1d`: element
// (wid.x + wid.y * nwg.x) * 256 + lid.

@group(0) @binding(0) var<storage, read_write> y_inplace: array<f32>;
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// --- In place: y[offset + i] for i < len.

struct RangeParams {
    offset: u32,
    len: u32,
    value: f32,
}

@group(0) @binding(1) var<storage, read> range_p: RangeParams;

// y[offset + i] = value
@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < range_p.len) {
        y_inplace[range_p.offset + i] = range_p.value;
    }
}

// y[offset + i] *= value
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < range_p.len) {
        let j = range_p.offset + i;
        y_inplace[j] = range_p.value * y_inplace[j];
    }
}

// y holds `count` consecutive n x n matrices; y[b][i][i] += delta.
struct DiagonalParams {
    n: u32,
    count: u32,
    delta: f32,
}

@group(0) @binding(1) var<storage, read> diag_p: DiagonalParams;

@compute @workgroup_size(256)
fn add_diagonal(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < diag_p.n * diag_p.count) {
        let b = i / diag_p.n;
        let d = i % diag_p.n;
        let j = b * diag_p.n * diag_p.n + d * (diag_p.n + 1u);
        y_inplace[j] = y_inplace[j] + diag_p.delta;
    }
}

// --- Elementwise from x into y: y[offset_y + i] = f(x[offset_x + i]) for i < len.
// With beta == 0, y is overwritten and never read.

struct MapParams {
    len: u32,
    offset_x: u32,
    offset_y: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(2) var<storage, read> map_p: MapParams;

// y = alpha * x + beta * y
@compute @workgroup_size(256)
fn axpy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < map_p.len) {
        let j = map_p.offset_y + i;
        var v = map_p.alpha * x[map_p.offset_x + i];
        if (map_p.beta != 0.0) {
            v = fma(map_p.beta, y[j], v);
        }
        y[j] = v;
    }
}

// y = alpha * x² + beta * y
@compute @workgroup_size(256)
fn square(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < map_p.len) {
        let j = map_p.offset_y + i;
        let xi = x[map_p.offset_x + i];
        var v = map_p.alpha * (xi * xi);
        if (map_p.beta != 0.0) {
            v = fma(map_p.beta, y[j], v);
        }
        y[j] = v;
    }
}

// y = x, bit for bit
@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    if (i < map_p.len) {
        y[map_p.offset_y + i] = x[map_p.offset_x + i];
    }
}

// --- Batched transpose: matrix b of x (rows x cols, row length ld_x, starting at
// offset_x + b * stride_x) goes transposed to y (cols x rows, row length ld_y, starting
// at offset_y + b * stride_y). 16 x 16 tiles through workgroup memory so that both
// the reads and the writes are contiguous. Grid: (column tiles, row tiles, batch).

struct TransposeParams {
    rows: u32,
    cols: u32,
    ld_x: u32,
    ld_y: u32,
    offset_x: u32,
    offset_y: u32,
    stride_x: u32,
    stride_y: u32,
}

@group(0) @binding(2) var<storage, read> tr_p: TransposeParams;

var<workgroup> tr_tile: array<f32, 272>; // 16 x 17, padded against bank conflicts

@compute @workgroup_size(16, 16)
fn transpose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let r0 = wid.y * 16u;
    let c0 = wid.x * 16u;
    let r = r0 + l.y;
    let c = c0 + l.x;
    if (r < tr_p.rows && c < tr_p.cols) {
        tr_tile[l.y * 17u + l.x] = x[tr_p.offset_x + wid.z * tr_p.stride_x + r * tr_p.ld_x + c];
    }
    workgroupBarrier();
    // Invocation (l.x, l.y) writes y[c0 + l.y][r0 + l.x] = x[r0 + l.x][c0 + l.y].
    let yr = c0 + l.y;
    let yc = r0 + l.x;
    if (yr < tr_p.cols && yc < tr_p.rows) {
        y[tr_p.offset_y + wid.z * tr_p.stride_y + yr * tr_p.ld_y + yc] = tr_tile[l.x * 17u + l.y];
    }
}

// --- Append a column of ones: x is rows x cols, y is rows x (cols + 1).

struct AppendParams {
    rows: u32,
    cols: u32,
}

@group(0) @binding(2) var<storage, read> app_p: AppendParams;

@compute @workgroup_size(256)
fn append_ones_column(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, nwg, lid);
    let width = app_p.cols + 1u;
    if (i < app_p.rows * width) {
        let r = i / width;
        let c = i % width;
        if (c == app_p.cols) {
            y[i] = 1.0;
        } else {
            y[i] = x[r * app_p.cols + c];
        }
    }
}

// --- Sums. y = alpha * (sum) + beta * y; with beta == 0, y is not read.

struct SumParams {
    rows: u32,
    cols: u32,
    // sum_rows: rows summed by one workgroup; sum_cols: invocations per row.
    rows_per_group: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(2) var<storage, read> sum_p: SumParams;

var<workgroup> partial: array<f32, 256>;

fn finish(j: u32, s: f32) {
    var v = sum_p.alpha * s;
    if (sum_p.beta != 0.0) {
        v = fma(sum_p.beta, y[j], v);
    }
    y[j] = v;
}

// Column sums over a block of rows: x is rows x cols; workgroup (g, z) with
// g = wid.x + wid.y * nwg.x sums rows [z * rows_per_group, (z + 1) * rows_per_group)
// of columns [64 g, 64 g + 64) into y[z * cols + column]. Its 256 invocations are
// 64 columns x 4 lanes; lane l adds rows l, l + 4, ... in order, then the four lane
// sums are added as (l0 + l1) + (l2 + l3). The host repeats this on y until one row
// remains.
@compute @workgroup_size(256)
fn sum_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let col = (wid.x + wid.y * nwg.x) * 64u + lid % 64u;
    let lane = lid / 64u;
    let first = wid.z * sum_p.rows_per_group;
    let end = min(first + sum_p.rows_per_group, sum_p.rows);
    var s = 0.0;
    if (col < sum_p.cols) {
        for (var r = first + lane; r < end; r += 4u) {
            s += x[r * sum_p.cols + col];
        }
    }
    partial[lid] = s;
    workgroupBarrier();
    if (lane % 2u == 0u) {
        partial[lid] = partial[lid] + partial[lid + 64u];
    }
    workgroupBarrier();
    if (lid < 64u && col < sum_p.cols) {
        finish(wid.z * sum_p.cols + col, partial[lid] + partial[lid + 128u]);
    }
}

// Row sums: y[r] = alpha * sum_c x[r][c] + beta * y[r]. Each row has a segment of
// `lanes` = rows_per_group consecutive invocations (a power of two, the smallest
// >= cols but at most 256), so a workgroup sums 256 / lanes rows: lane l adds columns
// l, l + lanes, ... in order, then a binary tree in workgroup memory adds the segment's
// lane sums. Bit for bit the sums of one workgroup per row (lanes = 256): the lanes
// past the segment would hold +0 and add it to lane sums that are never -0 (each
// starts as 0.0 + x), which changes nothing.
@compute @workgroup_size(256)
fn sum_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let lanes = sum_p.rows_per_group;
    let r = (wid.x + wid.y * nwg.x) * (256u / lanes) + lid / lanes;
    let lane = lid % lanes;
    var s = 0.0;
    if (r < sum_p.rows) {
        for (var c = lane; c < sum_p.cols; c += lanes) {
            s += x[r * sum_p.cols + c];
        }
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var width = lanes / 2u; width > 0u; width /= 2u) {
        if (lane < width) {
            partial[lid] = partial[lid] + partial[lid + width];
        }
        workgroupBarrier();
    }
    if (lane == 0u && r < sum_p.rows) {
        finish(r, partial[lid]);
    }
}
