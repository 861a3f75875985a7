//! The attention ops of issue 11 — batched `matmul`, `softmax` over the last dim,
//! `masked_fill` with a constant mask and `scaled_dot_product_attention` — forward
//! and the backward of a stack of vectors, against PyTorch autograd fixtures
//! (`tests/fixtures/ops/`), the f64 reference, and each other.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::graph::Node;
use ekfac::layers::{BackwardArgs, ForwardArgs};
use ekfac::reference::attention as reference;
use op_fixtures::{OpFixture, Tolerances, rel_err64};
use serde_json::json;

/// GEMM results in f32 with K ≤ 70 products per element: each element's rounding error
/// is at most about `K·2⁻²⁴ ≈ 4e-6` of `Σ|a·b|`; over random signs the errors add
/// like a random walk, `√K·2⁻²⁴ ≈ 5e-7` of `‖a‖‖b‖` (4e-8 relative observed): 1e-6.
const MATMUL_TOL: f64 = 1e-6;

/// Softmax: `x − max` is exact for the entries that matter (Sterbenz), `exp` is within
/// a few ulp over `|x − max| ≲ 20` where the probabilities are not negligible, and the
/// row sum adds `√n·2⁻²⁴` (random-walk rounding, n ≤ 300): 1e-6 forward (6e-8
/// observed). Backward `y ⊙ (g − Σ g y)` adds the dot product's rounding relative to
/// `|g|`, of the same size: 1e-6.
const SOFTMAX_TOL: f64 = 1e-6;

fn node(op: &str, inputs: usize, attrs: serde_json::Value) -> Node {
    let names = (0..inputs).map(|i| format!("x{i}")).collect();
    Node::new(
        "blocks.0.attn",
        op,
        names,
        attrs.as_object().cloned().unwrap_or_default(),
    )
}

fn build_err(op: &str, attrs: serde_json::Value, shapes: &[&[usize]]) -> String {
    ekfac::layers::build(&node(op, shapes.len(), attrs), shapes)
        .unwrap_err()
        .to_string()
}

#[test]
fn matmul_layers_match_pytorch() {
    for name in ["matmul_heads", "matmul_tiles"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "matmul");
        let tol = Tolerances {
            forward: MATMUL_TOL,
            backward: MATMUL_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Shapes that are not `[*, M, K]`·`[*, K, N]` with equal leading dims are refused,
/// naming the node and both shapes.
#[test]
fn matmul_refuses_bad_shapes() {
    for (a, b, why) in [
        (&[2, 3, 4][..], &[2, 5, 6][..], "inner dims differ"),
        (&[2, 3, 4], &[3, 4, 6], "leading dims differ"),
        (&[4], &[4, 6], "at least 2 dims"),
        (&[3, 4, 5], &[5, 6], "leading dims differ"),
    ] {
        let err = build_err("matmul", json!({}), &[a, b]);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains(why) && err.contains("[B, "),
            "{err}"
        );
    }
    let err = build_err("matmul", json!({}), &[&[2, 3]]);
    assert!(err.contains("two inputs"), "{err}");
    let err = build_err("matmul", json!({"transpose": true}), &[&[2, 3], &[3, 2]]);
    assert!(err.contains("unknown attribute \"transpose\""), "{err}");
}

#[test]
fn softmax_layers_match_pytorch() {
    for name in [
        "softmax_rows",
        "softmax_wide",
        "softmax_large_logits",
        "softmax_one_kept",
    ] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "softmax");
        let tol = Tolerances {
            forward: SOFTMAX_TOL,
            backward: SOFTMAX_TOL,
        };
        let Some((y, _)) = op_fixtures::check_layer(&f, tol) else {
            continue;
        };
        // Entries at float32's lowest value (masked) get exactly 0.
        let x = f.values("x");
        for (i, (&x, &y)) in x.iter().zip(&y).enumerate() {
            if x == f64::from(f32::MIN) {
                assert_eq!(y, 0.0, "{name}: y[{i}] of a masked entry");
            }
        }
    }
}

/// `-inf` entries (what `masked_fill(mask, -inf)` leaves): rows with all but one
/// entry at `-inf` give exactly one-hot probabilities and zero gradients, rows with a
/// few give the f64 reference's values; on the GPU for a stack of 2 gradients.
#[test]
fn softmax_of_minus_infinity_entries() {
    let Some(ctx) = common::gpu() else { return };
    let n = 6;
    let mut rng = TestRng::new(7);
    let mut x = rng.vec(5 * n);
    let kept: [&[usize]; 5] = [&[3], &[0], &[5], &[1, 2], &[0, 2, 4, 5]];
    for (r, keep) in kept.iter().enumerate() {
        for j in 0..n {
            if !keep.contains(&j) {
                x[r * n + j] = f32::NEG_INFINITY;
            }
        }
    }
    let g = rng.vec(2 * x.len());
    let layer = ekfac::layers::build(&node("softmax", 1, json!({"dim": -1})), &[&[n]]).unwrap();
    let xg = ctx.upload(&x, &[5, n]).unwrap();
    let gg = ctx.upload(&g, &[10, n]).unwrap();
    let (y, dx) = op_fixtures::run_gpu(&ctx, layer.as_ref(), 5, 2, &[&xg], &[], &gg);
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let g64: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
    let want_y = reference::softmax_forward(&x64, n, None);
    let want_dx = reference::softmax_backward(&want_y, &g64, n);
    let y64: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
    let dx64: Vec<f64> = dx[0].iter().map(|&v| f64::from(v)).collect();
    for r in 0..3 {
        for j in 0..n {
            let want = if kept[r].contains(&j) { 1.0 } else { 0.0 };
            assert_eq!(y[r * n + j], want, "row {r}");
            for v in 0..2 {
                assert_eq!(dx[0][(v * 5 + r) * n + j], 0.0, "row {r}, vector {v}");
            }
        }
    }
    let e = rel_err64(&y64, &want_y);
    assert!(e < SOFTMAX_TOL, "forward error {e:e}");
    let e = rel_err64(&dx64, &want_dx);
    assert!(e < SOFTMAX_TOL, "backward error {e:e}");
}

/// `dim` must be the last dim; errors name the node and the attribute.
#[test]
fn softmax_refuses_other_dims() {
    for dim in [json!(1), json!(-2), json!(0), json!("last")] {
        let err = build_err("softmax", json!({ "dim": dim }), &[&[3, 4]]);
        assert!(
            err.contains("node \"blocks.0.attn\"") && err.contains("\"dim\""),
            "{err}"
        );
    }
    let err = build_err("softmax", json!({}), &[&[3, 4]]);
    assert!(err.contains("missing attribute \"dim\""), "{err}");
    for dim in [-1, 2] {
        let layer =
            ekfac::layers::build(&node("softmax", 1, json!({ "dim": dim })), &[&[3, 4]]).unwrap();
        assert_eq!(layer.output_shape(), &[3, 4]);
    }
}

/// The reference softmax of one row by hand, and its Jacobian–vector identity: the
/// gradient is orthogonal to the ones vector.
#[test]
fn softmax_reference_by_hand() {
    let y = reference::softmax_forward(&[0.0, 2f64.ln(), f64::NEG_INFINITY], 3, None);
    assert!((y[0] - 1.0 / 3.0).abs() < 1e-15 && (y[1] - 2.0 / 3.0).abs() < 1e-15);
    assert_eq!(y[2], 0.0);
    let gx = reference::softmax_backward(&y, &[1.0, -1.0, 5.0], 3);
    assert!(gx.iter().sum::<f64>().abs() < 1e-15);
    // d y0 / d x0 = y0 (1 − y0), d y1 / d x0 = −y0 y1: (1, −1)·J = (2/9 + 2/9, ...).
    assert!((gx[0] - 4.0 / 9.0).abs() < 1e-15, "{gx:?}");
    let layer = ekfac::layers::build(&node("softmax", 1, json!({"dim": -1})), &[&[3]]).unwrap();
    let out = layer.reference_forward(&ForwardArgs {
        batch: 1,
        inputs: &[&[0.0, 2f64.ln(), f64::NEG_INFINITY]],
        params: &[],
    });
    let back = layer.reference_backward(&BackwardArgs {
        stack: 1,
        batch: 1,
        grad_out: &[1.0, -1.0, 5.0],
        inputs: &[&[0.0, 2f64.ln(), f64::NEG_INFINITY]],
        output: &out,
        params: &[],
        input_grads: &[true],
        param_grads: false,
    });
    assert_eq!(back.inputs[0].as_deref(), Some(&gx[..]));
}
