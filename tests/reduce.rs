//! Utility kernels (fill, scale, axpy, square, copy, add_diagonal, transpose,
//! append_ones_column, row and column sums) against plain f64 loops.
//!
//! Tolerances: data movement (fill, copy, transpose, append) must be exact. A single
//! f32 operation per element (scale, square, add_diagonal) rounds once; axpy and the
//! accumulating square round at most three times (product, product, fused add), so
//! they are held to 4·u relative per element, u = 2⁻²⁴. A sum of n terms in any order
//! has an error that for random-sign terms grows like a random walk, about u·sqrt(n)
//! of the result's magnitude; we allow 4·u·(sqrt(n) + 2) in the relative Frobenius
//! norm, well above that and far below the effect of a missing or doubled term.

mod common;

use common::{TestRng, rel_err};
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::ops::reduce::{self, Sum};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn run(ctx: &GpuContext, f: impl FnOnce(&mut ekfac::gpu::Recorder) -> ekfac::Result<()>) {
    let mut rec = ctx.recorder();
    f(&mut rec).unwrap();
    rec.submit().unwrap();
}

fn upload(ctx: &GpuContext, data: &[f32]) -> GpuTensor {
    ctx.upload(data, &[data.len()]).unwrap()
}

/// Asserts |got − want| ≤ 4·u·|want| elementwise.
fn assert_close_elementwise(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 4.0 * U * w.abs(),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn fill_and_scale() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(1);
    let x = rng.vec(1000);
    let t = upload(&ctx, &x);
    run(&ctx, |rec| reduce::scale(rec, &t, -1.5));
    let want: Vec<f64> = x.iter().map(|&v| -1.5 * v as f64).collect();
    assert_close_elementwise(&ctx.read(&t).unwrap(), &want, "scale");
    run(&ctx, |rec| {
        reduce::fill(rec, &t, 2.5)?;
        reduce::fill_range(rec, &t, 997, 3, -7.0)?;
        reduce::fill_range(rec, &t, 10, 0, 9.0)
    });
    let got = ctx.read(&t).unwrap();
    assert!(got[..997].iter().all(|&v| v == 2.5));
    assert_eq!(&got[997..], &[-7.0; 3]);
    let mut rec = ctx.recorder();
    let err = reduce::fill_range(&mut rec, &t, 998, 3, 0.0).unwrap_err();
    assert!(err.to_string().contains("y[998..1001] is outside"), "{err}");
}

#[test]
fn axpy_square_and_copy() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(2);
    let n = 777;
    let x = rng.vec(n);
    let y0 = rng.vec(n);
    let tx = upload(&ctx, &x);
    // β = 0 must not read y: start from NaN.
    let ty = upload(&ctx, &vec![f32::NAN; n]);
    run(&ctx, |rec| reduce::axpy(rec, 0.5, &tx, 0.0, &ty));
    let want: Vec<f64> = x.iter().map(|&v| 0.5 * v as f64).collect();
    assert_close_elementwise(&ctx.read(&ty).unwrap(), &want, "axpy β = 0");

    ctx.write(&ty, &y0).unwrap();
    run(&ctx, |rec| reduce::axpy(rec, -2.0, &tx, 0.75, &ty));
    let want: Vec<f64> = x
        .iter()
        .zip(&y0)
        .map(|(&a, &b)| -2.0 * a as f64 + 0.75 * b as f64)
        .collect();
    assert!(rel_err(&ctx.read(&ty).unwrap(), &want) <= 4.0 * U, "axpy");

    let ty = upload(&ctx, &vec![f32::NAN; n]);
    run(&ctx, |rec| reduce::square(rec, 1.0, &tx, 0.0, &ty));
    let want: Vec<f64> = x.iter().map(|&v| (v as f64).powi(2)).collect();
    assert_close_elementwise(&ctx.read(&ty).unwrap(), &want, "square");
    run(&ctx, |rec| reduce::square(rec, 3.0, &tx, 1.0, &ty));
    let want: Vec<f64> = want.iter().map(|w| 4.0 * w).collect();
    assert_close_elementwise(&ctx.read(&ty).unwrap(), &want, "square accumulate");

    let tz = upload(&ctx, &y0);
    run(&ctx, |rec| reduce::copy(rec, &tx, 5, &tz, 100, 300));
    let got = ctx.read(&tz).unwrap();
    assert_eq!(&got[..100], &y0[..100]);
    assert_eq!(&got[100..400], &x[5..305]);
    assert_eq!(&got[400..], &y0[400..]);

    let short = upload(&ctx, &x[..10]);
    let mut rec = ctx.recorder();
    assert!(reduce::axpy(&mut rec, 1.0, &tx, 1.0, &short).is_err());
    assert!(reduce::copy(&mut rec, &tx, 500, &tz, 0, 300).is_err());
    assert!(rec.is_empty());
}

#[test]
fn add_diagonal_batched() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(3);
    let (b, n) = (3, 5);
    let x = rng.vec(b * n * n);
    let t = ctx.upload(&x, &[b, n, n]).unwrap();
    run(&ctx, |rec| reduce::add_diagonal(rec, &t, 0.25));
    let got = ctx.read(&t).unwrap();
    for (idx, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let (i, j) = ((idx / n) % n, idx % n);
        if i == j {
            assert_eq!(g, v + 0.25, "diagonal element {idx}");
        } else {
            assert_eq!(g, v, "off-diagonal element {idx}");
        }
    }
    let mut rec = ctx.recorder();
    let err = reduce::add_diagonal(&mut rec, &ctx.zeros(&[2, 3]).unwrap(), 1.0).unwrap_err();
    assert!(err.to_string().contains("[2, 3]"), "{err}");
}

#[test]
fn transpose_batched() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(4);
    for &(b, r, c) in &[
        (1, 1, 1),
        (1, 1, 100),
        (2, 100, 1),
        (3, 17, 33),
        (2, 16, 16),
        (1, 40, 70),
    ] {
        let x = rng.vec(b * r * c);
        let tx = upload(&ctx, &x);
        let ty = upload(&ctx, &vec![f32::NAN; b * r * c]);
        run(&ctx, |rec| reduce::transpose(rec, &tx, &ty, b, r, c));
        let got = ctx.read(&ty).unwrap();
        for bi in 0..b {
            for i in 0..r {
                for j in 0..c {
                    assert_eq!(
                        got[bi * r * c + j * r + i],
                        x[bi * r * c + i * c + j],
                        "[{b}, {r}, {c}] at ({bi}, {i}, {j})"
                    );
                }
            }
        }
    }
}

#[test]
fn append_ones_column() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(5);
    for &(r, c) in &[(1, 0), (1, 1), (7, 3), (300, 10)] {
        let x = rng.vec(r * c);
        let tx = ctx.upload(&x, &[r, c]).unwrap();
        let ty = ctx.zeros(&[r, c + 1]).unwrap();
        run(&ctx, |rec| reduce::append_ones_column(rec, &tx, &ty, r, c));
        let want: Vec<f32> = (0..r)
            .flat_map(|i| x[i * c..(i + 1) * c].iter().copied().chain([1.0]))
            .collect();
        assert_eq!(ctx.read(&ty).unwrap(), want, "[{r}, {c}]");
    }
}

fn column_sums(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .map(|j| (0..rows).map(|i| x[i * cols + j] as f64).sum())
        .collect()
}

fn row_sums(x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows)
        .map(|i| x[i * cols..(i + 1) * cols].iter().map(|&v| v as f64).sum())
        .collect()
}

fn sum_tolerance(n: usize) -> f64 {
    4.0 * U * ((n as f64).sqrt() + 2.0)
}

#[test]
fn sum_rows_in_one_and_several_passes() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(6);
    // 70000 rows need three passes (256 rows per workgroup).
    for &(r, c) in &[(0, 3), (1, 1), (5, 3), (257, 65), (1000, 130), (70000, 3)] {
        let x = rng.vec(r * c);
        let tx = upload(&ctx, &x);
        let ty = upload(&ctx, &vec![f32::NAN; c]);
        run(&ctx, |rec| {
            reduce::sum_rows(&ctx, rec, &tx, &ty, &Sum::new(r, c))
        });
        let got = ctx.read(&ty).unwrap();
        let want = column_sums(&x, r, c);
        if r == 0 {
            assert_eq!(got, vec![0.0; c]);
            continue;
        }
        let err = rel_err(&got, &want);
        assert!(
            err <= sum_tolerance(r),
            "[{r}, {c}]: relative error {err:e}"
        );
    }
}

#[test]
fn sums_accumulate_with_alpha_beta() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(7);
    let (r, c) = (600, 20);
    let x = rng.vec(r * c);
    let tx = upload(&ctx, &x);
    let s = Sum {
        alpha: -0.5,
        beta: 2.0,
        ..Sum::new(r, c)
    };
    let y0 = rng.vec(c);
    let ty = upload(&ctx, &y0);
    run(&ctx, |rec| reduce::sum_rows(&ctx, rec, &tx, &ty, &s));
    let want: Vec<f64> = column_sums(&x, r, c)
        .iter()
        .zip(&y0)
        .map(|(s, &y)| -0.5 * s + 2.0 * y as f64)
        .collect();
    let err = rel_err(&ctx.read(&ty).unwrap(), &want);
    assert!(err <= sum_tolerance(r), "sum_rows: relative error {err:e}");

    let y0 = rng.vec(r);
    let ty = upload(&ctx, &y0);
    run(&ctx, |rec| reduce::sum_cols(rec, &tx, &ty, &s));
    let want: Vec<f64> = row_sums(&x, r, c)
        .iter()
        .zip(&y0)
        .map(|(s, &y)| -0.5 * s + 2.0 * y as f64)
        .collect();
    let err = rel_err(&ctx.read(&ty).unwrap(), &want);
    assert!(err <= sum_tolerance(c), "sum_cols: relative error {err:e}");
}

#[test]
fn sum_cols_shapes() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(8);
    for &(r, c) in &[(1, 1), (3, 255), (2, 257), (40, 1000), (700, 3)] {
        let x = rng.vec(r * c);
        let tx = upload(&ctx, &x);
        let ty = upload(&ctx, &vec![f32::NAN; r]);
        run(&ctx, |rec| reduce::sum_cols(rec, &tx, &ty, &Sum::new(r, c)));
        let err = rel_err(&ctx.read(&ty).unwrap(), &row_sums(&x, r, c));
        assert!(
            err <= sum_tolerance(c),
            "[{r}, {c}]: relative error {err:e}"
        );
    }
}

/// The order of one 256-invocation workgroup per row: invocation `l` adds columns
/// `l, l + 256, …` to `0.0`, then a binary tree over the 256 lane sums.
fn one_workgroup_per_row_sum(row: &[f32]) -> f32 {
    let mut partial = [0f32; 256];
    for (lane, p) in partial.iter_mut().enumerate() {
        *p = row.iter().skip(lane).step_by(256).fold(0.0, |s, &x| s + x);
    }
    let mut width = 128;
    while width > 0 {
        for lane in 0..width {
            partial[lane] += partial[lane + width];
        }
        width /= 2;
    }
    partial[0]
}

/// Short rows share a workgroup (segments of the next power of two ≥ cols), and the
/// sums stay bit for bit those of one workgroup per row: rows of every length around
/// the segment sizes, row counts that leave the last workgroup part-filled, and rows
/// of negative zeros (whose sum is +0 either way).
#[test]
fn sum_cols_of_short_rows_keep_the_tree_order() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(10);
    for &(r, c) in &[
        (5, 1),
        (7, 2),
        (9, 3),
        (33, 15),
        (17, 16),
        (21, 17),
        (50, 49),
        (6, 64),
        (3, 100),
        (4, 255),
        (2, 256),
        (3, 257),
        (2, 1000),
    ] {
        let mut x = rng.vec(r * c);
        x[..c].fill(-0.0);
        let tx = upload(&ctx, &x);
        let ty = upload(&ctx, &vec![f32::NAN; r]);
        run(&ctx, |rec| reduce::sum_cols(rec, &tx, &ty, &Sum::new(r, c)));
        let got = ctx.read(&ty).unwrap();
        for (i, row) in x.chunks(c).enumerate() {
            let want = one_workgroup_per_row_sum(row);
            assert_eq!(
                got[i].to_bits(),
                want.to_bits(),
                "[{r}, {c}] row {i}: got {}, want {want}",
                got[i]
            );
        }
    }
}

#[test]
fn sums_are_deterministic() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(9);
    let (r, c) = (3000, 37);
    let tx = upload(&ctx, &rng.vec(r * c));
    let mut results = Vec::new();
    for _ in 0..3 {
        let rows = ctx.zeros(&[c]).unwrap();
        let cols = ctx.zeros(&[r]).unwrap();
        run(&ctx, |rec| {
            reduce::sum_rows(&ctx, rec, &tx, &rows, &Sum::new(r, c))?;
            reduce::sum_cols(rec, &tx, &cols, &Sum::new(r, c))
        });
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        results.push((
            bits(ctx.read(&rows).unwrap()),
            bits(ctx.read(&cols).unwrap()),
        ));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}
