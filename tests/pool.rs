//! max_pool2d / avg_pool2d: the CPU reference on hand-worked windows, then the GPU
//! kernels against the CPU reference.

mod common;

use ekfac::geometry::Pool2dGeometry;
use ekfac::ops::pool as pool_ops;
use ekfac::reference::ops;

fn pool(
    batch: usize,
    channels: usize,
    in_size: [usize; 2],
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Pool2dGeometry {
    let geo = Pool2dGeometry {
        batch,
        channels,
        in_size,
        kernel_size,
        stride,
        padding,
    };
    geo.validate("test").expect("valid test geometry");
    geo
}

/// Ties go to the first maximum in row-major window order; padding is −∞, so an
/// all-negative window next to the border keeps its negative maximum; avg pooling
/// divides by KH·KW including padded zeros. Values worked by hand.
#[test]
fn cpu_pooling_on_hand_worked_windows() {
    // x = [[1, 3, 3], [3, 0, 2]], 2×2 windows, stride 1: both windows hold 3 first at (0, 1).
    let geo = pool(1, 1, [2, 3], [2, 2], [1, 1], [0, 0]);
    let x = [1.0, 3.0, 3.0, 3.0, 0.0, 2.0];
    let (y, argmax) = ops::max_pool2d_forward(&x, &geo);
    assert_eq!(y, [3.0, 3.0]);
    assert_eq!(argmax, [1, 1]);
    assert_eq!(
        ops::max_pool2d_backward(&[1.0, 10.0], &argmax, &geo),
        [0.0, 11.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(ops::avg_pool2d_forward(&x, &geo), [7.0 / 4.0, 8.0 / 4.0]);

    // Padding 1, 2×2 windows, stride 2 on x = −[[5, 1, 2], [3, 4, 6]]: windows
    // {(0,0)}, {(0,1),(0,2)}, {(1,0)}, {(1,1),(1,2)}.
    let geo = pool(1, 1, [2, 3], [2, 2], [2, 2], [1, 1]);
    let x = [-5.0, -1.0, -2.0, -3.0, -4.0, -6.0];
    let (y, argmax) = ops::max_pool2d_forward(&x, &geo);
    assert_eq!(y, [-5.0, -1.0, -3.0, -4.0]);
    assert_eq!(argmax, [0, 1, 3, 4]);
    assert_eq!(
        ops::avg_pool2d_forward(&x, &geo),
        [-5.0 / 4.0, -3.0 / 4.0, -3.0 / 4.0, -10.0 / 4.0]
    );
    assert_eq!(
        ops::avg_pool2d_backward(&[4.0, 8.0, 12.0, 16.0], &geo),
        [1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    );
}

/// Awkward pooling shapes: non-overlapping and overlapping windows, stride 2 and 3,
/// padding, rectangular kernels and strides, dropped trailing rows/columns, 1×1 images
/// (also padded), and more than 256 elements.
fn cases() -> Vec<Pool2dGeometry> {
    vec![
        pool(2, 3, [6, 5], [2, 2], [2, 2], [0, 0]),
        pool(1, 2, [7, 7], [3, 3], [2, 2], [1, 1]),
        pool(2, 2, [5, 6], [3, 2], [1, 2], [1, 1]),
        pool(3, 1, [1, 1], [1, 1], [1, 1], [0, 0]),
        pool(1, 2, [1, 1], [2, 2], [1, 1], [1, 1]),
        pool(2, 4, [9, 8], [3, 3], [3, 3], [1, 1]),
    ]
}

/// GPU pooling against the CPU reference. Inputs are quantized to 5 levels so most
/// windows hold tied maxima: the forward maximum and the argmax (first maximum) must
/// be exact, so the max-pool gradient lands on exactly the same elements. Gradient
/// sums (≤ 9 terms of f32 values, added in the same order as the reference) and
/// averages (≤ 9 f32 additions and one division) agree to 1e-6 relative (Frobenius).
#[test]
fn pooling_matches_cpu_reference_with_ties() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = common::TestRng::new(11);
    for geo in cases() {
        let x: Vec<f32> = (0..geo.input_len())
            .map(|_| ((rng.uniform() * 2.5).round() / 2.0) as f32)
            .collect();
        let grad = rng.vec(geo.output_len());
        let (n_in, n_out) = (geo.input_len(), geo.output_len());
        let xg = ctx.upload(&x, &[n_in]).unwrap();
        let gg = ctx.upload(&grad, &[n_out]).unwrap();
        let (y_max, argmax, y_avg) = (
            ctx.zeros(&[n_out]).unwrap(),
            ctx.zeros(&[n_out]).unwrap(),
            ctx.zeros(&[n_out]).unwrap(),
        );
        let (dx_max, dx_avg) = (ctx.zeros(&[n_in]).unwrap(), ctx.zeros(&[n_in]).unwrap());
        let mut rec = ctx.recorder();
        pool_ops::max_pool2d_forward(&mut rec, &geo, &xg, &y_max, &argmax).unwrap();
        pool_ops::max_pool2d_backward(&mut rec, &geo, &gg, &argmax, &dx_max).unwrap();
        pool_ops::avg_pool2d_forward(&mut rec, &geo, &xg, &y_avg).unwrap();
        pool_ops::avg_pool2d_backward(&mut rec, &geo, &gg, &dx_avg).unwrap();
        rec.submit().unwrap();

        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let g64: Vec<f64> = grad.iter().map(|&v| f64::from(v)).collect();
        let (want_y, want_arg) = ops::max_pool2d_forward(&x64, &geo);
        let got_y: Vec<f64> = ctx
            .read(&y_max)
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let got_arg: Vec<usize> = ctx
            .read_u32(&argmax)
            .unwrap()
            .iter()
            .map(|&v| v as usize)
            .collect();
        assert_eq!(got_y, want_y, "max forward {geo:?}");
        assert_eq!(got_arg, want_arg, "argmax {geo:?}");
        let want_dx = ops::max_pool2d_backward(&g64, &want_arg, &geo);
        assert!(
            common::rel_err(&ctx.read(&dx_max).unwrap(), &want_dx) < 1e-6,
            "max backward {geo:?}"
        );
        let want_avg = ops::avg_pool2d_forward(&x64, &geo);
        assert!(
            common::rel_err(&ctx.read(&y_avg).unwrap(), &want_avg) < 1e-6,
            "avg forward {geo:?}"
        );
        let want_davg = ops::avg_pool2d_backward(&g64, &geo);
        assert!(
            common::rel_err(&ctx.read(&dx_avg).unwrap(), &want_davg) < 1e-6,
            "avg backward {geo:?}"
        );
    }
}
