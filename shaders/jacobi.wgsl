// Symmetric eigendecomposition by parallel (round-robin ordered) cyclic Jacobi.
// Bindings follow src/gpu/pipeline.rs: reads, then writes, then params. Every entry
// point declares its own bindings; they share the (group, binding) slots.
//
// Layouts (row-major, f32):
//   a       [batch, n, n]  the symmetric input; only its symmetric part (A + Aᵀ)/2 is used
//   v0      [n, n] or [batch, n, n]  a starting eigenbasis, COLUMNS are vectors (warm start)
//   work_a  [batch, n, n]  the matrix being diagonalised, kept exactly symmetric
//   work_w  [batch, n, n]  W = Vᵀ: ROW i of W is the current approximation of eigenvector i
//   values  [batch, n]     eigenvalues, ascending
//   vectors [batch, n, n]  column j is the eigenvector of values[j]
//
// Every path: `global_init_a` and `global_init_w` (work_a, work_w), sweeps, then
// `global_rank`, optionally `global_combine` (re-orthogonalisation) and `global_gather`
// (sort).
//
// Windows: a matrix larger than one storage binding is bound as three windows of
// `window` elements each (consecutive ranges of its flat index; a matrix that fits is
// bound three times, and only the first is read). The kernels of the global and blocked
// paths reach such tensors through the accessors of the "Binding windows" section; the
// workgroup path and `global_rotations` / `global_apply` bind one window.
//
// The warm start's V0ᵀ A V0 and the Newton–Schulz products are GEMMs of
// shaders/gemm.wgsl (cut into windows there too). One sweep is m - 1 steps (m = n
// rounded up to even). Step k pairs the indices by the round-robin tournament of
// `pair_of`, so the h = m/2 rotations of a step are disjoint and run in parallel; over a
// sweep every pair (p, q) meets exactly once. For odd n the index n is a phantom whose rotation is the identity.
// A step updates A ← Jᵀ A J and W ← Jᵀ W for the product J of the step's rotations.
//
// The rotation that zeroes a_pq is Rutishauser's stable form:
//   θ = (a_qq − a_pp) / (2 a_pq),  t = sign(θ) / (|θ| + sqrt(θ² + 1)),
//   c = 1 / sqrt(t² + 1),  s = t c,  τ = s / (1 + c),
//   a_pp ← a_pp − t a_pq,  a_qq ← a_qq + t a_pq,  a_pq ← 0,
//   other pairs (x, y) of rows/columns p, q:  x ← x − s (y + τ x),  y ← y + s (x − τ y).

// The rotation (c, s, t, τ) that zeroes a_pq; the identity when a_pq is already zero.
fn rotation(app: f32, aqq: f32, apq: f32) -> vec4<f32> {
    if (apq == 0.0) {
        return vec4<f32>(1.0, 0.0, 0.0, 0.0);
    }
    let theta = (aqq - app) / (2.0 * apq);
    var t: f32;
    if (abs(theta) > 1e18) {
        // θ² + 1 would overflow; t = 1 / (2θ) to working precision.
        t = 0.5 / theta;
    } else {
        t = select(-1.0, 1.0, theta >= 0.0) / (abs(theta) + sqrt(theta * theta + 1.0));
    }
    let c = 1.0 / sqrt(t * t + 1.0);
    let s = t * c;
    return vec4<f32>(c, s, t, s / (1.0 + c));
}

// Applies the rotation r = (c, s, t, τ) to the pair (x, y): (c x − s y, s x + c y).
fn rotate(x: f32, y: f32, r: vec4<f32>) -> vec2<f32> {
    return vec2<f32>(x - r.y * (y + r.w * x), y + r.y * (x - r.w * y));
}

// The 2×2 block b = (a_pr, a_pu, a_qr, a_qu) of rows (p, q) and columns (r, u) after
// rows are rotated by ri and columns by rj: Riᵀ B Rj.
fn rotate_block(b: vec4<f32>, ri: vec4<f32>, rj: vec4<f32>) -> vec4<f32> {
    let c0 = rotate(b.x, b.z, ri);
    let c1 = rotate(b.y, b.w, ri);
    let r0 = rotate(c0.x, c1.x, rj);
    let r1 = rotate(c0.y, c1.y, rj);
    return vec4<f32>(r0.x, r0.y, r1.x, r1.y);
}

// The pair (p, q), p < q, of slot j in step k of the round-robin over m (even) indices:
// index m − 1 stays put, the others rotate by one position per step.
fn pair_of(k: u32, j: u32, m: u32) -> vec2<u32> {
    let r = m - 1u;
    var p = k;
    var q = r;
    if (j != 0u) {
        p = (k + j) % r;
        q = (k + r - j) % r;
    }
    return vec2<u32>(min(p, q), max(p, q));
}

// Whether x is neither NaN nor ±Inf, by its bits (WGSL lets implementations assume
// that floats are finite, so a float comparison cannot tell).
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// Sort key: NaN sorts last, so the ranks below are a permutation whatever the input.
fn sort_key(x: f32) -> f32 {
    return select(x, 3.0e38, x != x);
}

// Whether key kj with index j sorts before key ki with index i (ties by index).
fn before(kj: f32, j: u32, ki: f32, i: u32) -> bool {
    return kj < ki || (kj == ki && j < i);
}

// ---------------------------------------------------------------------------------
// Workgroup path: one workgroup per matrix runs one whole sweep per dispatch on the
// work_a / work_w prepared by `global_init`; the host records max_sweeps + 1 of these
// dispatches into one pass. Each begins with the convergence test, and once a matrix is
// done every later dispatch returns at once. (One sweep per dispatch rather than all of
// them: the software Vulkan driver ends every loop of an invocation once the invocation
// has run 65535 loop iterations in total.)
//
//   info [batch, 4] = (sweeps done, ‖offdiag(A)‖_F / ‖A‖_F at the last test, done,
//                      1 if A held NaN or Inf at a test, else 0)

struct SweepParams {
    n: u32,
    batch: u32,
    max_sweeps: u32,
    tol: f32,
}

const WG: u32 = 256u;
// Largest n of `jacobi_sweep_shared` (A and W both in workgroup memory).
const SHARED_N: u32 = 32u;
// Largest number of pairs per step of the workgroup kernels (n ≤ 256).
const MAX_PAIRS: u32 = 128u;

var<workgroup> wg_rot: array<vec4<f32>, MAX_PAIRS>;
// The index pair of each rotation of the current step.
var<workgroup> wg_pair: array<vec2<u32>, MAX_PAIRS>;
var<workgroup> wg_off: array<f32, WG>;
var<workgroup> wg_tot: array<f32, WG>;
var<workgroup> wg_done: u32;
var<workgroup> wg_bad: atomic<u32>;

// The stopping rule (the host applies the same one on the global path).
fn stop(off: f32, sweeps: u32, max_sweeps: u32, tol: f32) -> bool {
    return sweeps >= max_sweeps || off <= tol;
}

// Sums wg_off and wg_tot over the workgroup into element 0 (fixed order, deterministic).
fn reduce_norms(lid: u32, threads: u32) {
    for (var stride = threads / 2u; stride > 0u; stride = stride / 2u) {
        workgroupBarrier();
        if (lid < stride) {
            wg_off[lid] += wg_off[lid + stride];
            wg_tot[lid] += wg_tot[lid + stride];
        }
    }
    workgroupBarrier();
}

// After reduce_norms: records the relative off-norm of matrix b in info, decides whether
// to stop (also when A held NaN or Inf), and returns that to the whole workgroup.
fn test_convergence(lid: u32, b: u32, params: SweepParams) -> bool {
    if (lid == 0u) {
        let bad = atomicLoad(&wg_bad) != 0u;
        let off = sqrt(wg_off[0] / max(wg_tot[0], 1e-38));
        let done = bad || stop(off, u32(ws_info[b * 4u]), params.max_sweeps, params.tol);
        ws_info[b * 4u + 1u] = off;
        ws_info[b * 4u + 2u] = select(0.0, 1.0, done);
        ws_info[b * 4u + 3u] = select(0.0, 1.0, bad);
        wg_done = select(0u, 1u, done);
    }
    return workgroupUniformLoad(&wg_done) != 0u;
}

// Whether matrix b was already done before this dispatch (uniform over the workgroup);
// also clears wg_bad for the coming test.
fn already_done(lid: u32, b: u32) -> bool {
    if (lid == 0u) {
        wg_done = select(0u, 1u, ws_info[b * 4u + 2u] != 0.0);
        atomicStore(&wg_bad, 0u);
    }
    return workgroupUniformLoad(&wg_done) != 0u;
}

@group(0) @binding(0) var<storage, read_write> ws_work_a: array<f32>;
@group(0) @binding(1) var<storage, read_write> ws_work_w: array<f32>;
@group(0) @binding(2) var<storage, read_write> ws_info: array<f32>;
@group(0) @binding(3) var<storage, read> ws_params: SweepParams;

var<workgroup> wg_a: array<f32, SHARED_N * SHARED_N>;
var<workgroup> wg_w: array<f32, SHARED_N * SHARED_N>;

// One sweep (m − 1 round-robin steps) on the n × n matrix in wg_a (stride n), rows of
// its basis in wg_w rotated alongside (n ≤ SHARED_N). Starts and ends with a barrier
// between all reads and writes of wg_a and wg_w.
fn shared_sweep(n: u32, lid: u32) {
    workgroupBarrier();
    let m = n + (n & 1u);
    let h = m / 2u;
    let a_first = first_item(lid, h);
    let w_first = first_item(lid, n);
    for (var k = 0u; k + 1u < m; k++) {
        if (lid < h) {
            let pq = pair_of(k, lid, m);
            var rot = vec4<f32>(1.0, 0.0, 0.0, 0.0);
            if (pq.y < n) {
                rot = rotation(wg_a[pq.x * n + pq.x], wg_a[pq.y * n + pq.y], wg_a[pq.x * n + pq.y]);
            }
            wg_rot[lid] = rot;
            wg_pair[lid] = pq;
        }
        workgroupBarrier();
        // Blocks (i, j) of A, i ≤ j (i > j idles), then (slot, column) items of W.
        var it = a_first;
        for (var e = lid; e < h * h; e += WG) {
            if (it.x <= it.y) {
                let i = it.x;
                let j = it.y;
                let pq = wg_pair[i];
                let ru = wg_pair[j];
                if (i == j) {
                    if (pq.y < n) {
                        let apq = wg_a[pq.x * n + pq.y];
                        let t = wg_rot[i].z;
                        wg_a[pq.x * n + pq.x] -= t * apq;
                        wg_a[pq.y * n + pq.y] += t * apq;
                        wg_a[pq.x * n + pq.y] = 0.0;
                        wg_a[pq.y * n + pq.x] = 0.0;
                    }
                } else {
                    // The phantom index n reads as zero and is never written.
                    let in_q = pq.y < n;
                    let in_u = ru.y < n;
                    var blk = vec4<f32>(wg_a[pq.x * n + ru.x], 0.0, 0.0, 0.0);
                    if (in_u) {
                        blk.y = wg_a[pq.x * n + ru.y];
                    }
                    if (in_q) {
                        blk.z = wg_a[pq.y * n + ru.x];
                    }
                    if (in_q && in_u) {
                        blk.w = wg_a[pq.y * n + ru.y];
                    }
                    let out = rotate_block(blk, wg_rot[i], wg_rot[j]);
                    wg_a[pq.x * n + ru.x] = out.x;
                    wg_a[ru.x * n + pq.x] = out.x;
                    if (in_u) {
                        wg_a[pq.x * n + ru.y] = out.y;
                        wg_a[ru.y * n + pq.x] = out.y;
                    }
                    if (in_q) {
                        wg_a[pq.y * n + ru.x] = out.z;
                        wg_a[ru.x * n + pq.y] = out.z;
                    }
                    if (in_q && in_u) {
                        wg_a[pq.y * n + ru.y] = out.w;
                        wg_a[ru.y * n + pq.y] = out.w;
                    }
                }
            }
            it = next_item(it, h);
        }
        it = w_first;
        for (var e = lid; e < h * n; e += WG) {
            let pq = wg_pair[it.x];
            let r = it.y;
            if (pq.y < n) {
                let v = rotate(wg_w[pq.x * n + r], wg_w[pq.y * n + r], wg_rot[it.x]);
                wg_w[pq.x * n + r] = v.x;
                wg_w[pq.y * n + r] = v.y;
            }
            it = next_item(it, n);
        }
        workgroupBarrier();
    }
}

// (row, column) of item lid of a row-major grid with rows of `cols` items, with the
// step (WG / cols, WG % cols) to the item WG further; `next_item` takes that step, so
// the sweeps walk their grids without an integer division per item.
fn first_item(lid: u32, cols: u32) -> vec4<u32> {
    return vec4<u32>(lid / cols, lid % cols, WG / cols, WG % cols);
}

fn next_item(it: vec4<u32>, cols: u32) -> vec4<u32> {
    var i = it.x + it.z;
    var j = it.y + it.w;
    if (j >= cols) {
        j -= cols;
        i += 1u;
    }
    return vec4<u32>(i, j, it.z, it.w);
}

// n ≤ 32: one sweep with A and W copied into workgroup memory (stride n) and back.
@compute @workgroup_size(256)
fn jacobi_sweep_shared(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let b = wid.x + wid.y * nwg.x;
    let n = ws_params.n;
    if (b >= ws_params.batch || n > SHARED_N || already_done(lid, b)) {
        return;
    }
    let nn = n * n;
    let base = b * nn;
    var off = 0.0;
    var tot = 0.0;
    for (var e = lid; e < nn; e += WG) {
        let x = ws_work_a[base + e];
        wg_a[e] = x;
        wg_w[e] = ws_work_w[base + e];
        tot += x * x;
        off += select(x * x, 0.0, e / n == e % n);
        if (!finite(x)) {
            atomicOr(&wg_bad, 1u);
        }
    }
    wg_off[lid] = off;
    wg_tot[lid] = tot;
    reduce_norms(lid, WG);
    if (test_convergence(lid, b, ws_params)) {
        return;
    }
    shared_sweep(n, lid);
    for (var e = lid; e < nn; e += WG) {
        ws_work_a[base + e] = wg_a[e];
        ws_work_w[base + e] = wg_w[e];
    }
    if (lid == 0u) {
        ws_info[b * 4u] += 1.0;
    }
}

// n ≤ 256: the same sweep on A and W in place in the storage buffers, with storage
// barriers between the phases of a step.
@compute @workgroup_size(256)
fn jacobi_sweep_storage(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let b = wid.x + wid.y * nwg.x;
    let n = ws_params.n;
    if (b >= ws_params.batch || n > 2u * MAX_PAIRS || already_done(lid, b)) {
        return;
    }
    let nn = n * n;
    let base = b * nn;
    var off = 0.0;
    var tot = 0.0;
    for (var e = lid; e < nn; e += WG) {
        let x = ws_work_a[base + e];
        tot += x * x;
        off += select(x * x, 0.0, e / n == e % n);
        if (!finite(x)) {
            atomicOr(&wg_bad, 1u);
        }
    }
    wg_off[lid] = off;
    wg_tot[lid] = tot;
    reduce_norms(lid, WG);
    if (test_convergence(lid, b, ws_params)) {
        return;
    }
    let m = n + (n & 1u);
    let h = m / 2u;
    let a_first = first_item(lid, h);
    let w_first = first_item(lid, n);
    for (var k = 0u; k + 1u < m; k++) {
        if (lid < h) {
            let pq = pair_of(k, lid, m);
            var rot = vec4<f32>(1.0, 0.0, 0.0, 0.0);
            if (pq.y < n) {
                rot = rotation(ws_work_a[base + pq.x * n + pq.x], ws_work_a[base + pq.y * n + pq.y],
                               ws_work_a[base + pq.x * n + pq.y]);
            }
            wg_rot[lid] = rot;
            wg_pair[lid] = pq;
        }
        workgroupBarrier();
        // Blocks (i, j) of A, i ≤ j (i > j idles), then (slot, column) items of W.
        var it = a_first;
        for (var e = lid; e < h * h; e += WG) {
            if (it.x <= it.y) {
                let i = it.x;
                let j = it.y;
                let pq = wg_pair[i];
                let ru = wg_pair[j];
                if (i == j) {
                    if (pq.y < n) {
                        let apq = ws_work_a[base + pq.x * n + pq.y];
                        let t = wg_rot[i].z;
                        ws_work_a[base + pq.x * n + pq.x] -= t * apq;
                        ws_work_a[base + pq.y * n + pq.y] += t * apq;
                        ws_work_a[base + pq.x * n + pq.y] = 0.0;
                        ws_work_a[base + pq.y * n + pq.x] = 0.0;
                    }
                } else {
                    let in_q = pq.y < n;
                    let in_u = ru.y < n;
                    var blk = vec4<f32>(ws_work_a[base + pq.x * n + ru.x], 0.0, 0.0, 0.0);
                    if (in_u) {
                        blk.y = ws_work_a[base + pq.x * n + ru.y];
                    }
                    if (in_q) {
                        blk.z = ws_work_a[base + pq.y * n + ru.x];
                    }
                    if (in_q && in_u) {
                        blk.w = ws_work_a[base + pq.y * n + ru.y];
                    }
                    let out = rotate_block(blk, wg_rot[i], wg_rot[j]);
                    ws_work_a[base + pq.x * n + ru.x] = out.x;
                    ws_work_a[base + ru.x * n + pq.x] = out.x;
                    if (in_u) {
                        ws_work_a[base + pq.x * n + ru.y] = out.y;
                        ws_work_a[base + ru.y * n + pq.x] = out.y;
                    }
                    if (in_q) {
                        ws_work_a[base + pq.y * n + ru.x] = out.z;
                        ws_work_a[base + ru.x * n + pq.y] = out.z;
                    }
                    if (in_q && in_u) {
                        ws_work_a[base + pq.y * n + ru.y] = out.w;
                        ws_work_a[base + ru.y * n + pq.y] = out.w;
                    }
                }
            }
            it = next_item(it, h);
        }
        it = w_first;
        for (var e = lid; e < h * n; e += WG) {
            let pq = wg_pair[it.x];
            let r = it.y;
            if (pq.y < n) {
                let v = rotate(ws_work_w[base + pq.x * n + r], ws_work_w[base + pq.y * n + r], wg_rot[it.x]);
                ws_work_w[base + pq.x * n + r] = v.x;
                ws_work_w[base + pq.y * n + r] = v.y;
            }
            it = next_item(it, n);
        }
        storageBarrier();
        workgroupBarrier();
    }
    if (lid == 0u) {
        ws_info[b * 4u] += 1.0;
    }
}

// ---------------------------------------------------------------------------------
// Binding windows of the global and blocked kernels (see the header): four sets of
// three windows, each at the same binding slots in every kernel that uses it, read and
// written through `*_get(i, window)` / `*_set(i, x, window)` with a flat index i.
// WINDOWED (an override) is false when every tensor of the call fits one window: the
// accessors then touch window 0 alone (on a SIMD driver each accessor otherwise runs
// the loads or stores of all three windows, masked).
//   src    bindings 0–2, read:  the input, V0, A, P or W (init, norms, rank, combine, gather)
//   dst    bindings 3–5:        work_a, work_w or W (init, combine)
//   mat_a  bindings 1–3:        the padded A (block_solve) or the source (block_gather)
//   mat_b  bindings 4–6:        vectors (global_gather) or the destination (block_gather)

override WINDOWED: bool = true;

@group(0) @binding(0) var<storage, read> src0: array<f32>;
@group(0) @binding(1) var<storage, read> src1: array<f32>;
@group(0) @binding(2) var<storage, read> src2: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst0: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst1: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst2: array<f32>;
@group(0) @binding(1) var<storage, read_write> mat_a0: array<f32>;
@group(0) @binding(2) var<storage, read_write> mat_a1: array<f32>;
@group(0) @binding(3) var<storage, read_write> mat_a2: array<f32>;
@group(0) @binding(4) var<storage, read_write> mat_b0: array<f32>;
@group(0) @binding(5) var<storage, read_write> mat_b1: array<f32>;
@group(0) @binding(6) var<storage, read_write> mat_b2: array<f32>;

fn src_get(i: u32, w: u32) -> f32 {
    if (!WINDOWED || i < w) {
        return src0[i];
    }
    if (i < 2u * w) {
        return src1[i - w];
    }
    return src2[i - 2u * w];
}

fn dst_get(i: u32, w: u32) -> f32 {
    if (!WINDOWED || i < w) {
        return dst0[i];
    }
    if (i < 2u * w) {
        return dst1[i - w];
    }
    return dst2[i - 2u * w];
}

fn dst_set(i: u32, x: f32, w: u32) {
    if (!WINDOWED || i < w) {
        dst0[i] = x;
    } else if (i < 2u * w) {
        dst1[i - w] = x;
    } else {
        dst2[i - 2u * w] = x;
    }
}

fn mat_a_get(i: u32, w: u32) -> f32 {
    if (!WINDOWED || i < w) {
        return mat_a0[i];
    }
    if (i < 2u * w) {
        return mat_a1[i - w];
    }
    return mat_a2[i - 2u * w];
}

fn mat_a_set(i: u32, x: f32, w: u32) {
    if (!WINDOWED || i < w) {
        mat_a0[i] = x;
    } else if (i < 2u * w) {
        mat_a1[i - w] = x;
    } else {
        mat_a2[i - 2u * w] = x;
    }
}

fn mat_b_get(i: u32, w: u32) -> f32 {
    if (!WINDOWED || i < w) {
        return mat_b0[i];
    }
    if (i < 2u * w) {
        return mat_b1[i - w];
    }
    return mat_b2[i - 2u * w];
}

fn mat_b_set(i: u32, x: f32, w: u32) {
    if (!WINDOWED || i < w) {
        mat_b0[i] = x;
    } else if (i < 2u * w) {
        mat_b1[i - w] = x;
    } else {
        mat_b2[i - 2u * w] = x;
    }
}

// ---------------------------------------------------------------------------------
// Global (any-size) path: every step is two dispatches over all matrices of the batch
// (`global_rotations`, then `global_apply`); a sweep is recorded into one pass followed
// by `global_norms`, whose partial sums the host adds up to test convergence.

struct GlobalParams {
    n: u32,
    batch: u32,
    // The step k of the sweep (rotations and apply); unused elsewhere.
    step: u32,
    has_v0: u32,
    v0_stride: u32,
    // Elements per binding window (see the header).
    window: u32,
}

@group(0) @binding(6) var<storage, read> ia_params: GlobalParams;

// work_a = (A + Aᵀ)/2, one invocation per element.
@compute @workgroup_size(256)
fn global_init_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let n = ia_params.n;
    let nn = n * n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= ia_params.batch * nn) {
        return;
    }
    let b = g / nn;
    let e = g % nn;
    let i = e / n;
    let r = e % n;
    let w = ia_params.window;
    dst_set(g, 0.5 * (src_get(g, w) + src_get(b * nn + r * n + i, w)), w);
}

@group(0) @binding(6) var<storage, read> iw_params: GlobalParams;

// work_w = V0ᵀ (or I), one invocation per element.
@compute @workgroup_size(256)
fn global_init_w(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let n = iw_params.n;
    let nn = n * n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= iw_params.batch * nn) {
        return;
    }
    let b = g / nn;
    let e = g % nn;
    let i = e / n;
    let r = e % n;
    let w = iw_params.window;
    if (iw_params.has_v0 != 0u) {
        dst_set(g, src_get(b * iw_params.v0_stride + r * n + i, w), w);
    } else {
        dst_set(g, select(0.0, 1.0, i == r), w);
    }
}

@group(0) @binding(0) var<storage, read> gr_work_a: array<f32>;
@group(0) @binding(1) var<storage, read_write> gr_rot: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gr_params: GlobalParams;

// rot[b, j] = the rotation of slot j of the step, one invocation per (matrix, slot).
@compute @workgroup_size(256)
fn global_rotations(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let n = gr_params.n;
    let m = n + (n & 1u);
    let h = m / 2u;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= gr_params.batch * h) {
        return;
    }
    let b = g / h;
    let pq = pair_of(gr_params.step, g % h, m);
    var rot = vec4<f32>(1.0, 0.0, 0.0, 0.0);
    if (pq.y < n) {
        let base = b * n * n;
        rot = rotation(gr_work_a[base + pq.x * n + pq.x], gr_work_a[base + pq.y * n + pq.y],
                       gr_work_a[base + pq.x * n + pq.y]);
    }
    gr_rot[g] = rot;
}

@group(0) @binding(0) var<storage, read> ga_rot: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> ga_work_a: array<f32>;
@group(0) @binding(2) var<storage, read_write> ga_work_w: array<f32>;
@group(0) @binding(3) var<storage, read> ga_params: GlobalParams;

// Applies the step's rotations: per matrix, items [0, h²) are 2×2 blocks (i, j) of A
// (i ≤ j computes block and mirror, i > j idles), items [h², h² + h·n) are (slot, column)
// pairs of rows of W.
@compute @workgroup_size(256)
fn global_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let n = ga_params.n;
    let m = n + (n & 1u);
    let h = m / 2u;
    let items = h * h + h * n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= ga_params.batch * items) {
        return;
    }
    let b = g / items;
    let e = g % items;
    let k = ga_params.step;
    let base = b * n * n;
    if (e >= h * h) {
        let j = (e - h * h) / n;
        let r = (e - h * h) % n;
        let pq = pair_of(k, j, m);
        if (pq.y < n) {
            let v = rotate(ga_work_w[base + pq.x * n + r], ga_work_w[base + pq.y * n + r], ga_rot[b * h + j]);
            ga_work_w[base + pq.x * n + r] = v.x;
            ga_work_w[base + pq.y * n + r] = v.y;
        }
        return;
    }
    let i = e / h;
    let j = e % h;
    if (i > j) {
        return;
    }
    let pq = pair_of(k, i, m);
    let ru = pair_of(k, j, m);
    let ri = ga_rot[b * h + i];
    if (i == j) {
        if (pq.y < n) {
            let apq = ga_work_a[base + pq.x * n + pq.y];
            ga_work_a[base + pq.x * n + pq.x] -= ri.z * apq;
            ga_work_a[base + pq.y * n + pq.y] += ri.z * apq;
            ga_work_a[base + pq.x * n + pq.y] = 0.0;
            ga_work_a[base + pq.y * n + pq.x] = 0.0;
        }
        return;
    }
    let in_q = pq.y < n;
    let in_u = ru.y < n;
    var blk = vec4<f32>(ga_work_a[base + pq.x * n + ru.x], 0.0, 0.0, 0.0);
    if (in_u) {
        blk.y = ga_work_a[base + pq.x * n + ru.y];
    }
    if (in_q) {
        blk.z = ga_work_a[base + pq.y * n + ru.x];
    }
    if (in_q && in_u) {
        blk.w = ga_work_a[base + pq.y * n + ru.y];
    }
    let out = rotate_block(blk, ri, ga_rot[b * h + j]);
    ga_work_a[base + pq.x * n + ru.x] = out.x;
    ga_work_a[base + ru.x * n + pq.x] = out.x;
    if (in_u) {
        ga_work_a[base + pq.x * n + ru.y] = out.y;
        ga_work_a[base + ru.y * n + pq.x] = out.y;
    }
    if (in_q) {
        ga_work_a[base + pq.y * n + ru.x] = out.z;
        ga_work_a[base + ru.x * n + pq.y] = out.z;
    }
    if (in_q && in_u) {
        ga_work_a[base + pq.y * n + ru.y] = out.w;
        ga_work_a[base + ru.y * n + pq.y] = out.w;
    }
}

// Elements of one matrix summed by one workgroup of `global_norms`.
const NORM_CHUNK: u32 = 4096u;

@group(0) @binding(3) var<storage, read_write> gn_partials: array<f32>;
@group(0) @binding(4) var<storage, read> gn_params: GlobalParams;

// partials[b, chunk] = (Σ off-diagonal a², Σ a², 1 if any element is NaN or Inf else 0)
// over elements [chunk·4096, +4096) of matrix b, summed in a fixed order.
@compute @workgroup_size(256)
fn global_norms(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let n = gn_params.n;
    let nn = n * n;
    let chunks = (nn + NORM_CHUNK - 1u) / NORM_CHUNK;
    let g = wid.x + wid.y * nwg.x;
    if (g >= gn_params.batch * chunks) {
        return;
    }
    let b = g / chunks;
    let start = (g % chunks) * NORM_CHUNK;
    let end = min(start + NORM_CHUNK, nn);
    if (lid == 0u) {
        atomicStore(&wg_bad, 0u);
    }
    workgroupBarrier();
    var off = 0.0;
    var tot = 0.0;
    for (var e = start + lid; e < end; e += WG) {
        let x = src_get(b * nn + e, gn_params.window);
        tot += x * x;
        off += select(x * x, 0.0, e / n == e % n);
        if (!finite(x)) {
            atomicOr(&wg_bad, 1u);
        }
    }
    wg_off[lid] = off;
    wg_tot[lid] = tot;
    reduce_norms(lid, WG);
    if (lid == 0u) {
        gn_partials[g * 3u] = wg_off[0];
        gn_partials[g * 3u + 1u] = wg_tot[0];
        gn_partials[g * 3u + 2u] = f32(atomicLoad(&wg_bad));
    }
}

@group(0) @binding(3) var<storage, read_write> gs_values: array<f32>;
@group(0) @binding(4) var<storage, read_write> gs_ranks: array<u32>;
@group(0) @binding(5) var<storage, read> gs_params: GlobalParams;

// ranks[b, i] = position of a_ii in ascending order (ties by index); values[b, rank] = a_ii.
@compute @workgroup_size(256)
fn global_rank(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let n = gs_params.n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= gs_params.batch * n) {
        return;
    }
    let b = g / n;
    let i = g % n;
    let base = b * n * n;
    let d = src_get(base + i * n + i, gs_params.window);
    let ki = sort_key(d);
    var rank = 0u;
    for (var j = 0u; j < n; j++) {
        let kj = sort_key(src_get(base + j * n + j, gs_params.window));
        rank += select(0u, 1u, before(kj, j, ki, i));
    }
    gs_ranks[g] = rank;
    gs_values[b * n + rank] = d;
}

struct CombineParams {
    // Elements of the batch (batch · n²).
    len: u32,
    // W ← a·W + b·P; (1.5, −0.5) with P = (W Wᵀ) W is one Newton–Schulz step towards the
    // nearest orthogonal basis.
    a: f32,
    b: f32,
    window: u32,
}

@group(0) @binding(6) var<storage, read> gc_params: CombineParams;

// W[g] = a·W[g] + b·P[g], one invocation per element.
@compute @workgroup_size(256)
fn global_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= gc_params.len) {
        return;
    }
    let w = gc_params.window;
    dst_set(g, gc_params.a * dst_get(g, w) + gc_params.b * src_get(g, w), w);
}

@group(0) @binding(3) var<storage, read> gg_ranks: array<u32>;
@group(0) @binding(7) var<storage, read> gg_params: GlobalParams;

// vectors[b, r, ranks[b, i]] = W[b, i, r], one invocation per element.
@compute @workgroup_size(256)
fn global_gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let n = gg_params.n;
    let nn = n * n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= gg_params.batch * nn) {
        return;
    }
    let b = g / nn;
    let i = (g % nn) / n;
    let r = g % n;
    let w = gg_params.window;
    mat_b_set(b * nn + r * n + gg_ranks[b * n + i], src_get(g, w), w);
}

// ---------------------------------------------------------------------------------
// Blocked path (any size): the indices are cut into `blocks` (even) blocks of `block`
// consecutive indices (block ≤ SHARED_N / 2; indices from n to m = blocks·block are
// phantoms). The matrix being diagonalised and its basis live in padded work buffers,
//   A  [batch, m, m]  phantom rows and columns zero
//   W  [batch, m, n]  rows are vectors (W = Vᵀ), phantom rows zero,
// with their blocks in the order of the current round: in round r (of the round-robin
// `pair_of(r, slot, blocks)` over blocks), the block pair (p, q) of slot s sits at
// positions 2s and 2s + 1, so every pair is a contiguous L × L diagonal sub-matrix
// (L = 2·block). A round is:
//   `block_gather`: A and W from the previous round's block order into this round's
//     (a table of source positions per transition; A symmetrised on the way);
//   `block_solve`: per slot, the pair's sub-matrix S is diagonalised in registers (two
//     columns per invocation) by cyclic Jacobi sweeps until ‖offdiag(S)‖_F ≤ threshold[matrix]
//     (tol·‖A‖_F / blocks, from the host; negative for a matrix already done: then S
//     is left alone, unsorted) or INNER_SWEEPS sweeps, its real indices are
//     sorted by their diagonal entries, and the rotation Rᵀ (rows rotated like W) is
//     written to rot;
//   GEMMs (shaders/gemm.wgsl): A ← Rᵀ (Rᵀ A)ᵀ = Rᵀ A R and W ← Rᵀ W with the block
//     diagonal R of the round, as batched products over the slots.
// A zero entry between a real and a phantom index gives the identity rotation and the
// sort keeps phantoms in place, so phantom indices never mix with real ones.
//
//   rot [batch, blocks/2, L, L]  R_sᵀ of each slot of the current round, row-major

struct BlockParams {
    n: u32,
    // The padded size blocks · block.
    m: u32,
    batch: u32,
    // The round r of the sweep.
    round: u32,
    // Number of blocks (even, ≥ 2).
    blocks: u32,
    // Indices per block (≤ SHARED_N / 2).
    block: u32,
    // Elements per binding window (see the header).
    window: u32,
}
// Most inner sweeps per block pair and round. Measured on lavapipe (n = 196, and four
// n = 128): 1, 2, 4 or 8 give the same outer sweeps within one; 2 was the fastest.
const INNER_SWEEPS: u32 = 2u;
// Positions of a pair's sub-matrix in block_solve (SHARED_N; local indices from
// L = 2·block on are zero phantoms) and invocations of its workgroup, one per pair
// of positions.
const POSITIONS: u32 = 32u;
const SOLVE_WG: u32 = 16u;

// block_solve's exchange buffer: the handed-on column of S that moves to position i at
// wg_columns[8 i .. 8 i + 8], four rows per vec4 (rows in the old position order).
var<workgroup> wg_columns: array<vec4<f32>, POSITIONS * POSITIONS / 4u>;
// (s, τ) of each position pair's rotation in the current step.
var<workgroup> wg_turn: array<vec2<f32>, SOLVE_WG>;
// The diagonal of S at the end (by local index), then where the sort moves each index.
var<workgroup> wg_diagonal: array<f32, POSITIONS>;
var<workgroup> wg_target: array<u32, POSITIONS>;

// The (logical) matrix index of local index l of the block pair (p, q).
fn block_index(pair: vec2<u32>, l: u32, block: u32) -> u32 {
    return select(pair.y * block + l - block, pair.x * block + l, l < block);
}

// Where the index at position i moves between two steps of block_solve's round-robin:
// the index at position 1 stays, those at even positions move one pair down (0 to 3,
// 2 to 0), those at odd positions one pair up (31 to 30). A step pairs positions
// (2j, 2j + 1); 31 steps pair every two of the 32 indices once and bring every index
// back to its starting position (the moving 31 form one cycle).
fn advance(i: u32) -> u32 {
    if (i == 0u) {
        return 3u;
    }
    if (i == 1u || i == 2u) {
        return i & 1u;
    }
    if (i == POSITIONS - 1u) {
        return POSITIONS - 2u;
    }
    return select(i + 2u, i - 2u, (i & 1u) == 0u);
}

// The pair of positions whose columns an invocation holds after it held pair e: it
// keeps one column, the one that `advance` moves into that pair (pairs 1 ↔ 2, 3 ↔ 4,
// …, 13 ↔ 14; pairs 0 and 15 stay).
fn next_pair(e: u32) -> u32 {
    if (e == 0u || e == SOLVE_WG - 1u) {
        return e;
    }
    return select(e - 1u, e + 1u, (e & 1u) == 1u);
}

// block_solve's columns are `Column`s handled only by the functions below, whose
// array indices are all constants: lavapipe does not unroll loops, and a private array
// indexed in a loop (or at an invocation's own position) lives in memory, while one
// indexed at constants only lives in registers. (Generated code; the pattern of each
// function is stated in its comment.)
alias Column = array<f32, POSITIONS>;
alias Packed = array<vec4<f32>, POSITIONS / 4u>;
alias Turns = array<vec2<f32>, SOLVE_WG>;

// x as 8 vec4s (rows 4k … 4k + 3).
fn packed(x: Column) -> Packed {
    return Packed(
        vec4<f32>(x[0], x[1], x[2], x[3]),
        vec4<f32>(x[4], x[5], x[6], x[7]),
        vec4<f32>(x[8], x[9], x[10], x[11]),
        vec4<f32>(x[12], x[13], x[14], x[15]),
        vec4<f32>(x[16], x[17], x[18], x[19]),
        vec4<f32>(x[20], x[21], x[22], x[23]),
        vec4<f32>(x[24], x[25], x[26], x[27]),
        vec4<f32>(x[28], x[29], x[30], x[31]),
    );
}

// `packed` inverted.
fn unpacked(v: Packed) -> Column {
    return Column(
        v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w,
        v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w,
        v[4].x, v[4].y, v[4].z, v[4].w, v[5].x, v[5].y, v[5].z, v[5].w,
        v[6].x, v[6].y, v[6].z, v[6].w, v[7].x, v[7].y, v[7].z, v[7].w,
    );
}

// Per vec4: b where c, else a.
fn choose(a: Packed, b: Packed, c: bool) -> Packed {
    let m = vec4<bool>(c);
    return Packed(
        select(a[0], b[0], m), select(a[1], b[1], m),
        select(a[2], b[2], m), select(a[3], b[3], m),
        select(a[4], b[4], m), select(a[5], b[5], m),
        select(a[6], b[6], m), select(a[7], b[7], m),
    );
}

// The rows of x moved to their next positions: row advance(i) = row i.
fn advanced(x: Column) -> Column {
    return Column(
        x[2], x[1], x[4], x[0], x[6], x[3], x[8], x[5],
        x[10], x[7], x[12], x[9], x[14], x[11], x[16], x[13],
        x[18], x[15], x[20], x[17], x[22], x[19], x[24], x[21],
        x[26], x[23], x[28], x[25], x[30], x[27], x[31], x[29],
    );
}

// Rows (2j, 2j + 1) of x rotated by turn j = (s, τ), for every j (`rotate`): Jᵀ x.
fn turned(x: Column, t: Turns) -> Column {
    return Column(
        x[0] - t[0].x * (x[1] + t[0].y * x[0]),
        x[1] + t[0].x * (x[0] - t[0].y * x[1]),
        x[2] - t[1].x * (x[3] + t[1].y * x[2]),
        x[3] + t[1].x * (x[2] - t[1].y * x[3]),
        x[4] - t[2].x * (x[5] + t[2].y * x[4]),
        x[5] + t[2].x * (x[4] - t[2].y * x[5]),
        x[6] - t[3].x * (x[7] + t[3].y * x[6]),
        x[7] + t[3].x * (x[6] - t[3].y * x[7]),
        x[8] - t[4].x * (x[9] + t[4].y * x[8]),
        x[9] + t[4].x * (x[8] - t[4].y * x[9]),
        x[10] - t[5].x * (x[11] + t[5].y * x[10]),
        x[11] + t[5].x * (x[10] - t[5].y * x[11]),
        x[12] - t[6].x * (x[13] + t[6].y * x[12]),
        x[13] + t[6].x * (x[12] - t[6].y * x[13]),
        x[14] - t[7].x * (x[15] + t[7].y * x[14]),
        x[15] + t[7].x * (x[14] - t[7].y * x[15]),
        x[16] - t[8].x * (x[17] + t[8].y * x[16]),
        x[17] + t[8].x * (x[16] - t[8].y * x[17]),
        x[18] - t[9].x * (x[19] + t[9].y * x[18]),
        x[19] + t[9].x * (x[18] - t[9].y * x[19]),
        x[20] - t[10].x * (x[21] + t[10].y * x[20]),
        x[21] + t[10].x * (x[20] - t[10].y * x[21]),
        x[22] - t[11].x * (x[23] + t[11].y * x[22]),
        x[23] + t[11].x * (x[22] - t[11].y * x[23]),
        x[24] - t[12].x * (x[25] + t[12].y * x[24]),
        x[25] + t[12].x * (x[24] - t[12].y * x[25]),
        x[26] - t[13].x * (x[27] + t[13].y * x[26]),
        x[27] + t[13].x * (x[26] - t[13].y * x[27]),
        x[28] - t[14].x * (x[29] + t[14].y * x[28]),
        x[29] + t[14].x * (x[28] - t[14].y * x[29]),
        x[30] - t[15].x * (x[31] + t[15].y * x[30]),
        x[31] + t[15].x * (x[30] - t[15].y * x[31]),
    );
}

// The turns of the current step from workgroup memory.
fn load_turns() -> Turns {
    return Turns(
        wg_turn[0], wg_turn[1], wg_turn[2], wg_turn[3],
        wg_turn[4], wg_turn[5], wg_turn[6], wg_turn[7],
        wg_turn[8], wg_turn[9], wg_turn[10], wg_turn[11],
        wg_turn[12], wg_turn[13], wg_turn[14], wg_turn[15],
    );
}

// x[i] for an index i known only at run time (per invocation).
fn entry(x: Column, i: u32) -> f32 {
    let v = packed(x);
    let k = i >> 2u;
    var r = v[0];

    r = select(r, v[1], k == 1u);
    r = select(r, v[2], k == 2u);
    r = select(r, v[3], k == 3u);
    r = select(r, v[4], k == 4u);
    r = select(r, v[5], k == 5u);
    r = select(r, v[6], k == 6u);
    r = select(r, v[7], k == 7u);
    return r[i & 3u];
}

// x with x[i] = value, i known only at run time.
fn with_entry(x: Column, i: u32, value: f32) -> Column {
    let v = packed(x);
    let at = vec4<u32>(i);
    let y = vec4<f32>(value);
    return unpacked(Packed(
        select(v[0], y, vec4<u32>(0u, 1u, 2u, 3u) == at),
        select(v[1], y, vec4<u32>(4u, 5u, 6u, 7u) == at),
        select(v[2], y, vec4<u32>(8u, 9u, 10u, 11u) == at),
        select(v[3], y, vec4<u32>(12u, 13u, 14u, 15u) == at),
        select(v[4], y, vec4<u32>(16u, 17u, 18u, 19u) == at),
        select(v[5], y, vec4<u32>(20u, 21u, 22u, 23u) == at),
        select(v[6], y, vec4<u32>(24u, 25u, 26u, 27u) == at),
        select(v[7], y, vec4<u32>(28u, 29u, 30u, 31u) == at),
    ));
}

// Unit vector e_i.
fn unit_column(i: u32) -> Column {
    return Column(
        select(0.0, 1.0, i == 0u), select(0.0, 1.0, i == 1u), select(0.0, 1.0, i == 2u), select(0.0, 1.0, i == 3u),
        select(0.0, 1.0, i == 4u), select(0.0, 1.0, i == 5u), select(0.0, 1.0, i == 6u), select(0.0, 1.0, i == 7u),
        select(0.0, 1.0, i == 8u), select(0.0, 1.0, i == 9u), select(0.0, 1.0, i == 10u), select(0.0, 1.0, i == 11u),
        select(0.0, 1.0, i == 12u), select(0.0, 1.0, i == 13u), select(0.0, 1.0, i == 14u), select(0.0, 1.0, i == 15u),
        select(0.0, 1.0, i == 16u), select(0.0, 1.0, i == 17u), select(0.0, 1.0, i == 18u), select(0.0, 1.0, i == 19u),
        select(0.0, 1.0, i == 20u), select(0.0, 1.0, i == 21u), select(0.0, 1.0, i == 22u), select(0.0, 1.0, i == 23u),
        select(0.0, 1.0, i == 24u), select(0.0, 1.0, i == 25u), select(0.0, 1.0, i == 26u), select(0.0, 1.0, i == 27u),
        select(0.0, 1.0, i == 28u), select(0.0, 1.0, i == 29u), select(0.0, 1.0, i == 30u), select(0.0, 1.0, i == 31u),
    );
}

// Entry i of column col of the pair's sub-matrix (zero outside L × L; L is even, so an
// invocation's columns p, p + 1 are both real or both phantoms).
fn sub_entry(corner: u32, col: u32, i: u32, l: u32) -> f32 {
    if (i < l && col < l) {
        return mat_a_get(corner + col * bs_params.m + i, bs_params.window);
    }
    return 0.0;
}

// Column col of the sub-matrix (rows zero-padded to POSITIONS).
fn sub_column(corner: u32, col: u32, l: u32) -> Column {
    return Column(
        sub_entry(corner, col, 0u, l), sub_entry(corner, col, 1u, l),
        sub_entry(corner, col, 2u, l), sub_entry(corner, col, 3u, l),
        sub_entry(corner, col, 4u, l), sub_entry(corner, col, 5u, l),
        sub_entry(corner, col, 6u, l), sub_entry(corner, col, 7u, l),
        sub_entry(corner, col, 8u, l), sub_entry(corner, col, 9u, l),
        sub_entry(corner, col, 10u, l), sub_entry(corner, col, 11u, l),
        sub_entry(corner, col, 12u, l), sub_entry(corner, col, 13u, l),
        sub_entry(corner, col, 14u, l), sub_entry(corner, col, 15u, l),
        sub_entry(corner, col, 16u, l), sub_entry(corner, col, 17u, l),
        sub_entry(corner, col, 18u, l), sub_entry(corner, col, 19u, l),
        sub_entry(corner, col, 20u, l), sub_entry(corner, col, 21u, l),
        sub_entry(corner, col, 22u, l), sub_entry(corner, col, 23u, l),
        sub_entry(corner, col, 24u, l), sub_entry(corner, col, 25u, l),
        sub_entry(corner, col, 26u, l), sub_entry(corner, col, 27u, l),
        sub_entry(corner, col, 28u, l), sub_entry(corner, col, 29u, l),
        sub_entry(corner, col, 30u, l), sub_entry(corner, col, 31u, l),
    );
}

// Σ_i x_i² + y_i² without entries ip of x and iq of y, summed row by row.
fn off_squares(x: Column, y: Column, ip: u32, iq: u32) -> f32 {
    var off = 0.0;

    off += select(x[0] * x[0], 0.0, ip == 0u) + select(y[0] * y[0], 0.0, iq == 0u);
    off += select(x[1] * x[1], 0.0, ip == 1u) + select(y[1] * y[1], 0.0, iq == 1u);
    off += select(x[2] * x[2], 0.0, ip == 2u) + select(y[2] * y[2], 0.0, iq == 2u);
    off += select(x[3] * x[3], 0.0, ip == 3u) + select(y[3] * y[3], 0.0, iq == 3u);
    off += select(x[4] * x[4], 0.0, ip == 4u) + select(y[4] * y[4], 0.0, iq == 4u);
    off += select(x[5] * x[5], 0.0, ip == 5u) + select(y[5] * y[5], 0.0, iq == 5u);
    off += select(x[6] * x[6], 0.0, ip == 6u) + select(y[6] * y[6], 0.0, iq == 6u);
    off += select(x[7] * x[7], 0.0, ip == 7u) + select(y[7] * y[7], 0.0, iq == 7u);
    off += select(x[8] * x[8], 0.0, ip == 8u) + select(y[8] * y[8], 0.0, iq == 8u);
    off += select(x[9] * x[9], 0.0, ip == 9u) + select(y[9] * y[9], 0.0, iq == 9u);
    off += select(x[10] * x[10], 0.0, ip == 10u) + select(y[10] * y[10], 0.0, iq == 10u);
    off += select(x[11] * x[11], 0.0, ip == 11u) + select(y[11] * y[11], 0.0, iq == 11u);
    off += select(x[12] * x[12], 0.0, ip == 12u) + select(y[12] * y[12], 0.0, iq == 12u);
    off += select(x[13] * x[13], 0.0, ip == 13u) + select(y[13] * y[13], 0.0, iq == 13u);
    off += select(x[14] * x[14], 0.0, ip == 14u) + select(y[14] * y[14], 0.0, iq == 14u);
    off += select(x[15] * x[15], 0.0, ip == 15u) + select(y[15] * y[15], 0.0, iq == 15u);
    off += select(x[16] * x[16], 0.0, ip == 16u) + select(y[16] * y[16], 0.0, iq == 16u);
    off += select(x[17] * x[17], 0.0, ip == 17u) + select(y[17] * y[17], 0.0, iq == 17u);
    off += select(x[18] * x[18], 0.0, ip == 18u) + select(y[18] * y[18], 0.0, iq == 18u);
    off += select(x[19] * x[19], 0.0, ip == 19u) + select(y[19] * y[19], 0.0, iq == 19u);
    off += select(x[20] * x[20], 0.0, ip == 20u) + select(y[20] * y[20], 0.0, iq == 20u);
    off += select(x[21] * x[21], 0.0, ip == 21u) + select(y[21] * y[21], 0.0, iq == 21u);
    off += select(x[22] * x[22], 0.0, ip == 22u) + select(y[22] * y[22], 0.0, iq == 22u);
    off += select(x[23] * x[23], 0.0, ip == 23u) + select(y[23] * y[23], 0.0, iq == 23u);
    off += select(x[24] * x[24], 0.0, ip == 24u) + select(y[24] * y[24], 0.0, iq == 24u);
    off += select(x[25] * x[25], 0.0, ip == 25u) + select(y[25] * y[25], 0.0, iq == 25u);
    off += select(x[26] * x[26], 0.0, ip == 26u) + select(y[26] * y[26], 0.0, iq == 26u);
    off += select(x[27] * x[27], 0.0, ip == 27u) + select(y[27] * y[27], 0.0, iq == 27u);
    off += select(x[28] * x[28], 0.0, ip == 28u) + select(y[28] * y[28], 0.0, iq == 28u);
    off += select(x[29] * x[29], 0.0, ip == 29u) + select(y[29] * y[29], 0.0, iq == 29u);
    off += select(x[30] * x[30], 0.0, ip == 30u) + select(y[30] * y[30], 0.0, iq == 30u);
    off += select(x[31] * x[31], 0.0, ip == 31u) + select(y[31] * y[31], 0.0, iq == 31u);
    return off;
}

// Writes columns p, q of rot[g] (rows moved by wg_target) from W's columns x, y.
fn write_rotation(x: Column, y: Column, g: u32, p: u32, l: u32) {
    let ll = l * l;

    if (0u < l) {
        bs_rot[g * ll + wg_target[0] * l + p] = x[0];
        bs_rot[g * ll + wg_target[0] * l + p + 1u] = y[0];
    }
    if (1u < l) {
        bs_rot[g * ll + wg_target[1] * l + p] = x[1];
        bs_rot[g * ll + wg_target[1] * l + p + 1u] = y[1];
    }
    if (2u < l) {
        bs_rot[g * ll + wg_target[2] * l + p] = x[2];
        bs_rot[g * ll + wg_target[2] * l + p + 1u] = y[2];
    }
    if (3u < l) {
        bs_rot[g * ll + wg_target[3] * l + p] = x[3];
        bs_rot[g * ll + wg_target[3] * l + p + 1u] = y[3];
    }
    if (4u < l) {
        bs_rot[g * ll + wg_target[4] * l + p] = x[4];
        bs_rot[g * ll + wg_target[4] * l + p + 1u] = y[4];
    }
    if (5u < l) {
        bs_rot[g * ll + wg_target[5] * l + p] = x[5];
        bs_rot[g * ll + wg_target[5] * l + p + 1u] = y[5];
    }
    if (6u < l) {
        bs_rot[g * ll + wg_target[6] * l + p] = x[6];
        bs_rot[g * ll + wg_target[6] * l + p + 1u] = y[6];
    }
    if (7u < l) {
        bs_rot[g * ll + wg_target[7] * l + p] = x[7];
        bs_rot[g * ll + wg_target[7] * l + p + 1u] = y[7];
    }
    if (8u < l) {
        bs_rot[g * ll + wg_target[8] * l + p] = x[8];
        bs_rot[g * ll + wg_target[8] * l + p + 1u] = y[8];
    }
    if (9u < l) {
        bs_rot[g * ll + wg_target[9] * l + p] = x[9];
        bs_rot[g * ll + wg_target[9] * l + p + 1u] = y[9];
    }
    if (10u < l) {
        bs_rot[g * ll + wg_target[10] * l + p] = x[10];
        bs_rot[g * ll + wg_target[10] * l + p + 1u] = y[10];
    }
    if (11u < l) {
        bs_rot[g * ll + wg_target[11] * l + p] = x[11];
        bs_rot[g * ll + wg_target[11] * l + p + 1u] = y[11];
    }
    if (12u < l) {
        bs_rot[g * ll + wg_target[12] * l + p] = x[12];
        bs_rot[g * ll + wg_target[12] * l + p + 1u] = y[12];
    }
    if (13u < l) {
        bs_rot[g * ll + wg_target[13] * l + p] = x[13];
        bs_rot[g * ll + wg_target[13] * l + p + 1u] = y[13];
    }
    if (14u < l) {
        bs_rot[g * ll + wg_target[14] * l + p] = x[14];
        bs_rot[g * ll + wg_target[14] * l + p + 1u] = y[14];
    }
    if (15u < l) {
        bs_rot[g * ll + wg_target[15] * l + p] = x[15];
        bs_rot[g * ll + wg_target[15] * l + p + 1u] = y[15];
    }
    if (16u < l) {
        bs_rot[g * ll + wg_target[16] * l + p] = x[16];
        bs_rot[g * ll + wg_target[16] * l + p + 1u] = y[16];
    }
    if (17u < l) {
        bs_rot[g * ll + wg_target[17] * l + p] = x[17];
        bs_rot[g * ll + wg_target[17] * l + p + 1u] = y[17];
    }
    if (18u < l) {
        bs_rot[g * ll + wg_target[18] * l + p] = x[18];
        bs_rot[g * ll + wg_target[18] * l + p + 1u] = y[18];
    }
    if (19u < l) {
        bs_rot[g * ll + wg_target[19] * l + p] = x[19];
        bs_rot[g * ll + wg_target[19] * l + p + 1u] = y[19];
    }
    if (20u < l) {
        bs_rot[g * ll + wg_target[20] * l + p] = x[20];
        bs_rot[g * ll + wg_target[20] * l + p + 1u] = y[20];
    }
    if (21u < l) {
        bs_rot[g * ll + wg_target[21] * l + p] = x[21];
        bs_rot[g * ll + wg_target[21] * l + p + 1u] = y[21];
    }
    if (22u < l) {
        bs_rot[g * ll + wg_target[22] * l + p] = x[22];
        bs_rot[g * ll + wg_target[22] * l + p + 1u] = y[22];
    }
    if (23u < l) {
        bs_rot[g * ll + wg_target[23] * l + p] = x[23];
        bs_rot[g * ll + wg_target[23] * l + p + 1u] = y[23];
    }
    if (24u < l) {
        bs_rot[g * ll + wg_target[24] * l + p] = x[24];
        bs_rot[g * ll + wg_target[24] * l + p + 1u] = y[24];
    }
    if (25u < l) {
        bs_rot[g * ll + wg_target[25] * l + p] = x[25];
        bs_rot[g * ll + wg_target[25] * l + p + 1u] = y[25];
    }
    if (26u < l) {
        bs_rot[g * ll + wg_target[26] * l + p] = x[26];
        bs_rot[g * ll + wg_target[26] * l + p + 1u] = y[26];
    }
    if (27u < l) {
        bs_rot[g * ll + wg_target[27] * l + p] = x[27];
        bs_rot[g * ll + wg_target[27] * l + p + 1u] = y[27];
    }
    if (28u < l) {
        bs_rot[g * ll + wg_target[28] * l + p] = x[28];
        bs_rot[g * ll + wg_target[28] * l + p + 1u] = y[28];
    }
    if (29u < l) {
        bs_rot[g * ll + wg_target[29] * l + p] = x[29];
        bs_rot[g * ll + wg_target[29] * l + p + 1u] = y[29];
    }
    if (30u < l) {
        bs_rot[g * ll + wg_target[30] * l + p] = x[30];
        bs_rot[g * ll + wg_target[30] * l + p + 1u] = y[30];
    }
    if (31u < l) {
        bs_rot[g * ll + wg_target[31] * l + p] = x[31];
        bs_rot[g * ll + wg_target[31] * l + p + 1u] = y[31];
    }
}


// Columns x, y rotated by r = (c, s, t, τ) (`rotate`, row by row).
struct ColumnPair {
    p: Column,
    q: Column,
}

fn columns_turned(x: Column, y: Column, r: vec4<f32>) -> ColumnPair {
    let a = packed(x);
    let b = packed(y);
    return ColumnPair(unpacked(Packed(
        a[0] - r.y * (b[0] + r.w * a[0]),
        a[1] - r.y * (b[1] + r.w * a[1]),
        a[2] - r.y * (b[2] + r.w * a[2]),
        a[3] - r.y * (b[3] + r.w * a[3]),
        a[4] - r.y * (b[4] + r.w * a[4]),
        a[5] - r.y * (b[5] + r.w * a[5]),
        a[6] - r.y * (b[6] + r.w * a[6]),
        a[7] - r.y * (b[7] + r.w * a[7]),
    )), unpacked(Packed(
        b[0] + r.y * (a[0] - r.w * b[0]),
        b[1] + r.y * (a[1] - r.w * b[1]),
        b[2] + r.y * (a[2] - r.w * b[2]),
        b[3] + r.y * (a[3] - r.w * b[3]),
        b[4] + r.y * (a[4] - r.w * b[4]),
        b[5] + r.y * (a[5] - r.w * b[5]),
        b[6] + r.y * (a[6] - r.w * b[6]),
        b[7] + r.y * (a[7] - r.w * b[7]),
    )));
}

// Writes the handed-on column v to workgroup memory at position `to`.
fn hand_on(v: Packed, to: u32) {
    wg_columns[8u * to + 0u] = v[0];
    wg_columns[8u * to + 1u] = v[1];
    wg_columns[8u * to + 2u] = v[2];
    wg_columns[8u * to + 3u] = v[3];
    wg_columns[8u * to + 4u] = v[4];
    wg_columns[8u * to + 5u] = v[5];
    wg_columns[8u * to + 6u] = v[6];
    wg_columns[8u * to + 7u] = v[7];
}

// The handed-on column at position `source` in workgroup memory.
fn take_column(source: u32) -> Packed {
    return Packed(
        wg_columns[8u * source + 0u], wg_columns[8u * source + 1u],
        wg_columns[8u * source + 2u], wg_columns[8u * source + 3u],
        wg_columns[8u * source + 4u], wg_columns[8u * source + 5u],
        wg_columns[8u * source + 6u], wg_columns[8u * source + 7u],
    );
}


@group(0) @binding(0) var<storage, read> bs_threshold: array<f32>;
@group(0) @binding(4) var<storage, read_write> bs_rot: array<f32>;
@group(0) @binding(5) var<storage, read> bs_params: BlockParams;

// One workgroup per (matrix, slot) of the round; reads A (mat_a), writes rot. The pair's
// sub-matrix S (L × L, zero-padded to POSITIONS) and its rotation W (rows rotated, W₀ =
// I) live in registers: invocation t holds the columns of S at the two positions of
// one position pair (t at the start; rows in position order) and columns 2t, 2t + 1 of
// W (rows in position order). A step rotates every position pair (2j, 2j + 1): each
// invocation computes its own pair's rotation and publishes it, applies all of them to
// the rows of its four columns, its own to its two columns of S (exactly zeroing the
// pair's off-diagonal entry), then the columns of S move to their next positions
// (`advance`); W's columns stay. Each invocation keeps one of its two columns, the one
// that moves into pair next_pair(j) (there is such a choice for every pair, so that
// every pair receives exactly one kept column), and hands only the other one on
// through workgroup memory. Cyclic sweeps of 31 steps until ‖offdiag(S)‖_F ≤ threshold
// or INNER_SWEEPS; then the real local indices are sorted by their diagonal entries
// and W is written, rows moved by the sort. A negative threshold marks a matrix that is
// done while others of its batch still sweep: no rotation, no sort, W = I exactly, so
// the round leaves it as it was (its results are those of a matrix swept alone).
//
// Why one column per step: on lavapipe a load or store to workgroup memory whose
// address differs between invocations runs one invocation at a time, and the column
// exchange was ~43 % of this kernel's time when both columns moved. Handing on one
// column performs the same arithmetic in the same order (results bitwise those of
// handing on both). Measured on lavapipe (2 shared cores, alternating runs):
// per-dispatch profile of bench --quick, block_solve ms per call (over the short-K
// rotation GEMM's in the same run): mlp 3.11, 3.18 (6.8, 7.0) → 2.53, 2.67 (4.9, 5.8),
// cnn 2.13, 2.15 (4.0, 4.0) → 1.59, 1.86 (2.9, 3.4); bench --quick
// eigendecomposition / factors, 3 rounds: mlp 5.14, 5.21, 5.00 → 4.75, 4.57, 5.04,
// cnn 1.68, 1.71, 1.66 → 1.54, 1.62, 1.53. What remains per step and invocation in
// workgroup memory: 32 floats of the handed-on column written and read, 32 of the
// turns read (reading them as 8 vec4 instead of 16 vec2 changed nothing).
// Why every column operation is a `Column` function written out without loops (see
// above `packed`): with loops (and reads/writes at the invocation's own positions), the
// four private columns lived in memory; written out, they live in registers (the
// positions known only per invocation go through `entry` / `with_entry`, selects over
// 8 vec4s). Same operations in the same order, results bitwise the same. Measured
// (lavapipe, per-dispatch profile, eigh of two n = 256 Gram matrices, 2 sweeps, 90
// block_solve calls, alternating runs): 385 / 410 ms → 217 / 238 ms in total.
// Both changes against the round-robin kernel that handed on both columns with loops
// (lavapipe, alternating runs of bench --quick, per-dispatch profile): block_solve ms
// per call over the short-K GEMM's of the same run, mlp 5.8, 5.2 → 2.6, 2.8, cnn 3.4,
// 3.5 → 1.6, 1.6; block_solve's share of the eigendecomposition's dispatch time mlp
// 43 %, 41 % → 25 %, 27 %, cnn 36 %, 36 % → 20 %, 21 %; eigendecomposition / factors,
// 3 rounds, mlp 5.5, 3.4, 5.5 → 3.9, 3.8, 3.7, cnn 1.9, 2.2, 1.9 → 2.1, 1.4, 1.4.
// (An ordering that pairs every index i with i ^ d in step d, keeping its rows in
// index order, moved half the data too but indexes the private arrays at i ^ d, which
// lavapipe cannot resolve at compile time: 1.45× slower than the round-robin; the
// same with every step written out took 20 s to compile. Copying the private columns
// before the scatter instead of keeping one vec4 array of the kept column: 2.5×
// slower.)
@compute @workgroup_size(16)
fn block_solve(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let h = bs_params.blocks / 2u;
    let g = wid.x + wid.y * nwg.x;
    if (g >= bs_params.batch * h) {
        return;
    }
    let n = bs_params.n;
    let m = bs_params.m;
    let block = bs_params.block;
    let l = 2u * block;
    let slot = g % h;
    // The sub-matrix starts at row and column slot · l of matrix g / h.
    let corner = (g / h) * m * m + slot * l * (m + 1u);
    let pair = pair_of(bs_params.round, slot, bs_params.blocks);
    let p = 2u * lid;
    let q = p + 1u;
    // The pair of positions whose columns of S this invocation holds (first lid, then
    // alternating by `next_pair`).
    var held = lid;
    // Columns p and q of S are rows p and q (A is symmetric).
    var a_p = sub_column(corner, p, l);
    var a_q = sub_column(corner, q, l);
    var w_p = unit_column(p);
    var w_q = unit_column(q);
    let theta = bs_threshold[g / h];
    for (var sweep = 0u; sweep < INNER_SWEEPS; sweep++) {
        wg_off[lid] = off_squares(a_p, a_q, 2u * held, 2u * held + 1u);
        wg_tot[lid] = 0.0;
        reduce_norms(lid, SOLVE_WG);
        if (lid == 0u) {
            wg_done = select(0u, 1u, theta < 0.0 || wg_off[0] <= theta * theta);
        }
        if (workgroupUniformLoad(&wg_done) != 0u) {
            break;
        }
        for (var step = 0u; step + 1u < POSITIONS; step++) {
            // This invocation holds the columns at positions pp and qq (pair `held`).
            let pp = 2u * held;
            let qq = pp + 1u;
            let app = entry(a_p, pp);
            let aqq = entry(a_q, qq);
            let apq = entry(a_p, qq);
            let own = rotation(app, aqq, apq);
            wg_turn[held] = vec2<f32>(own.y, own.w);
            workgroupBarrier();
            let turns = load_turns();
            w_p = turned(w_p, turns);
            w_q = turned(w_q, turns);
            let both = columns_turned(turned(a_p, turns), turned(a_q, turns), own);
            // The pair's own 2 × 2 block, exactly (Rutishauser's update).
            let s_p = with_entry(with_entry(both.p, pp, app - own.z * apq), qq, 0.0);
            let s_q = with_entry(with_entry(both.q, qq, aqq + own.z * apq), pp, 0.0);
            // Keep the column that `advance` moves into pair next_pair(held) (the even
            // position's for pairs 2, 4, …, 14, else the odd one's; it lands on the even
            // position for those pairs and pair 15) and hand the other one on through
            // workgroup memory, at the position it moves to.
            let keep_even = held != 0u && (held & 1u) == 0u;
            let lands_even = keep_even || held == SOLVE_WG - 1u;
            let kept = choose(packed(s_q), packed(s_p), keep_even);
            hand_on(choose(packed(s_p), packed(s_q), keep_even), advance(select(pp, qq, keep_even)));
            held = next_pair(held);
            // The other position of the new pair takes the handed-on column moved there.
            workgroupBarrier();
            let taken = take_column(select(2u * held, 2u * held + 1u, lands_even));
            a_p = advanced(unpacked(choose(taken, kept, lands_even)));
            a_q = advanced(unpacked(choose(kept, taken, lands_even)));
            w_p = advanced(w_p);
            w_q = advanced(w_q);
        }
    }
    // Sort the pair's real indices by their diagonal entries, ascending (ties by index),
    // so that the whole diagonal tends to ascending order and the rotations of later
    // rounds stay close to the identity. Phantom indices keep their places. The real
    // local indices are [0, real_p) and [block, block + real count of block q).
    wg_diagonal[2u * held] = entry(a_p, 2u * held);
    wg_diagonal[2u * held + 1u] = entry(a_q, 2u * held + 1u);
    workgroupBarrier();
    let real_p = min(block, n - min(n, pair.x * block));
    for (var e = 0u; e < 2u; e++) {
        let i = p + e;
        var place = i;
        if (i < l && block_index(pair, i, block) < n && theta >= 0.0) {
            let key = sort_key(wg_diagonal[i]);
            var rank = 0u;
            for (var j = 0u; j < l; j++) {
                let real = block_index(pair, j, block) < n;
                rank += select(0u, 1u, real && before(sort_key(wg_diagonal[j]), j, key, i));
            }
            place = select(block + rank - real_p, rank, rank < real_p);
        }
        wg_target[i] = place;
    }
    workgroupBarrier();
    // rot[g] = W with its rows moved by the sort: row target(i) = row i; this
    // invocation writes columns p and q.
    if (q < l) {
        write_rotation(w_p, w_q, g, p, l);
    }
}

struct GatherParams {
    // The source [batch, rows_in, cols_in] and destination [batch, rows_out, cols_out].
    rows_in: u32,
    cols_in: u32,
    rows_out: u32,
    cols_out: u32,
    // Row of the index map table whose entry i is the source index of destination
    // index i; 0xFFFFFFFF: every index stays in place.
    map: u32,
    // Entries per row of the index map table (m).
    map_len: u32,
    // 1: columns move with the rows (A); 0: columns stay (W).
    permute_cols: u32,
    // 1: the destination is (X + Xᵀ)/2 of the moved source X (square A only).
    symmetrize: u32,
    window: u32,
    // Indices per block (blocks move whole: source(j0 + e) = source(j0) + e within one).
    run: u32,
    // Nonzero (with symmetrize): only the source's block upper triangle by panels of
    // `panel` indices is current (the column-panel GEMM computed no more): an entry of
    // two panels is read where its column panel is the later one, an entry inside one
    // panel as the mean of both.
    panel: u32,
}

@group(0) @binding(0) var<storage, read> bg_map: array<u32>;
@group(0) @binding(7) var<storage, read> bg_params: GatherParams;

// The source index of destination index i under the params' map.
fn gather_source(i: u32) -> u32 {
    if (bg_params.map == 0xFFFFFFFFu) {
        return i;
    }
    return bg_map[bg_params.map * bg_params.map_len + i];
}

// dst[b, i, j] = src[b, source(i), source(j)] (or column j), zero where a source index
// is out of range (padding and unpadding); src bound as mat_a, dst as mat_b. Blocks of
// `run` indices move whole, so each invocation copies one segment of `run` columns of a
// row (one block) with one look-up of the segment's source. Grid: x = segment / WG
// (rows_out · ⌈cols_out / run⌉ segments per matrix), z = matrix b.
@compute @workgroup_size(256)
fn block_gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let p = bg_params;
    let runs = (p.cols_out + p.run - 1u) / p.run;
    let item = wid.x * WG + lid;
    if (item >= p.rows_out * runs) {
        return;
    }
    let i = item / runs;
    let j0 = (item % runs) * p.run;
    let b = wid.z;
    let si = gather_source(i);
    let sj0 = select(j0, gather_source(j0), p.permute_cols != 0u);
    let base = b * p.rows_in * p.cols_in;
    let out = (b * p.rows_out + i) * p.cols_out;
    // Which of (si, sj) and (sj, si) to read: both (mean), or the one whose column
    // panel is the later (a block lies inside one panel, so one choice per segment).
    var direct = true;
    var mirror = p.symmetrize != 0u;
    if (mirror && p.panel != 0u) {
        let row_panel = si / p.panel;
        let col_panel = sj0 / p.panel;
        direct = col_panel >= row_panel;
        mirror = col_panel <= row_panel;
    }
    for (var e = 0u; e < p.run && j0 + e < p.cols_out; e++) {
        let sj = sj0 + e;
        var x = 0.0;
        if (si < p.rows_in && sj < p.cols_in) {
            let upper = base + si * p.cols_in + sj;
            let lower = base + sj * p.cols_in + si;
            x = mat_a_get(select(lower, upper, direct), p.window);
            if (direct && mirror) {
                x = 0.5 * (x + mat_a_get(lower, p.window));
            }
        }
        mat_b_set(out + j0 + e, x, p.window);
    }
}
