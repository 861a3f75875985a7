//! ReLU, sigmoid and tanh forward and backward on the GPU against the f64 CPU
//! reference.

mod common;

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
