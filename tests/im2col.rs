//! im2col / col2im: the CPU reference against SPEC §2.2's worked examples and its own
//! adjoint identity, then the GPU kernels against the CPU reference.

mod common;

use common::TestRng;
use ekfac::cpu::ops;
use ekfac::geometry::Conv2dGeometry;

/// A conv geometry from `(B, C, Cout, [H, W], [KH, KW], stride, padding, dilation, groups)`.
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

/// Awkward shapes: padding, stride 2, dilation 2, groups 2 and 4, rectangular
/// kernels, 1×1 images (also padded), a kernel as large as the padded image.
fn cases() -> Vec<Conv2dGeometry> {
    vec![
        geometry(2, 3, 4, [5, 5], [3, 3], [1, 1], [1, 1], [1, 1], 1),
        geometry(2, 4, 6, [7, 6], [2, 3], [2, 1], [1, 0], [1, 1], 2),
        geometry(1, 2, 2, [8, 7], [3, 2], [1, 1], [2, 1], [2, 2], 1),
        geometry(3, 2, 3, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 1),
        geometry(2, 4, 4, [1, 1], [3, 3], [1, 1], [1, 1], [1, 1], 4),
        geometry(1, 6, 4, [9, 9], [3, 3], [2, 2], [1, 1], [2, 2], 2),
    ]
}

fn random(rng: &mut TestRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// SPEC §2.2 E3: `Conv2d(2→1, k=2)` on `x = arange(1..12).reshape(1, 2, 2, 3)`.
#[test]
fn cpu_im2col_matches_spec_example_e3() {
    let geo = geometry(1, 2, 1, [2, 3], [2, 2], [1, 1], [0, 0], [1, 1], 1);
    let x: Vec<f64> = (1..=12).map(f64::from).collect();
    let want = [
        1., 2., 4., 5., 7., 8., 10., 11., //
        2., 3., 5., 6., 8., 9., 11., 12.,
    ];
    assert_eq!(ops::im2col(&x, &geo, 0), want);
}

/// SPEC §2.2 E4: `Conv2d(4→2, k=1, groups=2)` on channels `[1, 2, 10, 20]` gives the
/// group-averaged input `[5.5, 11]`; and group 1 alone is `[10, 20]`.
#[test]
fn cpu_im2col_group_mean_matches_spec_example_e4() {
    let geo = geometry(1, 4, 2, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 2);
    let x = [1.0, 2.0, 10.0, 20.0];
    assert_eq!(ops::im2col_group_mean(&x, &geo), [5.5, 11.0]);
    assert_eq!(ops::im2col(&x, &geo, 1), [10.0, 20.0]);
}

/// col2im is the adjoint of im2col: ⟨im2col(x), y⟩ = ⟨x, col2im(y)⟩ for every group.
/// Both sides are sums of the same O(100) products of numbers in [−1, 1] in f64, so
/// they agree to ~1e-14 relative.
#[test]
fn cpu_col2im_is_adjoint_of_im2col() {
    let mut rng = TestRng::new(1);
    for geo in cases() {
        let x = random(&mut rng, geo.input_len());
        let y = random(&mut rng, geo.batch * geo.positions() * geo.patch_len());
        for group in 0..geo.groups {
            let lhs = dot(&ops::im2col(&x, &geo, group), &y);
            let rhs = dot(&x, &ops::col2im(&y, &geo, group));
            assert!(
                (lhs - rhs).abs() <= 1e-12 * lhs.abs().max(1.0),
                "{geo:?} group {group}: {lhs} vs {rhs}"
            );
        }
    }
}
