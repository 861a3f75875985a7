// Gated activations y = x * c(x) with a smooth gate c, forward and backward over flat
// f32 arrays; the pipeline constant GATE picks c:
//   0 (SILU):      c = sigma, the logistic function (SiLU / swish);
//   1 (GELU_ERF):  c = Phi, the standard normal CDF through erfc (GELU, "none");
//   2 (GELU_TANH): c(x) = (1 + tanh(u)) / 2 with u = sqrt(2/pi) * (x + 0.044715 x^3)
//                  (GELU, "tanh").
// Backward: d/dx x c(x) = c(x) + x c'(x).
// Bindings follow src/gpu/pipeline.rs (reads, then writes, then params), each entry
// point through its own globals:
//   gated_forward:  x;              y;       fparams
//   gated_backward: x, grad_out;    grad_in; bparams
// Backward rows are V-major stacks of the forward input: grad element i belongs to
// x[i % x_len], so the saved input is never repeated.
//
// Dispatch: grid_1d(ceil(len / 256)) workgroups of 256; element i is
// (wid.x + wid.y * nwg.x) * 256 + lid.

struct ElementwiseParams {
    len: u32,
}

struct StackedParams {
    len: u32,
    x_len: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> grad_out: array<f32>;
@group(0) @binding(2) var<storage, read> fparams: ElementwiseParams;
@group(0) @binding(2) var<storage, read_write> grad_in: array<f32>;
@group(0) @binding(3) var<storage, read> bparams: StackedParams;

override GATE: u32 = 0u;
const SILU: u32 = 0u;
const GELU_ERF: u32 = 1u;

const FRAC_1_SQRT_2: f32 = 0.70710678118654752;
const FRAC_1_SQRT_2PI: f32 = 0.39894228040143268;
const SQRT_2_OVER_PI: f32 = 0.79788456080286536;
const TANH_CUBIC: f32 = 0.044715;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// Phi(v) with small relative error in both tails: erfc(z) for z = |v| / sqrt(2) by
// the Chebyshev fit of Numerical Recipes' erfcc (fractional error < 1.2e-7 for all
// z >= 0), Phi = erfc(z) / 2 for v < 0 and 1 - erfc(z) / 2 otherwise. The exponent
// -v^2/2 + poly(t) stays finite: exp underflows to 0 for large |v|.
fn normal_cdf(v: f32) -> f32 {
    let z = abs(v) * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let half_erfc = 0.5 * t * exp(poly - 0.5 * v * v);
    return select(1.0 - half_erfc, half_erfc, v < 0.0);
}

// The standard normal density exp(-v^2/2) / sqrt(2 pi).
fn normal_pdf(v: f32) -> f32 {
    return FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
}

// (sigma(s), sigma'(s)) for the logistic sigma, with exp(-|s|) <= 1 so nothing
// overflows and sigma' = e / (1 + e)^2 keeps its relative accuracy in both tails.
fn logistic(s: f32) -> vec2<f32> {
    let e = exp(-abs(s));
    let r = 1.0 / (1.0 + e);
    return vec2<f32>(select(e * r, r, s >= 0.0), e * r * r);
}

// The tanh form's (1 + tanh(u)) / 2 = sigma(2u) and d/dv of it. The cubic overflows
// to +-inf for |v| > ~1e13, where sigma is exactly 0 or 1 and the derivative 0.
fn tanh_cdf(v: f32) -> vec2<f32> {
    let two_u = 2.0 * SQRT_2_OVER_PI * (v + TANH_CUBIC * v * v * v);
    let s = logistic(two_u);
    let du = 2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * v * v);
    return vec2<f32>(s.x, select(0.0, s.y * du, s.y > 0.0));
}

// (c(v), c'(v)) for the gate GATE.
fn gate(v: f32) -> vec2<f32> {
    switch GATE {
        case SILU: {
            return logistic(v);
        }
        case GELU_ERF: {
            return vec2<f32>(normal_cdf(v), normal_pdf(v));
        }
        default: {
            return tanh_cdf(v);
        }
    }
}

@compute @workgroup_size(256)
fn gated_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= fparams.len) {
        return;
    }
    let v = x[i];
    y[i] = v * gate(v).x;
}

@compute @workgroup_size(256)
fn gated_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= bparams.len || bparams.x_len == 0u) {
        return;
    }
    let v = x[i % bparams.x_len];
    let c = gate(v);
    grad_in[i] = grad_out[i] * (c.x + v * c.y);
}
