//! Conv2d forward and backward: the CPU reference checked independently (im2col·Wᵀ
//! against the direct loops, backward against finite differences), then the GPU
//! kernels against the CPU reference.

mod common;

use common::to_f64;

use common::TestRng;
use ekfac::geometry::Conv2dGeometry;
use ekfac::ops::conv::{ConvWorkspace, WeightedBackward, conv2d_backward, conv2d_forward};
use ekfac::reference::ops;

/// Awkward shapes with a bias flag: padding, stride 2, dilation 2, groups 2 and 4,
/// rectangular kernels, 1×1 images (also padded).
fn cases() -> Vec<(Conv2dGeometry, bool)> {
    vec![
        (
            common::conv_geometry(2, 3, 4, [5, 5], [3, 3], [1, 1], [1, 1], [1, 1], 1),
            true,
        ),
        (
            common::conv_geometry(2, 4, 6, [7, 6], [2, 3], [2, 1], [1, 0], [1, 1], 2),
            false,
        ),
        (
            common::conv_geometry(1, 2, 2, [8, 7], [3, 2], [1, 1], [2, 1], [2, 2], 1),
            true,
        ),
        (
            common::conv_geometry(3, 2, 3, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 1),
            true,
        ),
        (
            common::conv_geometry(2, 4, 4, [1, 1], [3, 3], [1, 1], [1, 1], [1, 1], 4),
            false,
        ),
        (
            common::conv_geometry(1, 6, 4, [9, 9], [3, 3], [2, 2], [1, 1], [2, 2], 2),
            true,
        ),
    ]
}

fn random(rng: &mut TestRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The direct conv loops equal im2col patches times the group's weight rows, placed
/// in NCHW: an independent check of both (f64, sums of ≤ 54 products: 1e-12).
#[test]
fn cpu_conv_forward_equals_im2col_times_weight() {
    let mut rng = TestRng::new(2);
    for (geo, _) in cases() {
        let x = random(&mut rng, geo.input_len());
        let w = random(&mut rng, geo.weight_len());
        let direct = ops::conv2d_forward(&x, &w, None, &geo);
        let (s, d, og) = (geo.positions(), geo.patch_len(), geo.group_out_channels());
        let mut via_patches = vec![0.0; geo.output_len()];
        for g in 0..geo.groups {
            let patches = ops::im2col(&x, &geo, g);
            for n in 0..geo.batch {
                for p in 0..s {
                    let row = &patches[(n * s + p) * d..(n * s + p + 1) * d];
                    for o in g * og..(g + 1) * og {
                        via_patches[(n * geo.out_channels + o) * s + p] =
                            dot(row, &w[o * d..(o + 1) * d]);
                    }
                }
            }
        }
        assert!(max_abs_diff(&direct, &via_patches) < 1e-12, "{geo:?}");
    }
}

/// Backward against central finite differences of `L = ⟨conv(x, w, b), r⟩` in f64.
/// `L` is linear in each argument, so central differences with step 1e-3 are exact up
/// to rounding (~1e-13 / 1e-3): tolerance 1e-8.
#[test]
fn cpu_conv_backward_matches_finite_differences() {
    let mut rng = TestRng::new(3);
    let eps = 1e-3;
    for (geo, _) in cases() {
        let x = random(&mut rng, geo.input_len());
        let w = random(&mut rng, geo.weight_len());
        let b = random(&mut rng, geo.out_channels);
        let r = random(&mut rng, geo.output_len());
        let loss =
            |x: &[f64], w: &[f64], b: &[f64]| dot(&ops::conv2d_forward(x, w, Some(b), &geo), &r);
        let fd = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
            (0..v.len())
                .map(|i| {
                    let mut p = v.to_vec();
                    p[i] += eps;
                    let up = f(&p);
                    p[i] -= 2.0 * eps;
                    (up - f(&p)) / (2.0 * eps)
                })
                .collect()
        };
        let dx = ops::conv2d_backward_input(&r, &w, &geo);
        let dw = ops::conv2d_backward_weight(&r, &x, &geo);
        let db = ops::conv2d_backward_bias(&r, &geo);
        assert!(
            max_abs_diff(&dx, &fd(&x, &|x| loss(x, &w, &b))) < 1e-8,
            "dx {geo:?}"
        );
        assert!(
            max_abs_diff(&dw, &fd(&w, &|w| loss(&x, w, &b))) < 1e-8,
            "dw {geo:?}"
        );
        assert!(
            max_abs_diff(&db, &fd(&b, &|b| loss(&x, &w, b))) < 1e-8,
            "db {geo:?}"
        );
    }
}

/// GPU conv2d forward and backward against the f64 CPU reference, with the whole
/// batch in one chunk, one example per chunk (budget 0) and two per chunk, bias on
/// and off, and
/// parameter gradients both overwritten and accumulated onto random values.
/// Tolerance 1e-5 relative (Frobenius): every output is an f32 sum of at most 63
/// products of numbers in [−1, 1] (GEMM reduction length D ≤ 54, B·S ≤ 63, col2im
/// ≤ 9 terms) whose rounding error grows like √k·2⁻²⁴ ≈ 5e-7 relative; 20× margin.
#[test]
fn gpu_conv2d_matches_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(4);
    for (geo, has_bias) in cases() {
        let x = rng.vec(geo.input_len());
        let w = rng.vec(geo.weight_len());
        let b = rng.vec(geo.out_channels);
        let dy = rng.vec(geo.output_len());
        let prior_w = rng.vec(geo.weight_len());
        let prior_b = rng.vec(geo.out_channels);
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let bias64 = has_bias.then_some(b64.as_slice());
        let want_y = ops::conv2d_forward(&x64, &w64, bias64, &geo);
        let want_dx = ops::conv2d_backward_input(&dy64, &w64, &geo);
        let want_dw = ops::conv2d_backward_weight(&dy64, &x64, &geo);
        let want_db = ops::conv2d_backward_bias(&dy64, &geo);

        let xg = ctx.upload(&x, &[geo.input_len()]).unwrap();
        let wg = ctx.upload(&w, &[geo.weight_len()]).unwrap();
        let bg = ctx.upload(&b, &[geo.out_channels]).unwrap();
        let dyg = ctx.upload(&dy, &[geo.output_len()]).unwrap();
        // Bytes of two examples' patches and output rows: chunks of 2 (and a last of 1
        // for odd batches).
        let two =
            2 * 4 * (ekfac::ops::im2col::patches_len(&geo, 1) + geo.out_channels * geo.positions());
        for (budget, chunk) in [(usize::MAX, geo.batch), (0, 1), (two, geo.batch.min(2))] {
            let ws = ConvWorkspace::new(&ctx, &geo, budget).unwrap();
            assert_eq!(ws.chunk(), chunk);
            for accumulate in [false, true] {
                let y = ctx.zeros(&[geo.output_len()]).unwrap();
                let dx = ctx.zeros(&[geo.input_len()]).unwrap();
                let dw = ctx.upload(&prior_w, &[geo.weight_len()]).unwrap();
                let db = ctx.upload(&prior_b, &[geo.out_channels]).unwrap();
                let mut rec = ctx.recorder();
                conv2d_forward(&mut rec, &geo, &ws, &xg, &wg, has_bias.then_some(&bg), &y).unwrap();
                let args = WeightedBackward {
                    grad_out: &dyg,
                    x: Some(&xg),
                    weight: Some(&wg),
                    grad_in: Some(&dx),
                    grad_weight: Some(&dw),
                    grad_bias: Some(&db),
                    accumulate,
                };
                conv2d_backward(&mut rec, &geo, &ws, &args).unwrap();
                rec.submit().unwrap();
                let case =
                    format!("{geo:?} bias {has_bias} budget {budget} accumulate {accumulate}");
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
}
