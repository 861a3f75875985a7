//! SiLU: the layer against a PyTorch autograd fixture, then the GPU kernels against the
//! f64 reference element by element over a wide input range.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, Tolerances};
use serde_json::json;

fn silu_node(attrs: serde_json::Value) -> ekfac::graph::Node {
    let attrs = attrs.as_object().unwrap().clone();
    ekfac::graph::Node::new("block.act", "silu", vec!["x".into()], attrs)
}

/// Against the fixture (relative Frobenius norms, dominated by the moderate inputs):
/// `σ` from one `exp` within `3 + 2|x|` ulp and a few roundings: 1e-6.
#[test]
fn silu_layer_matches_pytorch() {
    let f = OpFixture::load("silu");
    assert_eq!(f.op, "silu");
    let tol = Tolerances {
        forward: 1e-6,
        backward: 1e-6,
    };
    op_fixtures::check_layer(&f, tol);
}

/// Element by element on the GPU against the f64 reference, forward and the backward of
/// a stack of 2 gradients, on zeros, tiny, moderate and saturating inputs (±100, where
/// `σ` underflows or is exactly 1). Errors are relative to the size of the terms:
/// `|x|·σ(x)` forward, `|g|·(σ(x) + |x|·σ′(x))` backward (the derivative crosses 0 near
/// x = −1.28), plus 1e-30 for results that underflow f32. Bound: WGSL's `exp(−|x|)`
/// within `3 + 2|x|` ulp (2⁻²³ relative each) and a few roundings:
/// `1e-6 + 2.4e-7·|x|`.
#[test]
fn silu_gpu_matches_reference_elementwise() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(14);
    let mut x: Vec<f32> = (0..600)
        .map(|i| match i % 4 {
            0 => 0.0,
            1 => rng.uniform() as f32 * 1e-3,
            2 => rng.uniform() as f32 * 4.0,
            _ => rng.uniform() as f32 * 30.0,
        })
        .collect();
    x.extend([100.0, -100.0, 1e4, -1e4, -1.28, 1.28]);
    let n = x.len();
    let grad = rng.vec(2 * n);
    let layer = ekfac::layers::build(&silu_node(json!({})), &[&[n]]).unwrap();
    let xg = ctx.upload(&x, &[1, n]).unwrap();
    let gg = ctx.upload(&grad, &[2, n]).unwrap();
    let (y, dx) = op_fixtures::run_gpu(&ctx, layer.as_ref(), 1, 2, &[&xg], &[], &gg);
    let dx = &dx[0];
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = grad.iter().map(|&v| f64::from(v)).collect();
    let want_y = reference::silu_forward(&x64);
    let want_dx = reference::silu_backward(&x64, &g64);
    for (i, &v) in x64.iter().enumerate() {
        let e = (-v.abs()).exp();
        let s = if v >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        let ds = e / (1.0 + e).powi(2);
        let bound = 1e-6 + 2.4e-7 * v.abs();
        let err = (f64::from(y[i]) - want_y[i]).abs();
        assert!(
            err <= bound * v.abs() * s + 1e-30,
            "forward at x = {v}: {} vs {}",
            y[i],
            want_y[i]
        );
        for j in [i, n + i] {
            let err = (f64::from(dx[j]) - want_dx[j]).abs();
            assert!(
                err <= bound * g64[j].abs() * (s + v.abs() * ds) + 1e-30,
                "backward at x = {v}: {} vs {}",
                dx[j],
                want_dx[j]
            );
        }
    }
}

/// Unknown attributes are refused naming the node; `inplace` is accepted.
#[test]
fn silu_attributes() {
    let err = ekfac::layers::build(&silu_node(json!({"beta": 2})), &[&[4]])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node \"block.act\"") && err.contains("beta"),
        "{err}"
    );
    let layer = ekfac::layers::build(&silu_node(json!({"inplace": true})), &[&[4]]).unwrap();
    assert_eq!(layer.output_shape(), [4]);
}
