//! Linear forward and backward on the GPU against the f64 CPU reference.

mod common;

use common::to_f64;

use common::TestRng;
use ekfac::geometry::LinearGeometry;
use ekfac::ops::conv::WeightedBackward;
use ekfac::ops::linear::{linear_backward, linear_forward};
use ekfac::reference::ops;

/// Shapes: 1×1, small odd sizes, one just above a 64-wide GEMM tile in every
/// dimension, and a wide bias row (bias on and off).
fn cases() -> Vec<(LinearGeometry, bool)> {
    let geo = |batch, in_features, out_features| LinearGeometry {
        batch,
        in_features,
        out_features,
    };
    vec![
        (geo(1, 1, 1), true),
        (geo(3, 5, 7), false),
        (geo(65, 67, 66), true),
        (geo(2, 9, 300), true),
    ]
}

/// Forward, input, weight and bias gradients, parameter gradients overwritten and
/// accumulated onto random values. Tolerance 1e-5 relative (Frobenius): each output
/// is an f32 sum of at most 67 products of numbers in [−1, 1], whose rounding error
/// grows like √k·2⁻²⁴ ≈ 5e-7 relative; 20× margin.
#[test]
fn gpu_linear_matches_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(9);
    for (geo, has_bias) in cases() {
        let LinearGeometry {
            batch,
            in_features: i,
            out_features: o,
        } = geo;
        let (x, w, b, dy) = (
            rng.vec(batch * i),
            rng.vec(o * i),
            rng.vec(o),
            rng.vec(batch * o),
        );
        let (prior_w, prior_b) = (rng.vec(o * i), rng.vec(o));
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let want_y = ops::linear_forward(&x64, &w64, has_bias.then_some(&b64[..]), batch, i, o);
        let want_dx = ops::linear_backward_input(&dy64, &w64, batch, i, o);
        let want_dw = ops::linear_backward_weight(&dy64, &x64, batch, i, o);
        let want_db = ops::linear_backward_bias(&dy64, batch, o);

        let xg = ctx.upload(&x, &[batch, i]).unwrap();
        let wg = ctx.upload(&w, &[o, i]).unwrap();
        let bg = ctx.upload(&b, &[o]).unwrap();
        let dyg = ctx.upload(&dy, &[batch, o]).unwrap();
        for accumulate in [false, true] {
            let y = ctx.zeros(&[batch, o]).unwrap();
            let dx = ctx.zeros(&[batch, i]).unwrap();
            let dw = ctx.upload(&prior_w, &[o, i]).unwrap();
            let db = ctx.upload(&prior_b, &[o]).unwrap();
            let mut rec = ctx.recorder();
            linear_forward(&mut rec, &geo, &xg, &wg, has_bias.then_some(&bg), &y).unwrap();
            let args = WeightedBackward {
                grad_out: &dyg,
                x: Some(&xg),
                weight: Some(&wg),
                grad_in: Some(&dx),
                grad_weight: Some(&dw),
                grad_bias: Some(&db),
                accumulate,
            };
            linear_backward(&mut rec, &geo, &args).unwrap();
            rec.submit().unwrap();
            let case = format!("{geo:?} bias {has_bias} accumulate {accumulate}");
            common::assert_layer_close(
                &ctx,
                [&y, &dx, &dw, &db],
                [&want_y, &want_dx, &want_dw, &want_db],
                [&prior_w, &prior_b],
                accumulate,
                1e-5,
                &case,
            );
        }
    }
}

/// A missing operand is an error naming it, not a panic.
#[test]
fn linear_backward_without_weight_is_an_error() {
    let Some(ctx) = common::gpu() else { return };
    let geo = LinearGeometry {
        batch: 2,
        in_features: 3,
        out_features: 4,
    };
    let dy = ctx.zeros(&[2, 4]).unwrap();
    let dx = ctx.zeros(&[2, 3]).unwrap();
    let args = WeightedBackward {
        grad_out: &dy,
        x: None,
        weight: None,
        grad_in: Some(&dx),
        grad_weight: None,
        grad_bias: None,
        accumulate: false,
    };
    let err = linear_backward(&mut ctx.recorder(), &geo, &args).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
}
