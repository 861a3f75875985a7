// The part every loss kernel shares (src/ops/loss.rs prepends it to shaders/loss_<loss>.wgsl):
// the parameters and bindings of the backpropagated output-space vectors of one batch
// (SPEC §3.2; src/loss/ is the f64 reference) and the Philox4x32-10 generator of the MC
// contract (src/rng.rs). Bindings follow src/gpu/pipeline.rs: reads, writes, params.
//
// backprop_vectors (here, calling the loss file's write_vectors): (logits [B, C] f32,
//   labels [B] u32, targets [B, C] f32; vectors [nv, B, C] f32; params). One
//   invocation per (v, n), v-major;
//   grid_1d over ceil(nv·B / 256) workgroups of 256. `labels` is read for cross-entropy,
//   `targets` for MSE/BCE (the wrapper binds the logits in place of the unused one).
// philox_blocks: (; words [B, M, Cc, 4] u32; params): the raw Philox blocks of counters
//   (batch_start + n, m, c, 0), one invocation per counter (verification of the contract).

struct LossParams {
    batch: u32,
    classes: u32,
    num_vectors: u32,
    batch_start: u32,
    // 0 type-2, 1 empirical, 2 mc
    mode: u32,
    seed_lo: u32,
    seed_hi: u32,
    // type-2: MSE σ_b·√(2c_C), CE σ_b, BCE σ_b·√c_C; empirical/MC: MSE 2σ', CE σ_b,
    // BCE σ' (f32 bits).
    scale: f32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read> targets: array<f32>;
@group(0) @binding(3) var<storage, read_write> vectors: array<f32>;
@group(0) @binding(4) var<storage, read> params: LossParams;

@group(0) @binding(0) var<storage, read_write> words: array<u32>;
@group(0) @binding(1) var<storage, read> pparams: LossParams;

// ---- Philox4x32-10 -------------------------------------------------------------

// (hi, lo) of the 64-bit product a·b, from 16-bit halves (WGSL has no u64).
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox(counter: vec4<u32>, seed: vec2<u32>) -> vec4<u32> {
    var x = counter;
    var k = seed;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, x.x);
        let p1 = mulhilo(0xCD9E8D57u, x.z);
        x = vec4<u32>(p1.x ^ x.y ^ k.x, p1.y, p0.x ^ x.w ^ k.y, p0.y);
    }
    return x;
}

fn block(n: u32, m: u32, c: u32) -> vec4<u32> {
    return philox(vec4<u32>(n, m, c, 0u), vec2<u32>(params.seed_lo, params.seed_hi));
}

// (x >> 8)·2⁻²⁴ ∈ [0, 1), exact in f32.
fn to_uniform(x: u32) -> f32 {
    return f32(x >> 8u) * (1.0 / 16777216.0);
}

// ---- accurate f32 transcendental pieces for Box–Muller -----------------------------
// WGSL only guarantees cos to 2⁻¹¹ absolute and log to 2⁻²¹ absolute near 1, so the
// Gaussian is built from exact range reductions and short series (≈1e-7 relative).

// ln(j·2⁻²⁴) for an integer 1 ≤ j ≤ 2²⁴: j = m·2^e exactly with m ∈ [0.75, 1.5), then
// ln m = 2·atanh(s), s = (m − 1)/(m + 1) ∈ [−1/7, 1/5], by its odd series.
fn ln_scaled(j: u32) -> f32 {
    var e = i32(firstLeadingBit(j));
    var m = ldexp(f32(j), -e);
    if (m >= 1.5) {
        m = m * 0.5;
        e = e + 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    var series = 1.0 / 15.0;
    for (var k = 13; k >= 1; k = k - 2) {
        series = 1.0 / f32(k) + s2 * series;
    }
    return 2.0 * s * series + f32(e - 24) * 0.6931471805599453;
}

// sin x and cos x for x ∈ [0, π/4] by Taylor series to x¹³ (error < 1e-11).
fn sin_small(x: f32) -> f32 {
    let x2 = x * x;
    return x * (1.0 - x2 / 6.0 * (1.0 - x2 / 20.0 * (1.0 - x2 / 42.0 * (1.0 - x2 / 72.0
        * (1.0 - x2 / 110.0 * (1.0 - x2 / 156.0))))));
}

fn cos_small(x: f32) -> f32 {
    let x2 = x * x;
    return 1.0 - x2 / 2.0 * (1.0 - x2 / 12.0 * (1.0 - x2 / 30.0 * (1.0 - x2 / 56.0
        * (1.0 - x2 / 90.0 * (1.0 - x2 / 132.0)))));
}

// cos(2π·u) for u = i·2⁻²⁴ ∈ [0, 1): t = 4u splits exactly into a quadrant q and a
// fraction f, and cos(π/2·f) or sin(π/2·f) is taken on [0, π/4] by symmetry.
fn cos_two_pi(u: f32) -> f32 {
    let t = 4.0 * u;
    let q = u32(floor(t));
    let f = t - floor(t);
    var c: f32;
    var s: f32;
    if (f <= 0.5) {
        c = cos_small(1.5707963267948966 * f);
        s = sin_small(1.5707963267948966 * f);
    } else {
        c = sin_small(1.5707963267948966 * (1.0 - f));
        s = cos_small(1.5707963267948966 * (1.0 - f));
    }
    switch q {
        case 0u: { return c; }
        case 1u: { return -s; }
        case 2u: { return -c; }
        default: { return s; }
    }
}

// Box–Muller on words 0 and 1: √(−2 ln u₁)·cos(2π u₂), u₁ = ((x₀ >> 8) + 1)·2⁻²⁴.
fn gaussian(n: u32, m: u32, c: u32) -> f32 {
    let x = block(n, m, c);
    let r = sqrt(max(-2.0 * ln_scaled((x.x >> 8u) + 1u), 0.0));
    return r * cos_two_pi(to_uniform(x.y));
}

// ---- shared by the losses ---------------------------------------------------------

fn sigmoid(v: f32) -> f32 {
    let e = exp(-abs(v));
    if (v >= 0.0) {
        return 1.0 / (1.0 + e);
    }
    return e / (1.0 + e);
}

fn logit(n: u32, i: u32) -> f32 {
    return logits[n * params.classes + i];
}

// One invocation per (v, n), v-major; the loss file's write_vectors writes the vector.
@compute @workgroup_size(256)
fn backprop_vectors(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let t = (wid.x + wid.y * nwg.x) * 256u + lid;
    let b = params.batch;
    if (t >= params.num_vectors * b) {
        return;
    }
    let v = t / b;
    let n = t % b;
    write_vectors(v, n, params.batch_start + n, (v * b + n) * params.classes);
}

@compute @workgroup_size(256)
fn philox_blocks(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = (wid.x + wid.y * nwg.x) * 256u + lid;
    let per_n = pparams.num_vectors * pparams.classes;
    if (t >= pparams.batch * per_n) {
        return;
    }
    let n = t / per_n;
    let m = (t % per_n) / pparams.classes;
    let c = t % pparams.classes;
    let x = philox(vec4<u32>(pparams.batch_start + n, m, c, 0u),
                   vec2<u32>(pparams.seed_lo, pparams.seed_hi));
    words[4u * t] = x.x;
    words[4u * t + 1u] = x.y;
    words[4u * t + 2u] = x.z;
    words[4u * t + 3u] = x.w;
}
