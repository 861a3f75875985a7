// Batched row-major f32 GEMM with register tiling:
//
//   C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]      for b in 0..batch
//
// op(A) is M x K and op(B) is K x N. Without transposition A is stored M x K with row
// length (leading dimension) lda >= K; with TRANS_A it is stored K x M with lda >= M.
// Likewise B is stored K x N (ldb >= N) or, with TRANS_B, N x K (ldb >= K). C is M x N
// with ldc >= N. Matrix b of each operand starts at element offset_x + b * stride_x of
// its buffer (stride 0 broadcasts one matrix over the batch), or, with a nonzero period
// (two levels: groups of `period` matrices), at offset_x + (b / period) * outer_x +
// (b % period) * stride_x. With beta == 0, C is overwritten and never read.
//
// Each workgroup computes one TILE x TILE tile of C (workgroup_id.x: column tile,
// workgroup_id.y: row tile, workgroup_id.z: batch index); TILE is an override, 64 by
// default, 32 or 16 for narrow and small products (the host picks it from the shape).
// Its THREADS = (TILE / 4)^2 invocations (256, 64 or 16) form a G x G grid, G = TILE / 4;
// each accumulates a 4 x 4 register tile. A and B are staged through workgroup memory
// BK = TILE / 4 values of K at a time (16, 8 or 4), k-major, so the inner loop reads one
// vec4 of A and one vec4 of B per k and does 16 multiply-adds; a staged slice holds
// TILE * BK = 4 * THREADS values of each operand, four per invocation. The global
// loads of the next K slice are issued before the current one is multiplied.
//
// Split-K (host-chosen for few tiles and a long K): workgroup_id.z also selects a
// slice of K, each slice's partial product goes to its own packed matrix, and
// split_k_sum adds the slices in order into C.
//
// Products with 1 <= K <= 32 run the short-K kernels gemm_short_<a><b> instead (same
// grid and tiles, no workgroup memory; see "Short K" below), and products with m = 1 or
// n = 1 the matrix-vector kernels gemv_t and gemv_n at the end of this file.
//
// Entry points gemm_<a><b>: 'v' loads the operand with vec4 reads, 's' with scalar
// reads. The vec4 path needs the operand's row length (K for A, M for A^T, N for B,
// K for B^T), its leading dimension, offset, batch stride and (with a period) group
// stride all multiples of 4; the host picks the entry point.

struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    offset_a: u32,
    offset_b: u32,
    offset_c: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    alpha: f32,
    beta: f32,
    // Split-K: K is cut into `splits` slices of k_split values (a multiple of BK);
    // workgroup_id.z = batch index * splits + slice, and C matrix wid.z (not the batch
    // index) receives the slice's partial product. Without split-K, splits = 1 and
    // k_split >= K.
    splits: u32,
    k_split: u32,
    // Nonzero: batch entry z needs only the columns of C from z * upper_from on, or
    // (lower_to) before (z + 1) * lower_to; tiles wholly outside are not dispatched (C
    // kept as it was there; see grid_position).
    upper_from: u32,
    lower_to: u32,
    // Nonzero: batch entries come in groups of `period` (matrix_start; never with
    // split-K), and upper_from / lower_to count z modulo it (stacked matrices of
    // `period` panels each).
    period: u32,
    outer_a: u32,
    outer_b: u32,
    outer_c: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;

// Rows and columns of the C tile: 64, 32 or 16.
override TILE: u32 = 64u;
// Side of the grid of invocations, each owning 4 x 4 values of the C tile.
override G: u32 = TILE / 4u;
override THREADS: u32 = G * G;
// Values of K staged at a time.
override BK: u32 = TILE / 4u;
// Row length of the staged tiles in vec4s: G for TILE values, plus one vec4 of padding
// against bank conflicts when a tile is written column by column.
override ROW4: u32 = G + 1u;

// The same buffers seen as scalars and as vec4s; each entry point uses one view each.
@group(0) @binding(0) var<storage, read> a_s: array<f32>;
@group(0) @binding(0) var<storage, read> a_v: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b_s: array<f32>;
@group(0) @binding(1) var<storage, read> b_v: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> p: GemmParams;

// a_tile[k * ROW4 + i / 4][i % 4] = op(A)[m0 + i, k0 + k]
var<workgroup> a_tile: array<vec4<f32>, BK * ROW4>;
// b_tile[k * ROW4 + j / 4][j % 4] = op(B)[k0 + k, n0 + j]
var<workgroup> b_tile: array<vec4<f32>, BK * ROW4>;

// Where this workgroup works: the first row and column of its C tile, the start of
// its matrices in each buffer, and its range of K.
struct Tile {
    m0: u32,
    n0: u32,
    base_a: u32,
    base_b: u32,
    base_c: u32,
    k_begin: u32,
    k_end: u32,
}

// Where matrix z of an operand starts, relative to its offset.
fn matrix_start(z: u32, stride: u32, outer: u32) -> u32 {
    if (p.period == 0u) {
        return z * stride;
    }
    return (z / p.period) * outer + (z % p.period) * stride;
}

fn tile_of(wid: vec3<u32>) -> Tile {
    let b = wid.z / p.splits;
    let k_begin = (wid.z % p.splits) * p.k_split;
    return Tile(wid.y * TILE, wid.x * TILE, p.offset_a + matrix_start(b, p.stride_a, p.outer_a),
                p.offset_b + matrix_start(b, p.stride_b, p.outer_b),
                p.offset_c + matrix_start(wid.z, p.stride_c, p.outer_c), k_begin,
                min(p.k, k_begin + p.k_split));
}

// --- A: fetch four values of the K slice starting at k0 into registers, then store
// them into a_tile. The scalar path gives invocation t the elements t + THREADS e (e < 4)
// of the slice, in the order of memory so that neighbouring invocations read
// neighbouring addresses; the vec4 path gives it one aligned vec4.

fn fetch_a_s(t: Tile, lid: u32, k0: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let idx = lid + THREADS * e;
        var i: u32;
        var kk: u32;
        if (TRANS_A) {
            kk = idx / TILE;
            i = idx % TILE;
        } else {
            i = idx / BK;
            kk = idx % BK;
        }
        let gm = t.m0 + i;
        let gk = k0 + kk;
        if (gm < p.m && gk < t.k_end) {
            if (TRANS_A) {
                r[e] = a_s[t.base_a + gk * p.lda + gm];
            } else {
                r[e] = a_s[t.base_a + gm * p.lda + gk];
            }
        }
    }
    return r;
}

fn put_a_s(lid: u32, r: vec4<f32>) {
    for (var e = 0u; e < 4u; e++) {
        let idx = lid + THREADS * e;
        if (TRANS_A) {
            let kk = idx / TILE;
            let i = idx % TILE;
            a_tile[kk * ROW4 + i / 4u][i % 4u] = r[e];
        } else {
            let i = idx / BK;
            let kk = idx % BK;
            a_tile[kk * ROW4 + i / 4u][i % 4u] = r[e];
        }
    }
}

fn fetch_a_v(t: Tile, lid: u32, k0: u32) -> vec4<f32> {
    if (TRANS_A) {
        // Row k0 + lid / G of the stored K x M matrix, columns m0 + 4 (lid % G) + 0..3.
        let gk = k0 + lid / G;
        let gm = t.m0 + 4u * (lid % G);
        if (gk < t.k_end && gm < p.m) {
            return a_v[(t.base_a + gk * p.lda + gm) / 4u];
        }
    } else {
        // Row m0 + lid / (BK / 4) of the stored M x K matrix, columns
        // k0 + 4 (lid % (BK / 4)) + 0..3.
        let gm = t.m0 + lid / (BK / 4u);
        let gk = k0 + 4u * (lid % (BK / 4u));
        if (gm < p.m && gk < t.k_end) {
            return a_v[(t.base_a + gm * p.lda + gk) / 4u];
        }
    }
    return vec4<f32>(0.0);
}

fn put_a_v(lid: u32, r: vec4<f32>) {
    if (TRANS_A) {
        a_tile[(lid / G) * ROW4 + lid % G] = r;
    } else {
        let i = lid / (BK / 4u);
        let kk = 4u * (lid % (BK / 4u));
        for (var e = 0u; e < 4u; e++) {
            a_tile[(kk + e) * ROW4 + i / 4u][i % 4u] = r[e];
        }
    }
}

// --- B, the same way. Without TRANS_B the stored K x N matrix is read along N;
// with TRANS_B the stored N x K matrix is read along K.

fn fetch_b_s(t: Tile, lid: u32, k0: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let idx = lid + THREADS * e;
        var j: u32;
        var kk: u32;
        if (TRANS_B) {
            j = idx / BK;
            kk = idx % BK;
        } else {
            kk = idx / TILE;
            j = idx % TILE;
        }
        let gn = t.n0 + j;
        let gk = k0 + kk;
        if (gn < p.n && gk < t.k_end) {
            if (TRANS_B) {
                r[e] = b_s[t.base_b + gn * p.ldb + gk];
            } else {
                r[e] = b_s[t.base_b + gk * p.ldb + gn];
            }
        }
    }
    return r;
}

fn put_b_s(lid: u32, r: vec4<f32>) {
    for (var e = 0u; e < 4u; e++) {
        let idx = lid + THREADS * e;
        if (TRANS_B) {
            let j = idx / BK;
            let kk = idx % BK;
            b_tile[kk * ROW4 + j / 4u][j % 4u] = r[e];
        } else {
            let kk = idx / TILE;
            let j = idx % TILE;
            b_tile[kk * ROW4 + j / 4u][j % 4u] = r[e];
        }
    }
}

fn fetch_b_v(t: Tile, lid: u32, k0: u32) -> vec4<f32> {
    if (TRANS_B) {
        let gn = t.n0 + lid / (BK / 4u);
        let gk = k0 + 4u * (lid % (BK / 4u));
        if (gn < p.n && gk < t.k_end) {
            return b_v[(t.base_b + gn * p.ldb + gk) / 4u];
        }
    } else {
        let gk = k0 + lid / G;
        let gn = t.n0 + 4u * (lid % G);
        if (gk < t.k_end && gn < p.n) {
            return b_v[(t.base_b + gk * p.ldb + gn) / 4u];
        }
    }
    return vec4<f32>(0.0);
}

fn put_b_v(lid: u32, r: vec4<f32>) {
    if (TRANS_B) {
        let j = lid / (BK / 4u);
        let kk = 4u * (lid % (BK / 4u));
        for (var e = 0u; e < 4u; e++) {
            b_tile[(kk + e) * ROW4 + j / 4u][j % 4u] = r[e];
        }
    } else {
        b_tile[(lid / G) * ROW4 + lid % G] = r;
    }
}

// --- The shared part: multiply the staged slice into the register tile, and write
// the register tile to C.

// acc[r] holds row 4 (lid / G) + r, columns 4 (lid % G) + 0..3 of the C tile.
fn multiply(lid: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    let ty = lid / G;
    let tx = lid % G;
    for (var kk = 0u; kk < BK; kk++) {
        let av = a_tile[kk * ROW4 + ty];
        let bv = b_tile[kk * ROW4 + tx];
        (*acc)[0] = fma(vec4<f32>(av.x), bv, (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(av.y), bv, (*acc)[1]);
        (*acc)[2] = fma(vec4<f32>(av.z), bv, (*acc)[2]);
        (*acc)[3] = fma(vec4<f32>(av.w), bv, (*acc)[3]);
    }
}

fn store(t: Tile, lid: u32, acc: array<vec4<f32>, 4>) {
    let row = t.m0 + 4u * (lid / G);
    let col = t.n0 + 4u * (lid % G);
    for (var r = 0u; r < 4u; r++) {
        let gm = row + r;
        if (gm >= p.m) {
            return;
        }
        for (var j = 0u; j < 4u; j++) {
            let gn = col + j;
            if (gn < p.n) {
                let idx = t.base_c + gm * p.ldc + gn;
                var v = p.alpha * acc[r][j];
                if (p.beta != 0.0) {
                    v = fma(p.beta, c[idx], v);
                }
                c[idx] = v;
            }
        }
    }
}

// The (column tile, row tile, batch entry) of a workgroup. With upper_from or
// lower_to, the grid is one row of the tiles batch entries need (one row tile each;
// entry z's column tiles [first, end) of tile_range), entry after entry; the host keeps
// wid.x in range.
fn grid_position(wid: vec3<u32>) -> vec3<u32> {
    if (p.upper_from == 0u && p.lower_to == 0u) {
        return wid;
    }
    var x = wid.x;
    var z = 0u;
    loop {
        let range = tile_range(z);
        if (x < range.y - range.x) {
            return vec3<u32>(range.x + x, 0u, z);
        }
        x -= range.y - range.x;
        z += 1u;
    }
    return wid;
}

// The column tiles [x, y) that batch entry z needs (see upper_from, lower_to).
fn tile_range(entry: u32) -> vec2<u32> {
    var z = entry;
    if (p.period != 0u) {
        z = entry % p.period;
    }
    let tiles = (p.n + TILE - 1u) / TILE;
    var end = tiles;
    if (p.lower_to != 0u) {
        end = min(tiles, ((z + 1u) * p.lower_to + TILE - 1u) / TILE);
    }
    return vec2<u32>(z * p.upper_from / TILE, end);
}

// --- Entry points: the same loop with the four combinations of load paths.

@compute @workgroup_size(THREADS)
fn gemm_ss(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    var acc: array<vec4<f32>, 4>;
    var ra = fetch_a_s(t, lid, t.k_begin);
    var rb = fetch_b_s(t, lid, t.k_begin);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
        put_a_s(lid, ra);
        put_b_s(lid, rb);
        workgroupBarrier();
        if (k0 + BK < t.k_end) {
            ra = fetch_a_s(t, lid, k0 + BK);
            rb = fetch_b_s(t, lid, k0 + BK);
        }
        multiply(lid, &acc);
        workgroupBarrier();
    }
    store(t, lid, acc);
}

@compute @workgroup_size(THREADS)
fn gemm_vs(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    var acc: array<vec4<f32>, 4>;
    var ra = fetch_a_v(t, lid, t.k_begin);
    var rb = fetch_b_s(t, lid, t.k_begin);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
        put_a_v(lid, ra);
        put_b_s(lid, rb);
        workgroupBarrier();
        if (k0 + BK < t.k_end) {
            ra = fetch_a_v(t, lid, k0 + BK);
            rb = fetch_b_s(t, lid, k0 + BK);
        }
        multiply(lid, &acc);
        workgroupBarrier();
    }
    store(t, lid, acc);
}

@compute @workgroup_size(THREADS)
fn gemm_sv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    var acc: array<vec4<f32>, 4>;
    var ra = fetch_a_s(t, lid, t.k_begin);
    var rb = fetch_b_v(t, lid, t.k_begin);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
        put_a_s(lid, ra);
        put_b_v(lid, rb);
        workgroupBarrier();
        if (k0 + BK < t.k_end) {
            ra = fetch_a_s(t, lid, k0 + BK);
            rb = fetch_b_v(t, lid, k0 + BK);
        }
        multiply(lid, &acc);
        workgroupBarrier();
    }
    store(t, lid, acc);
}

@compute @workgroup_size(THREADS)
fn gemm_vv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    var acc: array<vec4<f32>, 4>;
    var ra = fetch_a_v(t, lid, t.k_begin);
    var rb = fetch_b_v(t, lid, t.k_begin);
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
        put_a_v(lid, ra);
        put_b_v(lid, rb);
        workgroupBarrier();
        if (k0 + BK < t.k_end) {
            ra = fetch_a_v(t, lid, k0 + BK);
            rb = fetch_b_v(t, lid, k0 + BK);
        }
        multiply(lid, &acc);
        workgroupBarrier();
    }
    store(t, lid, acc);
}

// --- Short K (the host picks these for 1 <= K <= 32): no workgroup memory and no
// barrier. A workgroup computes the same TILE x TILE tile of C as above (same grid,
// same upper_from / lower_to tile skipping) with THREADS8 = (TILE / 8)^2 invocations,
// each owning an 8 x 8 block of it (rows 8 (lid / G8) + 0..7, columns 8 (lid % G8) +
// 0..7). It reads its 8 rows of op(A) and 8 columns of op(B) straight from storage, 4
// values of K at a time (with K <= 32 they stay in cache), and adds the products in
// the order of `multiply` (k ascending, one fma each, from 0), so its results are
// bitwise those of the staged kernels.
//
// Why: a CPU driver (lavapipe) runs every load whose address differs between
// invocations one invocation at a time, and pays for each barrier. For K = 32 the
// staged 32 x 32 kernel does 4 K slices of 2 barriers each and 2 such loads (of
// workgroup memory) per 16 multiply-adds; this one 16 per 64. The code is written out
// without loops over the register block: lavapipe does not unroll such loops, and an
// indexed register array then lives in per-invocation memory (the same 8 x 8 kernel
// written with loops was slower than the staged one: 3.9 against 3.3 ms for a
// 32 x 256 x 32 product batched 16 times; written out 1.7 ms, with the element-wise
// store below 1.2 ms, with its single masked access about 1.0 ms). Indices are clamped into op(A) and op(B) instead of branching
// (rows and columns past the product compute values nobody stores); values past K are
// zero in both operands.

// Side of the grid of invocations, each owning 8 x 8 values of the C tile.
override G8: u32 = TILE / 8u;
override THREADS8: u32 = G8 * G8;

// Four values of K of an invocation's operands: for op(A) c[2 kk + h] = op(A)[i0 + 4 h
// + 0..3, k0 + kk], for op(B) c[2 kk + h] = op(B)[k0 + kk, j0 + 4 h + 0..3].
alias Chunk = array<vec4<f32>, 8>;
// An invocation's 8 x 8 block of C: acc[2 r + h] = C[i0 + r, j0 + 4 h + 0..3].
alias Block8 = array<vec4<f32>, 16>;

// op(A)[i, k] with the indices clamped into op(A); zero for k >= K.
fn op_a_s(t: Tile, i: u32, k: u32) -> f32 {
    let gm = min(i, p.m - 1u);
    let gk = min(k, t.k_end - 1u);
    var v: f32;
    if (TRANS_A) {
        v = a_s[t.base_a + gk * p.lda + gm];
    } else {
        v = a_s[t.base_a + gm * p.lda + gk];
    }
    return select(0.0, v, k < t.k_end);
}

fn a_col_s(t: Tile, i: u32, k: u32) -> vec4<f32> {
    return vec4<f32>(op_a_s(t, i, k), op_a_s(t, i + 1u, k), op_a_s(t, i + 2u, k),
                     op_a_s(t, i + 3u, k));
}

fn a_chunk_s(t: Tile, i0: u32, k0: u32) -> Chunk {
    let i1 = i0 + 4u;
    return Chunk(a_col_s(t, i0, k0), a_col_s(t, i1, k0), a_col_s(t, i0, k0 + 1u),
                 a_col_s(t, i1, k0 + 1u), a_col_s(t, i0, k0 + 2u), a_col_s(t, i1, k0 + 2u),
                 a_col_s(t, i0, k0 + 3u), a_col_s(t, i1, k0 + 3u));
}

// TRANS_A, vec4 loads (M a multiple of 4): op(A)[i .. i + 3, k], a row of the stored
// K x M matrix; zero for k >= K.
fn a_quad_t(t: Tile, i: u32, k: u32) -> vec4<f32> {
    let v = a_v[(t.base_a + min(k, t.k_end - 1u) * p.lda + min(i, p.m - 4u)) / 4u];
    return select(vec4<f32>(0.0), v, k < t.k_end);
}

// Without TRANS_A, vec4 loads (K a multiple of 4): op(A)[i, k0 .. k0 + 3], a row of the
// stored M x K matrix.
fn a_quad_n(t: Tile, i: u32, k0: u32) -> vec4<f32> {
    return a_v[(t.base_a + min(i, p.m - 1u) * p.lda + k0) / 4u];
}

fn a_chunk_v(t: Tile, i0: u32, k0: u32) -> Chunk {
    let i1 = i0 + 4u;
    if (TRANS_A) {
        return Chunk(a_quad_t(t, i0, k0), a_quad_t(t, i1, k0), a_quad_t(t, i0, k0 + 1u),
                     a_quad_t(t, i1, k0 + 1u), a_quad_t(t, i0, k0 + 2u),
                     a_quad_t(t, i1, k0 + 2u), a_quad_t(t, i0, k0 + 3u),
                     a_quad_t(t, i1, k0 + 3u));
    }
    let r0 = a_quad_n(t, i0, k0);
    let r1 = a_quad_n(t, i0 + 1u, k0);
    let r2 = a_quad_n(t, i0 + 2u, k0);
    let r3 = a_quad_n(t, i0 + 3u, k0);
    let r4 = a_quad_n(t, i1, k0);
    let r5 = a_quad_n(t, i1 + 1u, k0);
    let r6 = a_quad_n(t, i1 + 2u, k0);
    let r7 = a_quad_n(t, i1 + 3u, k0);
    return Chunk(vec4<f32>(r0.x, r1.x, r2.x, r3.x), vec4<f32>(r4.x, r5.x, r6.x, r7.x),
                 vec4<f32>(r0.y, r1.y, r2.y, r3.y), vec4<f32>(r4.y, r5.y, r6.y, r7.y),
                 vec4<f32>(r0.z, r1.z, r2.z, r3.z), vec4<f32>(r4.z, r5.z, r6.z, r7.z),
                 vec4<f32>(r0.w, r1.w, r2.w, r3.w), vec4<f32>(r4.w, r5.w, r6.w, r7.w));
}

// op(B)[k, j] with the indices clamped into op(B); zero for k >= K.
fn op_b_s(t: Tile, k: u32, j: u32) -> f32 {
    let gn = min(j, p.n - 1u);
    let gk = min(k, t.k_end - 1u);
    var v: f32;
    if (TRANS_B) {
        v = b_s[t.base_b + gn * p.ldb + gk];
    } else {
        v = b_s[t.base_b + gk * p.ldb + gn];
    }
    return select(0.0, v, k < t.k_end);
}

fn b_row_s(t: Tile, k: u32, j: u32) -> vec4<f32> {
    return vec4<f32>(op_b_s(t, k, j), op_b_s(t, k, j + 1u), op_b_s(t, k, j + 2u),
                     op_b_s(t, k, j + 3u));
}

fn b_chunk_s(t: Tile, j0: u32, k0: u32) -> Chunk {
    let j1 = j0 + 4u;
    return Chunk(b_row_s(t, k0, j0), b_row_s(t, k0, j1), b_row_s(t, k0 + 1u, j0),
                 b_row_s(t, k0 + 1u, j1), b_row_s(t, k0 + 2u, j0), b_row_s(t, k0 + 2u, j1),
                 b_row_s(t, k0 + 3u, j0), b_row_s(t, k0 + 3u, j1));
}

// Without TRANS_B, vec4 loads (N a multiple of 4): op(B)[k, j .. j + 3], a row of the
// stored K x N matrix; zero for k >= K.
fn b_quad_n(t: Tile, k: u32, j: u32) -> vec4<f32> {
    let v = b_v[(t.base_b + min(k, t.k_end - 1u) * p.ldb + min(j, p.n - 4u)) / 4u];
    return select(vec4<f32>(0.0), v, k < t.k_end);
}

// TRANS_B, vec4 loads (K a multiple of 4): op(B)[k0 .. k0 + 3, j], a row of the stored
// N x K matrix.
fn b_quad_t(t: Tile, k0: u32, j: u32) -> vec4<f32> {
    return b_v[(t.base_b + min(j, p.n - 1u) * p.ldb + k0) / 4u];
}

fn b_chunk_v(t: Tile, j0: u32, k0: u32) -> Chunk {
    let j1 = j0 + 4u;
    if (!TRANS_B) {
        return Chunk(b_quad_n(t, k0, j0), b_quad_n(t, k0, j1), b_quad_n(t, k0 + 1u, j0),
                     b_quad_n(t, k0 + 1u, j1), b_quad_n(t, k0 + 2u, j0),
                     b_quad_n(t, k0 + 2u, j1), b_quad_n(t, k0 + 3u, j0),
                     b_quad_n(t, k0 + 3u, j1));
    }
    let c0 = b_quad_t(t, k0, j0);
    let c1 = b_quad_t(t, k0, j0 + 1u);
    let c2 = b_quad_t(t, k0, j0 + 2u);
    let c3 = b_quad_t(t, k0, j0 + 3u);
    let c4 = b_quad_t(t, k0, j1);
    let c5 = b_quad_t(t, k0, j1 + 1u);
    let c6 = b_quad_t(t, k0, j1 + 2u);
    let c7 = b_quad_t(t, k0, j1 + 3u);
    return Chunk(vec4<f32>(c0.x, c1.x, c2.x, c3.x), vec4<f32>(c4.x, c5.x, c6.x, c7.x),
                 vec4<f32>(c0.y, c1.y, c2.y, c3.y), vec4<f32>(c4.y, c5.y, c6.y, c7.y),
                 vec4<f32>(c0.z, c1.z, c2.z, c3.z), vec4<f32>(c4.z, c5.z, c6.z, c7.z),
                 vec4<f32>(c0.w, c1.w, c2.w, c3.w), vec4<f32>(c4.w, c5.w, c6.w, c7.w));
}

// acc[2 r + h] += a[r] · b[h] for one value of K: a = (lo, hi) the 8 values of op(A),
// b = (lo, hi) those of op(B).
fn rank1(acc: ptr<function, Block8>, alo: vec4<f32>, ahi: vec4<f32>, blo: vec4<f32>,
         bhi: vec4<f32>) {
    (*acc)[0] = fma(vec4<f32>(alo.x), blo, (*acc)[0]);
    (*acc)[1] = fma(vec4<f32>(alo.x), bhi, (*acc)[1]);
    (*acc)[2] = fma(vec4<f32>(alo.y), blo, (*acc)[2]);
    (*acc)[3] = fma(vec4<f32>(alo.y), bhi, (*acc)[3]);
    (*acc)[4] = fma(vec4<f32>(alo.z), blo, (*acc)[4]);
    (*acc)[5] = fma(vec4<f32>(alo.z), bhi, (*acc)[5]);
    (*acc)[6] = fma(vec4<f32>(alo.w), blo, (*acc)[6]);
    (*acc)[7] = fma(vec4<f32>(alo.w), bhi, (*acc)[7]);
    (*acc)[8] = fma(vec4<f32>(ahi.x), blo, (*acc)[8]);
    (*acc)[9] = fma(vec4<f32>(ahi.x), bhi, (*acc)[9]);
    (*acc)[10] = fma(vec4<f32>(ahi.y), blo, (*acc)[10]);
    (*acc)[11] = fma(vec4<f32>(ahi.y), bhi, (*acc)[11]);
    (*acc)[12] = fma(vec4<f32>(ahi.z), blo, (*acc)[12]);
    (*acc)[13] = fma(vec4<f32>(ahi.z), bhi, (*acc)[13]);
    (*acc)[14] = fma(vec4<f32>(ahi.w), blo, (*acc)[14]);
    (*acc)[15] = fma(vec4<f32>(ahi.w), bhi, (*acc)[15]);
}

// The four values of K of a chunk, in order.
fn rank4(acc: ptr<function, Block8>, a: Chunk, b: Chunk) {
    rank1(acc, a[0], a[1], b[0], b[1]);
    rank1(acc, a[2], a[3], b[2], b[3]);
    rank1(acc, a[4], a[5], b[4], b[5]);
    rank1(acc, a[6], a[7], b[6], b[7]);
}

// C[i, j] = α v + β C[i, j] when (i, j) lies inside C. C is read at clamped indices
// and the value discarded when β = 0, so that the store is the only masked access.
fn store_one(t: Tile, i: u32, j: u32, v: f32) {
    let idx = t.base_c + min(i, p.m - 1u) * p.ldc + min(j, p.n - 1u);
    let w = p.alpha * v;
    let result = select(w, fma(p.beta, c[idx], w), p.beta != 0.0);
    if (i < p.m && j < p.n) {
        c[idx] = result;
    }
}

// C[i, j0 .. j0 + 7] from (lo, hi).
fn store_row8(t: Tile, i: u32, j0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    store_one(t, i, j0, lo.x);
    store_one(t, i, j0 + 1u, lo.y);
    store_one(t, i, j0 + 2u, lo.z);
    store_one(t, i, j0 + 3u, lo.w);
    store_one(t, i, j0 + 4u, hi.x);
    store_one(t, i, j0 + 5u, hi.y);
    store_one(t, i, j0 + 6u, hi.z);
    store_one(t, i, j0 + 7u, hi.w);
}

fn store8(t: Tile, i0: u32, j0: u32, acc: ptr<function, Block8>) {
    store_row8(t, i0, j0, (*acc)[0], (*acc)[1]);
    store_row8(t, i0 + 1u, j0, (*acc)[2], (*acc)[3]);
    store_row8(t, i0 + 2u, j0, (*acc)[4], (*acc)[5]);
    store_row8(t, i0 + 3u, j0, (*acc)[6], (*acc)[7]);
    store_row8(t, i0 + 4u, j0, (*acc)[8], (*acc)[9]);
    store_row8(t, i0 + 5u, j0, (*acc)[10], (*acc)[11]);
    store_row8(t, i0 + 6u, j0, (*acc)[12], (*acc)[13]);
    store_row8(t, i0 + 7u, j0, (*acc)[14], (*acc)[15]);
}

@compute @workgroup_size(THREADS8)
fn gemm_short_ss(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    let i0 = t.m0 + 8u * (lid / G8);
    let j0 = t.n0 + 8u * (lid % G8);
    var acc: Block8;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += 4u) {
        rank4(&acc, a_chunk_s(t, i0, k0), b_chunk_s(t, j0, k0));
    }
    store8(t, i0, j0, &acc);
}

@compute @workgroup_size(THREADS8)
fn gemm_short_vs(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    let i0 = t.m0 + 8u * (lid / G8);
    let j0 = t.n0 + 8u * (lid % G8);
    var acc: Block8;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += 4u) {
        rank4(&acc, a_chunk_v(t, i0, k0), b_chunk_s(t, j0, k0));
    }
    store8(t, i0, j0, &acc);
}

@compute @workgroup_size(THREADS8)
fn gemm_short_sv(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    let i0 = t.m0 + 8u * (lid / G8);
    let j0 = t.n0 + 8u * (lid % G8);
    var acc: Block8;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += 4u) {
        rank4(&acc, a_chunk_s(t, i0, k0), b_chunk_v(t, j0, k0));
    }
    store8(t, i0, j0, &acc);
}

@compute @workgroup_size(THREADS8)
fn gemm_short_vv(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = tile_of(grid_position(wid));
    let i0 = t.m0 + 8u * (lid / G8);
    let j0 = t.n0 + 8u * (lid % G8);
    var acc: Block8;
    for (var k0 = t.k_begin; k0 < t.k_end; k0 += 4u) {
        rank4(&acc, a_chunk_v(t, i0, k0), b_chunk_v(t, j0, k0));
    }
    store8(t, i0, j0, &acc);
}

// --- Split-K, second step: C[b] = alpha * sum_s P[b * splits + s] + beta * C[b], the
// partial products P (packed m x n matrices, binding 0) added in slice order.
// Grid as in `grid_1d`: one invocation per element of the batch of C matrices.

struct SplitKSumParams {
    m: u32,
    n: u32,
    batch: u32,
    splits: u32,
    ldc: u32,
    offset_c: u32,
    stride_c: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(1) var<storage, read_write> c_sum: array<f32>;
@group(0) @binding(2) var<storage, read> sp: SplitKSumParams;

@compute @workgroup_size(256)
fn split_k_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = (wid.x + wid.y * nwg.x) * 256u + lid;
    let mn = sp.m * sp.n;
    if (e >= sp.batch * mn) {
        return;
    }
    let b = e / mn;
    let ij = e % mn;
    var s = 0.0;
    for (var slice = 0u; slice < sp.splits; slice++) {
        s += a_s[(b * sp.splits + slice) * mn + ij];
    }
    let idx = sp.offset_c + b * sp.stride_c + (ij / sp.n) * sp.ldc + ij % sp.n;
    var v = sp.alpha * s;
    if (sp.beta != 0.0) {
        v = fma(sp.beta, c_sum[idx], v);
    }
    c_sum[idx] = v;
}

// --- Matrix-vector products, for GEMMs with m = 1 or n = 1 (a 64 x 64 tile would do
// 64 times the work): y = alpha * M x + beta * y over `outputs` entries of y, the inner
// dimension K cut into slices as for split-K (y matrix wid.z = batch index * splits +
// slice). MATRIX_IS_B says which binding holds M; the other holds x, and y is C.

struct GemvParams {
    outputs: u32,
    k: u32,
    ld_m: u32,
    offset_m: u32,
    stride_m: u32,
    offset_x: u32,
    inc_x: u32,
    stride_x: u32,
    offset_y: u32,
    inc_y: u32,
    stride_y: u32,
    alpha: f32,
    beta: f32,
    splits: u32,
    k_split: u32,
}

override MATRIX_IS_B: bool = false;

@group(0) @binding(3) var<storage, read> gp: GemvParams;

var<workgroup> gemv_sums: array<f32, 256>;

struct GemvTile {
    base_m: u32,
    base_x: u32,
    base_y: u32,
    k_begin: u32,
    k_end: u32,
}

fn gemv_tile(z: u32) -> GemvTile {
    let b = z / gp.splits;
    let k_begin = (z % gp.splits) * gp.k_split;
    return GemvTile(gp.offset_m + b * gp.stride_m, gp.offset_x + b * gp.stride_x,
                    gp.offset_y + z * gp.stride_y, k_begin, min(gp.k, k_begin + gp.k_split));
}

fn gemv_matrix(i: u32) -> f32 {
    if (MATRIX_IS_B) {
        return b_s[i];
    }
    return a_s[i];
}

fn gemv_vector(i: u32) -> f32 {
    if (MATRIX_IS_B) {
        return a_s[i];
    }
    return b_s[i];
}

fn gemv_write(t: GemvTile, o: u32, s: f32) {
    let idx = t.base_y + o * gp.inc_y;
    var v = gp.alpha * s;
    if (gp.beta != 0.0) {
        v = fma(gp.beta, c[idx], v);
    }
    c[idx] = v;
}

// M[o][l] at base_m + l * ld_m + o: the outputs are contiguous. A workgroup takes 64
// outputs x 4 lanes; lane l adds k = l, l + 4, ... in order, then (l0 + l1) + (l2 + l3).
@compute @workgroup_size(256)
fn gemv_t(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let t = gemv_tile(wid.z);
    let o = (wid.x + wid.y * nwg.x) * 64u + lid % 64u;
    let lane = lid / 64u;
    var s = 0.0;
    if (o < gp.outputs) {
        for (var l = t.k_begin + lane; l < t.k_end; l += 4u) {
            s = fma(gemv_matrix(t.base_m + l * gp.ld_m + o), gemv_vector(t.base_x + l * gp.inc_x), s);
        }
    }
    gemv_sums[lid] = s;
    workgroupBarrier();
    if (lane % 2u == 0u) {
        gemv_sums[lid] = gemv_sums[lid] + gemv_sums[lid + 64u];
    }
    workgroupBarrier();
    if (lane == 0u && o < gp.outputs) {
        gemv_write(t, o, gemv_sums[lid] + gemv_sums[lid + 128u]);
    }
}

// M[o][l] at base_m + o * ld_m + l: each output is a dot product of contiguous values.
// A workgroup takes 4 outputs x 64 lanes; lane l adds k = l, l + 64, ... in order,
// then a binary tree adds the 64 lane sums.
@compute @workgroup_size(256)
fn gemv_n(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let t = gemv_tile(wid.z);
    let o = (wid.x + wid.y * nwg.x) * 4u + lid / 64u;
    let lane = lid % 64u;
    var s = 0.0;
    if (o < gp.outputs) {
        for (var l = t.k_begin + lane; l < t.k_end; l += 64u) {
            s = fma(gemv_matrix(t.base_m + o * gp.ld_m + l), gemv_vector(t.base_x + l * gp.inc_x), s);
        }
    }
    gemv_sums[lid] = s;
    workgroupBarrier();
    for (var width = 32u; width > 0u; width /= 2u) {
        if (lane < width) {
            gemv_sums[lid] = gemv_sums[lid] + gemv_sums[lid + width];
        }
        workgroupBarrier();
    }
    if (lane == 0u && o < gp.outputs) {
        gemv_write(t, o, gemv_sums[lid]);
    }
}
