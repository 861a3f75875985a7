// Embedding lookup (a gather of table rows by token id) and the table's gradient.
// Token ids are u32 words (the data's I64/I32 ids, checked on the host to lie in
// [0, num_embeddings)); an id outside the table reads zeros.
//
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params):
//   embedding_forward:    ids, table;     y;          params
//   embedding_table_grad: ids, grad_out;  grad_table; params
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct EmbeddingParams {
    // Rows of y or grad_out (positions times examples, times vectors for a stack).
    rows: u32,
    // Rows of ids: row r of a stack reads ids[r % id_rows].
    id_rows: u32,
    // embedding_dim.
    dim: u32,
    num_embeddings: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad_table: array<f32>;
@group(0) @binding(3) var<storage, read> params: EmbeddingParams;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// y[r, d] = table[ids[r], d].
@compute @workgroup_size(256)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.rows * params.dim) {
        return;
    }
    let id = ids[(i / params.dim) % params.id_rows];
    var v = 0.0;
    if (id < params.num_embeddings) {
        v = table[id * params.dim + i % params.dim];
    }
    y[i] = v;
}

// grad_table[j, d] = sum over rows r with ids[r] = j of grad_out[r, d], in row order
// (deterministic, no atomics): O(rows) per table element, for the rare callers that
// ask for parameter gradients (the table is not a curvature parameter).
@compute @workgroup_size(256)
fn embedding_table_grad(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= params.num_embeddings * params.dim) {
        return;
    }
    let j = i / params.dim;
    let d = i % params.dim;
    var s = 0.0;
    for (var r = 0u; r < params.rows; r++) {
        if (ids[r % params.id_rows] == j) {
            s += grad_out[r * params.dim + d];
        }
    }
    grad_table[i] = s;
}
