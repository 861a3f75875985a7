// The orthonormal factor Q of the QR decomposition A = Q R of each square matrix of a
// batch, by blocked Householder reflections (LAPACK's sgeqrf + sorgqr, compact WY).
// Bindings follow src/gpu/pipeline.rs: reads, then writes, then params. Every entry
// point declares its own bindings; they share the (group, binding) slots.
//
// Layouts (row-major, f32):
//   a     [batch, n, n]              the input (read by qr_init only)
//   work  [batch, n, n]              A, overwritten by the factorisation (its trailing
//                                    columns are updated by GEMMs between panels): R
//                                    at the end (zero below the diagonal)
//   q     [batch, n, n]              Q (set to I by qr_init, formed by GEMMs)
//   v     [batch, n, n]              column j is the Householder vector v_j: 0 above row j,
//                                    1 at row j, the reflector below (zero on entry)
//   t     [batch, panels, PANEL, PANEL]  T_k of panel k, upper triangular, zero-padded
//
// Panel k holds the columns k0 = k·PANEL .. k0 + width. `qr_panel` factors it in one
// workgroup per matrix (columns one after the other, unblocked Householder):
//   x = work[j.., j] (j = k0 + column), α = x_0, σ = ‖x_1..‖²;
//   σ = 0: τ = 0 and H_j = I (a zero or already triangular column; rank-deficient A);
//   else β = −sign(α)·sqrt(α² + σ), τ = (β − α)/β, v = (1, x_1.. / (α − β));
//   every later column of the panel: c ← c − τ (vᵀ c) v;
// α and σ are computed on x scaled by 1/max|x₀| for x₀ the column's rows k0.. before the
// panel (reflections keep ‖x‖ ≤ ‖x₀‖, so the squares cannot overflow, and underflow only
// for a remainder below 1e-19·max|x₀|, which then counts as zero; τ and v do not depend
// on the scale). It also accumulates T_k with
// H_k0 ⋯ H_(k0+width−1) = I − V_k T_k V_kᵀ:
//   T[j, j] = τ_j,  T[0..j, j] = −τ_j T[0..j, 0..j] (V[:, 0..j]ᵀ v_j).
// The GEMMs (src/ops/qr.rs) then update the trailing columns,
// work[k0.., k0+width..] −= V_k (T_kᵀ (V_kᵀ work[k0.., k0+width..])), and, once every
// panel is factored, form Q = H_0 ⋯ H_(n−1) panel by panel from the last:
// q[k0.., k0..] −= V_k (T_k (V_kᵀ q[k0.., k0..])).
//
// Invocation (lane, c) = (lid / PANEL, lid % PANEL) of qr_panel (PANEL · LANES
// invocations) owns the rows r ≡ lane (mod LANES) of panel column c: it alone reads and
// writes them in `work`, and writes them in `v` when c is the column being reduced; a
// storage barrier makes v visible to the other invocations. Sums over rows are per lane,
// then over the LANES lanes in lane order, by every invocation that needs them (τ by
// all alike): deterministic, four barriers per column. LANES (an override, a power of
// two from 2 to 8) is chosen by the host from n (src/ops/qr.rs, `row_lanes`): 2 up to
// n = 1024 (on lavapipe 64 invocations took half the time of 256, and panels of 16
// columns made the GEMMs slower than they made the panels faster), more above, because
// lavapipe ends a loop nest silently after 65535 iterations per invocation and a panel
// costs an invocation about 40·n / LANES of them: with LANES = 2, Q was garbage from
// n ≈ 1640 on (‖QᵀQ − I‖_F 0.9 at n = 1792, 1.4 at n = 2048).

struct QrParams {
    n: u32,
    batch: u32,
    // First column of the panel (qr_panel).
    col0: u32,
    // Columns of the panel, ≤ PANEL (qr_panel).
    width: u32,
    // Panels per matrix: ceil(n / PANEL).
    panels: u32,
}

// Columns per panel (`PANEL` in src/ops/qr.rs).
const PANEL: u32 = 32u;
// Invocations per workgroup.
const WG: u32 = 256u;
// Row lanes per panel column (a power of two, 2 to MAX_LANES; see the header).
override LANES: u32 = 2u;
const MAX_LANES: u32 = 8u;
// Invocations of qr_panel: PANEL · LANES.
override PANEL_WG: u32 = PANEL * LANES;
// The smallest normal f32; a column whose largest entry is below it counts as zero.
const MIN_NORMAL: f32 = 1.17549435e-38;

@group(0) @binding(0) var<storage, read> a_in: array<f32>;
@group(0) @binding(1) var<storage, read_write> work_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(3) var<storage, read> init_params: QrParams;

@group(0) @binding(0) var<storage, read_write> work: array<f32>;
@group(0) @binding(1) var<storage, read_write> v: array<f32>;
@group(0) @binding(2) var<storage, read_write> t: array<f32>;
@group(0) @binding(3) var<storage, read> panel_params: QrParams;

// work = a, q = I; one invocation per element.
@compute @workgroup_size(256)
fn qr_init(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let n = init_params.n;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= init_params.batch * n * n) {
        return;
    }
    work_out[g] = a_in[g];
    let e = g % (n * n);
    q_out[g] = select(0.0, 1.0, e / n == e % n);
}

// Partial sums and maxima per invocation, then per column (lane order).
var<workgroup> wg_part: array<f32, PANEL * MAX_LANES>;
// T of the panel, row-major PANEL × PANEL.
var<workgroup> wg_t: array<f32, 1024>;
// α of the current column (its diagonal entry), scaled.
var<workgroup> wg_alpha: f32;
// 1 / max|x| of each panel column over rows col0.. (0 for a zero column).
var<workgroup> wg_scale: array<f32, PANEL>;

// The first row r ≥ start with r ≡ lane (mod LANES).
fn first_row(start: u32, lane: u32) -> u32 {
    return start + ((lane + LANES - (start & (LANES - 1u))) & (LANES - 1u));
}

// Factors panel (col0, width) of every matrix: one workgroup per matrix.
@compute @workgroup_size(PANEL_WG)
fn qr_panel(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let p = panel_params;
    let mat = wid.x + wid.y * nwg.x;
    if (mat >= p.batch) {
        return;
    }
    let n = p.n;
    let base = mat * n * n;
    let k0 = p.col0;
    let width = p.width;
    let c = lid % PANEL;
    let lane = lid / PANEL;
    for (var e = lid; e < PANEL * PANEL; e += PANEL_WG) {
        wg_t[e] = 0.0;
    }
    // Each column's scale 1 / max|x| over rows k0.. (0 for a zero column).
    var m = 0.0;
    if (c < width) {
        for (var r = first_row(k0, lane); r < n; r += LANES) {
            m = max(m, abs(work[base + r * n + k0 + c]));
        }
    }
    wg_part[lid] = m;
    workgroupBarrier();
    if (lid < PANEL) {
        var top = 0.0;
        for (var l = 0u; l < LANES; l++) {
            top = max(top, wg_part[l * PANEL + lid]);
        }
        wg_scale[lid] = select(0.0, 1.0 / top, top >= MIN_NORMAL);
    }
    workgroupBarrier();
    for (var j = 0u; j < width; j++) {
        let col = k0 + j;
        let s = wg_scale[j];
        // σ of the scaled x_1.., and α.
        var sigma = 0.0;
        if (c == j) {
            for (var r = first_row(col, lane); r < n; r += LANES) {
                let x = work[base + r * n + col] * s;
                if (r == col) {
                    wg_alpha = x;
                } else {
                    sigma += x * x;
                }
            }
        }
        wg_part[lid] = sigma;
        workgroupBarrier();
        // τ and the factor of v, by every invocation alike.
        var total = 0.0;
        for (var l = 0u; l < LANES; l++) {
            total += wg_part[l * PANEL + j];
        }
        var tau = 0.0;
        var scale_v = 0.0;
        // R[col, col]: β on the column's own scale (x_0 stays when H_j = I).
        var diagonal = 0.0;
        if (total > 0.0) {
            let alpha = wg_alpha;
            let norm = sqrt(alpha * alpha + total);
            let beta = select(norm, -norm, alpha >= 0.0);
            tau = (beta - alpha) / beta;
            scale_v = s / (alpha - beta);
            diagonal = beta / s;
        }
        if (c == j) {
            for (var r = first_row(col, lane); r < n; r += LANES) {
                let row = base + r * n + col;
                let x = work[row];
                v[row] = select(x * scale_v, 1.0, r == col);
                // H_j maps the column to β e_col: R's column, zero below the diagonal.
                if (r > col || total > 0.0) {
                    work[row] = select(0.0, diagonal, r == col);
                }
            }
        }
        storageBarrier();
        // vᵀ c for the later columns, v_cᵀ v for the earlier ones (rows col..: v is
        // zero above).
        var d = 0.0;
        if (c < width && c != j) {
            for (var r = first_row(col, lane); r < n; r += LANES) {
                let row = base + r * n;
                var y: f32;
                if (c < j) {
                    y = v[row + k0 + c];
                } else {
                    y = work[row + k0 + c];
                }
                d += v[row + col] * y;
            }
        }
        wg_part[lid] = d;
        workgroupBarrier();
        if (c > j && c < width) {
            var dot = 0.0;
            for (var l = 0u; l < LANES; l++) {
                dot += wg_part[l * PANEL + c];
            }
            let f = tau * dot;
            for (var r = first_row(col, lane); r < n; r += LANES) {
                let row = base + r * n;
                work[row + k0 + c] -= f * v[row + col];
            }
        }
        if (lid < j) {
            var acc = 0.0;
            for (var i = lid; i < j; i++) {
                var dot = 0.0;
                for (var l = 0u; l < LANES; l++) {
                    dot += wg_part[l * PANEL + i];
                }
                acc += wg_t[lid * PANEL + i] * dot;
            }
            wg_t[lid * PANEL + j] = -tau * acc;
        }
        if (lid == j) {
            wg_t[j * PANEL + j] = tau;
        }
        workgroupBarrier();
    }
    let out = (mat * p.panels + k0 / PANEL) * PANEL * PANEL;
    for (var e = lid; e < PANEL * PANEL; e += PANEL_WG) {
        t[out + e] = wg_t[e];
    }
}
