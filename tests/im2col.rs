//! im2col / col2im: the CPU reference against SPEC §2.2's worked examples and its own
//! adjoint identity, then the GPU kernels against the CPU reference.

mod common;

use common::to_f64;

use common::TestRng;
use ekfac::geometry::Conv2dGeometry;
use ekfac::ops::im2col;
use ekfac::reference::ops;

/// A conv geometry from `(B, C, Cout, [H, W], [KH, KW], stride, padding, dilation, groups)`.
/// Awkward shapes: padding, stride 2, dilation 2, groups 2 and 4, rectangular
/// kernels, 1×1 images (also padded), a kernel as large as the padded image.
fn cases() -> Vec<Conv2dGeometry> {
    vec![
        common::conv_geometry(2, 3, 4, [5, 5], [3, 3], [1, 1], [1, 1], [1, 1], 1),
        common::conv_geometry(2, 4, 6, [7, 6], [2, 3], [2, 1], [1, 0], [1, 1], 2),
        common::conv_geometry(1, 2, 2, [8, 7], [3, 2], [1, 1], [2, 1], [2, 2], 1),
        common::conv_geometry(3, 2, 3, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 1),
        common::conv_geometry(2, 4, 4, [1, 1], [3, 3], [1, 1], [1, 1], [1, 1], 4),
        common::conv_geometry(1, 6, 4, [9, 9], [3, 3], [2, 2], [1, 1], [2, 2], 2),
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
    let geo = common::conv_geometry(1, 2, 1, [2, 3], [2, 2], [1, 1], [0, 0], [1, 1], 1);
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
    let geo = common::conv_geometry(1, 4, 2, [1, 1], [1, 1], [1, 1], [0, 0], [1, 1], 2);
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

/// GPU im2col, im2col_group_mean and col2im against the CPU reference, on all
/// examples and on the chunk `1..B` (which must leave example 0 of col2im's output
/// untouched). im2col copies values: exact. The group mean adds ≤ 4 f32 values and
/// divides: 1e-6 relative (Frobenius). col2im adds ≤ 9 patch entries per element in a
/// different order than the f64 reference: 1e-6 relative.
#[test]
fn gpu_im2col_and_col2im_match_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(5);
    for geo in cases() {
        let (s, d, g_n) = (geo.positions(), geo.patch_len(), geo.groups);
        let x = rng.vec(geo.input_len());
        let x64 = to_f64(&x);
        let xg = ctx.upload(&x, &[geo.input_len()]).unwrap();
        for examples in [0, 1]
            .into_iter()
            .filter(|&e0| e0 < geo.batch)
            .map(|e0| e0..geo.batch)
        {
            let n = examples.len();
            let rows = |full: &[f64]| full[examples.start * s * d..examples.end * s * d].to_vec();
            let patches = ctx.zeros(&[im2col::patches_len(&geo, n)]).unwrap();
            let mean = ctx.zeros(&[n * s * d]).unwrap();
            let dp: Vec<f32> = rng.vec(im2col::patches_len(&geo, n));
            let dpg = ctx.upload(&dp, &[dp.len()]).unwrap();
            let sentinel = vec![7.0f32; geo.input_len()];
            let dx = ctx.upload(&sentinel, &[geo.input_len()]).unwrap();
            let mut rec = ctx.recorder();
            im2col::im2col(&mut rec, &geo, &xg, examples.clone(), &patches).unwrap();
            im2col::im2col_group_mean(&mut rec, &geo, &xg, examples.clone(), &mean).unwrap();
            im2col::col2im(&mut rec, &geo, &dpg, examples.clone(), &dx).unwrap();
            rec.submit().unwrap();

            let want: Vec<f64> = (0..g_n)
                .flat_map(|g| rows(&ops::im2col(&x64, &geo, g)))
                .collect();
            assert_eq!(
                to_f64(&ctx.read(&patches).unwrap()),
                want,
                "im2col {geo:?} {examples:?}"
            );
            let want_mean = rows(&ops::im2col_group_mean(&x64, &geo));
            assert!(
                common::rel_err(&ctx.read(&mean).unwrap(), &want_mean) < 1e-6,
                "group mean {geo:?}"
            );

            // Reference col2im: zero patch rows outside the chunk, sum over groups.
            let per_group = n * s * d;
            let mut want_dx = vec![0.0; geo.input_len()];
            for g in 0..g_n {
                let mut full = vec![0.0; geo.batch * s * d];
                full[examples.start * s * d..examples.end * s * d]
                    .copy_from_slice(&to_f64(&dp[g * per_group..(g + 1) * per_group]));
                for (w, v) in want_dx.iter_mut().zip(ops::col2im(&full, &geo, g)) {
                    *w += v;
                }
            }
            let example = geo.input_len() / geo.batch;
            let got_dx = ctx.read(&dx).unwrap();
            let (lo, hi) = (examples.start * example, examples.end * example);
            assert!(
                got_dx[..lo].iter().all(|&v| v == 7.0),
                "col2im wrote outside {examples:?}"
            );
            assert!(
                common::rel_err(&got_dx[lo..hi], &want_dx[lo..hi]) < 1e-6,
                "col2im {geo:?} {examples:?}"
            );
        }
    }
}
