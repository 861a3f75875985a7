//! ReLU, sigmoid and tanh forward and backward on the GPU against the f64 CPU
//! reference; the activations with constants (`ops::activation::Pointwise`) against
//! PyTorch autograd fixtures and the reference.

mod common;
mod op_fixtures;

use common::to_f64;

use common::TestRng;
use ekfac::ops::activation;
use ekfac::reference::ops;

/// Inputs spanning the interesting ranges: exact zeros (ReLU's kink), tiny values
/// (tanh's cancellation region), moderate values, and ±1e4 / ±88 where a naive tanh or
/// sigmoid overflows. 1000 elements: more than one workgroup, not a multiple of 256.
fn inputs() -> Vec<f32> {
    let mut rng = TestRng::new(7);
    let mut x: Vec<f32> = (0..1000)
        .map(|i| match i % 5 {
            0 => 0.0,
            1 => rng.uniform() as f32 * 1e-3,
            2 => rng.uniform() as f32 * 4.0,
            3 => rng.uniform() as f32 * 30.0,
            _ => rng.uniform() as f32,
        })
        .collect();
    x.extend([1e4, -1e4, 88.0, -88.0, 100.0, -100.0, 0.2499, 0.25, -0.2501]);
    x
}

/// Largest |got − want| / max(|want|, floor) over the elements.
fn max_rel(got: &[f32], want: &[f64], floor: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| (f64::from(g) - w).abs() / w.abs().max(floor(i)))
        .fold(0.0, f64::max)
}

/// Tolerances. ReLU is exact. Forward, elementwise relative (floor 1e-30, so the
/// subnormal sigmoid(−88) may flush to 0 but never become NaN): WGSL bounds `exp` by
/// 3 + 2|x| ulp; sigmoid's relative error is at most that of `exp(−|x|)`, for |x| ≤ 30
/// (the largest input whose result is neither ≈1 nor subnormal) 63 ulp ≈ 4e-6: 1e-5.
/// tanh uses `exp(−2|x|)` only for |x| ≥ 0.25, where its error is damped by
/// 2e/((1−e)(1+e)) ≤ 2 relative to that of e and e's own bound shrinks with e: 2e-6;
/// below 0.25 the Taylor polynomial is accurate to 1e-8. Backward, relative to
/// max(|want|, |grad_out|): one or two f32 roundings of `1 − y²` or `y(1 − y)` from
/// the same f32 `y` as the f64 reference: 1e-6.
#[test]
fn activations_match_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let x = inputs();
    let n = x.len();
    let mut rng = TestRng::new(8);
    let grad = rng.vec(n);
    let xg = ctx.upload(&x, &[n]).unwrap();
    let gg = ctx.upload(&grad, &[n]).unwrap();
    let y: Vec<_> = (0..3).map(|_| ctx.zeros(&[n]).unwrap()).collect();
    let dx: Vec<_> = (0..3).map(|_| ctx.zeros(&[n]).unwrap()).collect();
    let mut rec = ctx.recorder();
    activation::relu_forward(&mut rec, &xg, &y[0]).unwrap();
    activation::sigmoid_forward(&mut rec, &xg, &y[1]).unwrap();
    activation::tanh_forward(&mut rec, &xg, &y[2]).unwrap();
    activation::relu_backward(&mut rec, &xg, &gg, &dx[0]).unwrap();
    activation::sigmoid_backward(&mut rec, &y[1], &gg, &dx[1]).unwrap();
    activation::tanh_backward(&mut rec, &y[2], &gg, &dx[2]).unwrap();
    rec.submit().unwrap();
    let got: Vec<Vec<f32>> = y.iter().chain(&dx).map(|t| ctx.read(t).unwrap()).collect();
    assert!(
        got.iter().flatten().all(|v| v.is_finite()),
        "non-finite output"
    );

    let (x64, g64) = (to_f64(&x), to_f64(&grad));
    let relu = ops::relu_forward(&x64);
    let sigmoid = ops::sigmoid_forward(&x64);
    let tanh = ops::tanh_forward(&x64);
    let tiny = |_| 1e-30;
    let by_grad = |i: usize| g64[i].abs().max(1e-30);
    assert_eq!(max_rel(&got[0], &relu, tiny), 0.0, "relu forward is exact");
    assert!(max_rel(&got[1], &sigmoid, tiny) < 1e-5, "sigmoid forward");
    assert!(max_rel(&got[2], &tanh, tiny) < 2e-6, "tanh forward");
    let relu_backward = ops::relu_backward(&x64, &g64);
    assert_eq!(
        max_rel(&got[3], &relu_backward, tiny),
        0.0,
        "relu backward is exact"
    );
    // Backward from the GPU's own forward output (as the network does).
    let sig_backward = ops::sigmoid_backward(&to_f64(&got[1]), &g64);
    let tanh_backward = ops::tanh_backward(&to_f64(&got[2]), &g64);
    assert!(
        max_rel(&got[4], &sig_backward, by_grad) < 1e-6,
        "sigmoid backward"
    );
    assert!(
        max_rel(&got[5], &tanh_backward, by_grad) < 1e-6,
        "tanh backward"
    );
    // ReLU's derivative at exactly 0 is 0.
    assert!(x.iter().zip(&got[3]).all(|(&x, &d)| x != 0.0 || d == 0.0));
}

/// More elements than one grid dimension can cover (65535 workgroups of 256): the
/// 2-D grid of `grid_1d` must reach the last element, and the guard must stop the
/// invocations past it. ReLU backward is exact, so every element is compared.
#[test]
fn activation_covers_a_two_dimensional_grid() {
    let Some(ctx) = common::gpu() else { return };
    let n = 65535 * 256 + 300;
    let x: Vec<f32> = (0..n)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let g: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let xg = ctx.upload(&x, &[n]).unwrap();
    let gg = ctx.upload(&g, &[n]).unwrap();
    let dx = ctx.zeros(&[n]).unwrap();
    let mut rec = ctx.recorder();
    activation::relu_backward(&mut rec, &xg, &gg, &dx).unwrap();
    rec.submit().unwrap();
    let got = ctx.read(&dx).unwrap();
    let wrong = (0..n).find(|&i| got[i] != if i % 3 == 0 { 0.0 } else { g[i] });
    assert_eq!(wrong, None, "first wrong element");
}

/// Every activation with constants, each case with random values and every kink and
/// branch boundary exactly (see generate_ops.py), against PyTorch autograd: relative
/// Frobenius 1e-6 (WGSL's `exp` and `log` within a few ulp of f32, a few roundings).
#[test]
fn pointwise_activations_match_pytorch() {
    for name in [
        "leaky_relu",
        "leaky_relu_default",
        "elu",
        "hardtanh",
        "relu6",
        "hardswish",
        "hardsigmoid",
        "softplus",
        "softplus_default",
        "mish",
    ] {
        let f = op_fixtures::OpFixture::load(name);
        op_fixtures::check_layer(
            &f,
            op_fixtures::Tolerances {
                forward: 1e-6,
                backward: 1e-6,
            },
        );
    }
}

/// Element by element on the GPU against the f64 reference over [`inputs`] (±1e4, ±100,
/// ±88 included, where a naive softplus or mish overflows). Forward errors relative to
/// `max(|want|, 1e-6·(1 + |x|))`, at most 4e-6 (`exp`/`log` within `3 + 2|x|` ulp,
/// `1 + u` rounding once; the piecewise-linear ones exact up to one rounding; `elu`'s
/// `eˣ − 1` without cancellation). Backward errors relative to `max(|want|, |g|·(1 +
/// |x|))`, the size of the terms the derivative adds (mish's crosses 0 near x = −1.19),
/// at most 1e-6.
#[test]
fn pointwise_activations_match_the_reference_elementwise() {
    use ekfac::ops::activation::Pointwise;
    let Some(ctx) = common::gpu() else { return };
    let x = inputs();
    let mut rng = TestRng::new(8);
    let g: Vec<f32> = (0..x.len())
        .map(|_| rng.uniform() as f32 * 2.0 - 1.0)
        .collect();
    let gx = ctx.upload(&x, &[x.len()]).unwrap();
    let gg = ctx.upload(&g, &[g.len()]).unwrap();
    for f in [
        Pointwise::LeakyRelu {
            negative_slope: 0.01,
        },
        Pointwise::Elu { alpha: 1.5 },
        Pointwise::Hardtanh {
            min: -2.0,
            max: 3.5,
        },
        Pointwise::Hardswish,
        Pointwise::Hardsigmoid,
        Pointwise::Softplus {
            beta: 0.5,
            threshold: 20.0,
        },
        Pointwise::Mish,
    ] {
        let y = ctx.zeros(&[x.len()]).unwrap();
        let dx = ctx.zeros(&[x.len()]).unwrap();
        let mut rec = ctx.recorder();
        f.forward(&mut rec, &gx, &y).unwrap();
        f.backward(&mut rec, &gx, &gg, &dx).unwrap();
        rec.submit().unwrap();
        let (x64, g64) = (to_f64(&x), to_f64(&g));
        let floor = |i: usize| 1e-6 * (1.0 + x64[i].abs());
        let want = ops::pointwise_forward(&f, &x64);
        let e = max_rel(&ctx.read(&y).unwrap(), &want, floor);
        assert!(e < 4e-6, "{f:?} forward: {e:e}");
        let want = ops::pointwise_backward(&f, &x64, &g64);
        let terms = |i: usize| g64[i].abs() * (1.0 + x64[i].abs());
        let e = max_rel(&ctx.read(&dx).unwrap(), &want, terms);
        assert!(e < 1e-6, "{f:?} backward: {e:e}");
    }
}

/// Bad constants are build errors naming the node and the attribute.
#[test]
fn pointwise_refusals() {
    let build = |op: &str, attrs: serde_json::Value| {
        let node = ekfac::graph::Node::new(
            "blocks.0.act",
            op,
            vec!["x".into()],
            attrs.as_object().cloned().unwrap_or_default(),
        );
        ekfac::layers::build(&node, &[&[4]]).map(|_| ())
    };
    for (op, attrs, want) in [
        (
            "hardtanh",
            serde_json::json!({"min_val": 1.0, "max_val": -1.0}),
            "must not exceed max_val",
        ),
        (
            "softplus",
            serde_json::json!({"beta": 0.0}),
            "\"beta\" must not be 0",
        ),
        (
            "leaky_relu",
            serde_json::json!({"negative_slope": 1e300}),
            "finite f32",
        ),
        (
            "elu",
            serde_json::json!({"alpha": 1.0, "scale": 2.0}),
            "scale",
        ),
        ("mish", serde_json::json!({"beta": 1.0}), "beta"),
    ] {
        let err = build(op, attrs.clone()).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("blocks.0.act"),
            "{op} {attrs}: {err}"
        );
    }
    assert!(build("elu", serde_json::json!({"alpha": 0.5, "inplace": true})).is_ok());
}
