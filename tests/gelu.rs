//! GELU (exact and tanh forms): the layer against PyTorch autograd fixtures, then the
//! GPU kernels against the f64 reference element by element over a wide input range.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::layers::ForwardArgs;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, Tolerances};
use serde_json::json;

/// Against the fixtures (relative Frobenius norms, dominated by the moderate inputs):
/// the erfc fit is accurate to 1.2e-7 relative and WGSL's `exp` to `3 + 2|a|` ulp
/// (`|a| ≈ x²/2`), a few ulp in all at |x| ≲ 3 where the norm lives: 1e-6.
const FIXTURE_TOL: f64 = 1e-6;

fn gelu_node(approximate: Option<&str>) -> ekfac::graph::Node {
    let mut attrs = serde_json::Map::new();
    if let Some(a) = approximate {
        attrs.insert("approximate".into(), json!(a));
    }
    ekfac::graph::Node::new("mlp.act", "gelu", vec!["x".into()], attrs)
}

#[test]
fn gelu_layers_match_pytorch() {
    for name in ["gelu_erf", "gelu_tanh"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "gelu");
        let tol = Tolerances {
            forward: FIXTURE_TOL,
            backward: FIXTURE_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Exact zeros, tiny, moderate and saturating inputs (±1e4 overflows the tanh form's
/// cubic, ±40 underflows Φ), more than one workgroup.
fn inputs() -> Vec<f32> {
    let mut rng = TestRng::new(12);
    let mut x: Vec<f32> = (0..600)
        .map(|i| match i % 4 {
            0 => 0.0,
            1 => rng.uniform() as f32 * 1e-3,
            2 => rng.uniform() as f32 * 3.0,
            _ => rng.uniform() as f32 * 12.0,
        })
        .collect();
    x.extend([1e4, -1e4, 40.0, -40.0, 9.0, -9.0, -0.75, 0.75]);
    x
}

/// `(c, c′, a)` at `v` for `gelu(v) = v·c(v)`: `c = Φ` (exact form) or `σ(2u)` (tanh
/// form), its derivative, and the largest `|argument|` of an `exp` the kernel evaluates
/// (`v²/2 + 1.3` with the erfc fit, `2|u|`): the sizes the error bounds scale with.
fn parts(v: f64, tanh_form: bool) -> (f64, f64, f64) {
    if tanh_form {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let two_u = 2.0 * k * (v + 0.044715 * v.powi(3));
        let e = (-two_u.abs()).exp();
        let c = if two_u >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        let dc = e / (1.0 + e).powi(2) * 2.0 * k * (1.0 + 3.0 * 0.044715 * v * v);
        (c, if e == 0.0 { 0.0 } else { dc }, two_u.abs())
    } else {
        let c = 0.5 * libm::erfc(-v / 2f64.sqrt());
        let dc = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (c, dc, 0.5 * v * v + 1.3)
    }
}

/// Element by element on the GPU against the f64 reference, forward and the backward
/// of a stack of 2 gradients. Errors are relative to the size of the terms: `|x|·c(x)`
/// forward, `|g|·(c(x) + |x|·c′(x))` backward (the derivative crosses 0 near
/// x = −0.75, where only this absolute accuracy is meaningful), plus 1e-30 for results
/// that underflow f32. Bound: the erfc fit's 1.2e-7, WGSL's `exp` within `3 + 2|a|`
/// ulp (2⁻²³ relative each), and a few roundings: `2e-6 + 2.4e-7·|a|`.
#[test]
fn gelu_gpu_matches_reference_elementwise() {
    let Some(ctx) = common::gpu() else { return };
    let x = inputs();
    let n = x.len();
    let mut rng = TestRng::new(13);
    let grad = rng.vec(2 * n);
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = grad.iter().map(|&v| f64::from(v)).collect();
    for (approximate, tanh_form) in [("none", false), ("tanh", true)] {
        let layer = ekfac::layers::build(&gelu_node(Some(approximate)), &[&[n]]).unwrap();
        let xg = ctx.upload(&x, &[1, n]).unwrap();
        let gg = ctx.upload(&grad, &[2, n]).unwrap();
        let (y, dx) = op_fixtures::run_gpu(&ctx, layer.as_ref(), 1, 2, &[&xg], &[], &gg);
        let dx = &dx[0];
        let want_y = reference::gelu_forward(&x64, tanh_form);
        let want_dx = reference::gelu_backward(&x64, &g64, tanh_form);
        for (i, &v) in x64.iter().enumerate() {
            let (c, dc, a) = parts(v, tanh_form);
            let bound = 2e-6 + 2.4e-7 * a;
            let e = (f64::from(y[i]) - want_y[i]).abs();
            assert!(
                e <= bound * v.abs() * c + 1e-30,
                "{approximate} forward at x = {v}: {} vs {}",
                y[i],
                want_y[i]
            );
            for j in [i, n + i] {
                let e = (f64::from(dx[j]) - want_dx[j]).abs();
                assert!(
                    e <= bound * g64[j].abs() * (c + v.abs() * dc) + 1e-30,
                    "{approximate} backward at x = {v}: {} vs {}",
                    dx[j],
                    want_dx[j]
                );
            }
        }
    }
}

/// An unknown `approximate` is refused naming the node; the default is the exact form.
#[test]
fn gelu_attributes() {
    let mut node = gelu_node(Some("sigmoid"));
    let err = ekfac::layers::build(&node, &[&[4]])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node \"mlp.act\"") && err.contains("\"approximate\""),
        "{err}"
    );
    node.attrs.clear();
    let layer = ekfac::layers::build(&node, &[&[4]]).unwrap();
    let y = layer.reference_forward(&ForwardArgs {
        batch: 1,
        inputs: &[&[-1.0, 0.0, 1.0, 2.0]],
        params: &[],
    });
    // x·Φ(x) at 1 and 2: Φ(1) = 0.841344746068543, Φ(2) = 0.977249868051821.
    assert!(
        (y[2] - 0.841_344_746_068_543).abs() < 1e-15
            && (y[3] - 2.0 * 0.977_249_868_051_821).abs() < 1e-14
    );
    assert_eq!(y[1], 0.0);
}
