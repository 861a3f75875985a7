//! `ops::eigencorrect::correct_shared` (the fused eigenvalue correction of weight-sharing
//! layers) against an f64 loop of the same sum, with and without parts.
//!
//! Tolerance: an entry `Λ[k, l] += κ Σ_{v,n} γ²` with `γ = Σ_s g x` rounds `S` times in
//! each `γ` (relative to `Σ_s |g x|`) and `V·B` times in the outer sum of non-negative
//! terms (plus the parts' sum and the final multiply-add). Random data of one sign
//! per factor keep `γ` away from cancellation, so `4·u·(S + V·B + 4)` relative per
//! entry is well above the rounding and far below a missing or doubled term (at least
//! `1 / (V·B)` of the sum).

mod common;

use common::TestRng;
use ekfac::ops::eigencorrect::correct_shared;

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// `Λ₀ + κ Σ_{v,n} (Σ_s g[v, n, s, k] x[n, s, l])²` in f64.
fn reference(
    g: &[f32],
    x: &[f32],
    lambda0: &[f32],
    [stack, batch, positions, d_out, d]: [usize; 5],
    kappa: f32,
) -> Vec<f64> {
    let mut out: Vec<f64> = lambda0.iter().map(|&v| v as f64).collect();
    for k in 0..d_out {
        for l in 0..d {
            let mut acc = 0.0;
            for v in 0..stack {
                for n in 0..batch {
                    let gamma: f64 = (0..positions)
                        .map(|s| {
                            g[((v * batch + n) * positions + s) * d_out + k] as f64
                                * x[(n * positions + s) * d + l] as f64
                        })
                        .sum();
                    acc += gamma * gamma;
                }
            }
            out[k * d + l] += kappa as f64 * acc;
        }
    }
    out
}

/// Shapes with few blocks of Λ (cut into parts: partial sums added by a second
/// dispatch) and with many (one part), sides that are not multiples of the 4 × 4
/// blocks, one and several backpropagated vectors; Λ accumulates onto its values.
#[test]
fn correct_shared_against_f64() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(21);
    // [V, B, S, d_out, D]
    for shape in [
        [1, 3, 5, 8, 27],
        [2, 4, 16, 10, 33],
        [3, 5, 2, 1, 1],
        [1, 40, 3, 7, 9],
        [1, 2, 3, 256, 260],
    ] {
        let [stack, batch, positions, d_out, d] = shape;
        // Positive entries: no cancellation inside γ (see the module docs).
        let g: Vec<f32> = rng
            .vec(stack * batch * positions * d_out)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        let x: Vec<f32> = rng
            .vec(batch * positions * d)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        let lambda0: Vec<f32> = rng.vec(d_out * d).iter().map(|v| v.abs()).collect();
        let kappa = 0.75;
        let tg = ctx.upload(&g, &[stack, batch * positions, d_out]).unwrap();
        let tx = ctx.upload(&x, &[batch * positions, d]).unwrap();
        let mut results = Vec::new();
        for _ in 0..2 {
            let tl = ctx.upload(&lambda0, &[d_out, d]).unwrap();
            let mut rec = ctx.recorder();
            correct_shared(&mut rec, &tg, &tx, &tl, stack, positions, kappa).unwrap();
            rec.submit().unwrap();
            results.push(ctx.read(&tl).unwrap());
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&results[0]),
            bits(&results[1]),
            "{shape:?}: not deterministic"
        );
        let want = reference(&g, &x, &lambda0, shape, kappa);
        let tol = 4.0 * U * (positions + stack * batch + 4) as f64;
        for (i, (&got, &want)) in results[0].iter().zip(&want).enumerate() {
            let err = (got as f64 - want).abs() / want.abs();
            assert!(
                err <= tol,
                "{shape:?}: entry {i}: got {got}, want {want} (relative error {err:e} > {tol:e})"
            );
        }
    }
}

/// Inputs that do not fit Λ's shape are errors naming the kernel, not a dispatch.
#[test]
fn correct_shared_refuses_mismatched_inputs() {
    let Some(ctx) = common::gpu() else { return };
    let g = ctx.zeros(&[2 * 3 * 4]).unwrap();
    let x = ctx.zeros(&[3 * 5]).unwrap();
    let lambda = ctx.zeros(&[4, 5]).unwrap();
    let mut rec = ctx.recorder();
    let e = correct_shared(&mut rec, &g, &x, &lambda, 2, 2, 1.0).unwrap_err();
    assert!(e.to_string().contains("correct_shared"), "{e}");
    let flat = ctx.zeros(&[20]).unwrap();
    let e = correct_shared(&mut rec, &g, &x, &flat, 2, 3, 1.0).unwrap_err();
    assert!(e.to_string().contains("[d_out, D]"), "{e}");
}
