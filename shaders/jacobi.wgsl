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
//     (tol·‖A‖_F / blocks, from the host) or INNER_SWEEPS sweeps, its real indices are
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

// Rotates positions (2j, 2j + 1) of x by (s, τ) of pair j, for every j: Jᵀ x.
fn turn_rows(x: ptr<function, array<f32, POSITIONS>>, turns: ptr<function, array<vec2<f32>, SOLVE_WG>>) {
    for (var j = 0u; j < SOLVE_WG; j++) {
        let r = vec4<f32>(0.0, (*turns)[j].x, 0.0, (*turns)[j].y);
        let v = rotate((*x)[2u * j], (*x)[2u * j + 1u], r);
        (*x)[2u * j] = v.x;
        (*x)[2u * j + 1u] = v.y;
    }
}

// Moves the rows of x to their positions of the next step.
fn advance_rows(x: ptr<function, array<f32, POSITIONS>>) {
    var moved: array<f32, POSITIONS>;
    for (var i = 0u; i < POSITIONS; i++) {
        moved[advance(i)] = (*x)[i];
    }
    *x = moved;
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
// and W is written, rows moved by the sort.
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
    var a_p: array<f32, POSITIONS>;
    var a_q: array<f32, POSITIONS>;
    var w_p: array<f32, POSITIONS>;
    var w_q: array<f32, POSITIONS>;
    for (var i = 0u; i < POSITIONS; i++) {
        a_p[i] = 0.0;
        a_q[i] = 0.0;
        if (i < l && q < l) {
            a_p[i] = mat_a_get(corner + p * m + i, bs_params.window);
            a_q[i] = mat_a_get(corner + q * m + i, bs_params.window);
        }
        w_p[i] = select(0.0, 1.0, i == p);
        w_q[i] = select(0.0, 1.0, i == q);
    }
    let theta = bs_threshold[g / h];
    for (var sweep = 0u; sweep < INNER_SWEEPS; sweep++) {
        // At a sweep's start every index is at its own position.
        var off = 0.0;
        for (var i = 0u; i < POSITIONS; i++) {
            off += select(a_p[i] * a_p[i], 0.0, i == 2u * held) + select(a_q[i] * a_q[i], 0.0, i == 2u * held + 1u);
        }
        wg_off[lid] = off;
        wg_tot[lid] = 0.0;
        reduce_norms(lid, SOLVE_WG);
        if (lid == 0u) {
            wg_done = select(0u, 1u, wg_off[0] <= theta * theta);
        }
        if (workgroupUniformLoad(&wg_done) != 0u) {
            break;
        }
        for (var step = 0u; step + 1u < POSITIONS; step++) {
            // This invocation holds the columns at positions pp and qq (pair `held`).
            let pp = 2u * held;
            let qq = pp + 1u;
            let app = a_p[pp];
            let aqq = a_q[qq];
            let apq = a_p[qq];
            let own = rotation(app, aqq, apq);
            wg_turn[held] = vec2<f32>(own.y, own.w);
            workgroupBarrier();
            var turns: array<vec2<f32>, SOLVE_WG>;
            for (var j = 0u; j < SOLVE_WG; j++) {
                turns[j] = wg_turn[j];
            }
            turn_rows(&a_p, &turns);
            turn_rows(&a_q, &turns);
            turn_rows(&w_p, &turns);
            turn_rows(&w_q, &turns);
            for (var i = 0u; i < POSITIONS; i++) {
                let v = rotate(a_p[i], a_q[i], own);
                a_p[i] = v.x;
                a_q[i] = v.y;
            }
            // The pair's own 2 × 2 block, exactly (Rutishauser's update).
            a_p[pp] = app - own.z * apq;
            a_q[qq] = aqq + own.z * apq;
            a_p[qq] = 0.0;
            a_q[pp] = 0.0;
            // Keep the column that `advance` moves into pair next_pair(held) (the even
            // position's for pairs 2, 4, …, 14, else the odd one's; it lands on the even
            // position for those pairs and pair 15) and hand the other one on through
            // workgroup memory, at the position it moves to.
            let keep_even = held != 0u && (held & 1u) == 0u;
            let lands_even = keep_even || held == SOLVE_WG - 1u;
            let sent = advance(select(pp, qq, keep_even));
            var kept: array<vec4<f32>, POSITIONS / 4u>;
            for (var k = 0u; k < POSITIONS / 4u; k++) {
                let x = vec4<f32>(a_p[4u * k], a_p[4u * k + 1u], a_p[4u * k + 2u], a_p[4u * k + 3u]);
                let y = vec4<f32>(a_q[4u * k], a_q[4u * k + 1u], a_q[4u * k + 2u], a_q[4u * k + 3u]);
                wg_columns[8u * sent + k] = select(x, y, vec4<bool>(keep_even));
                kept[k] = select(y, x, vec4<bool>(keep_even));
            }
            held = next_pair(held);
            // The other position of the new pair takes the handed-on column moved there.
            let received = select(2u * held, 2u * held + 1u, lands_even);
            workgroupBarrier();
            for (var k = 0u; k < POSITIONS / 4u; k++) {
                let r = wg_columns[8u * received + k];
                let x = select(r, kept[k], vec4<bool>(lands_even));
                let y = select(kept[k], r, vec4<bool>(lands_even));
                for (var c = 0u; c < 4u; c++) {
                    a_p[advance(4u * k + c)] = x[c];
                    a_q[advance(4u * k + c)] = y[c];
                }
            }
            advance_rows(&w_p);
            advance_rows(&w_q);
        }
    }
    // Sort the pair's real indices by their diagonal entries, ascending (ties by index),
    // so that the whole diagonal tends to ascending order and the rotations of later
    // rounds stay close to the identity. Phantom indices keep their places. The real
    // local indices are [0, real_p) and [block, block + real count of block q).
    wg_diagonal[2u * held] = a_p[2u * held];
    wg_diagonal[2u * held + 1u] = a_q[2u * held + 1u];
    workgroupBarrier();
    let real_p = min(block, n - min(n, pair.x * block));
    for (var e = 0u; e < 2u; e++) {
        let i = p + e;
        var place = i;
        if (i < l && block_index(pair, i, block) < n) {
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
    let ll = l * l;
    if (q < l) {
        for (var i = 0u; i < POSITIONS; i++) {
            if (i < l) {
                let row = g * ll + wg_target[i] * l;
                bs_rot[row + p] = w_p[i];
                bs_rot[row + q] = w_q[i];
            }
        }
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
