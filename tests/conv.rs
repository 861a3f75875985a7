//! Conv2d forward and backward: the CPU reference checked independently (im2col·Wᵀ
//! against the direct loops, backward against finite differences), then the GPU
//! kernels against the CPU reference.

mod common;

use common::TestRng;
use ekfac::cpu::ops;
use ekfac::geometry::Conv2dGeometry;

#[allow(clippy::too_many_arguments)]
fn geometry(
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    in_size: [usize; 2],
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Conv2dGeometry {
    let geo = Conv2dGeometry {
        batch,
        in_channels,
        out_channels,
        in_size,
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
    };
    geo.validate("test").expect("valid test geometry");
    geo
}

/// Awkward shapes with a bias flag: padding, stride 2, dilation 2, groups 2 and 4,
/// rectangular kernels, 1×1 images (also padded).
fn cases() -> Vec<(Conv2dGeometry, bool)> {
    vec![
        (
            geometry(2, 3, 4, [5, 5], [3, 3], [1, 1], [1, 1], [1, 1], 1),
            true,
        ),
        (
            geometry(2, 4, 6, [7, 6], [2, 3], [2, 1], [1, 0], [1, 1], 2),
            false,
        ),
        (
            geometry(1, 2, 2, [8, 7], [3, 2], [1, 1], [2, 1], [2, 2], 1),
            true,
        ),
        (
            geometry(3, 2, 3, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 1),
            true,
        ),
        (
            geometry(2, 4, 4, [1, 1], [3, 3], [1, 1], [1, 1], [1, 1], 4),
            false,
        ),
        (
            geometry(1, 6, 4, [9, 9], [3, 3], [2, 2], [1, 1], [2, 2], 2),
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
