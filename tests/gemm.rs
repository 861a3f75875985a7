//! GEMM kernel against a plain f64 reference.
//!
//! Tolerance: inputs are f32 values used exactly by both sides, so the only error is
//! the kernel's f32 accumulation. Each output is a chain of k fused multiply-adds (the
//! products are exact inside an fma), each rounding once with relative error ≤ u =
//! 2⁻²⁴. For random-sign terms these roundings add up like a random walk: the error of
//! an output is about u·sqrt(k) times its magnitude, and scaling by α and adding β·C
//! costs two more roundings. We allow 8·u·(sqrt(k) + 2) in the relative Frobenius norm,
//! several times the expected value, yet far below the error of any real mistake
//! (a wrong, missing or doubled term gives relative errors of order 1/sqrt(k) or more).

mod common;

use common::{TestRng, rel_err};
use ekfac::gpu::GpuContext;
use ekfac::ops::gemm::{Gemm, gemm, matmul};

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn tolerance(k: usize) -> f64 {
    8.0 * U * ((k as f64).sqrt() + 2.0)
}

/// Where matrix `b` of an operand starts: `offset + b·stride`, or with two levels
/// `offset + (b / period)·outer + (b mod period)·stride`.
fn start(g: &Gemm, offset: usize, stride: usize, outer: usize, b: usize) -> usize {
    match g.period {
        0 => offset + b * stride,
        period => offset + b / period * outer + b % period * stride,
    }
}

/// Stored element `(r, c)` of a matrix starting at `start`.
fn at(buf: &[f32], start: usize, ld: usize, r: usize, c: usize) -> f64 {
    buf[start + r * ld + c] as f64
}

/// The f64 result of `g` over whole buffers: C's buffer after the product, with the
/// elements `g` does not address left as they were. Also returns which elements are
/// addressed.
fn reference(g: &Gemm, a: &[f32], b: &[f32], c: &[f32]) -> (Vec<f64>, Vec<bool>) {
    let mut out: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    let mut addressed = vec![false; c.len()];
    for bi in 0..g.batch {
        let sa = start(g, g.offset_a, g.stride_a, g.outer_a, bi);
        let sb = start(g, g.offset_b, g.stride_b, g.outer_b, bi);
        let sc = start(g, g.offset_c, g.stride_c, g.outer_c, bi);
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0;
                for l in 0..g.k {
                    let av = if g.trans_a {
                        at(a, sa, g.lda, l, i)
                    } else {
                        at(a, sa, g.lda, i, l)
                    };
                    let bv = if g.trans_b {
                        at(b, sb, g.ldb, j, l)
                    } else {
                        at(b, sb, g.ldb, l, j)
                    };
                    s += av * bv;
                }
                let idx = sc + i * g.ldc + j;
                let old = if g.beta == 0.0 { 0.0 } else { out[idx] };
                out[idx] = g.alpha as f64 * s + g.beta as f64 * old;
                addressed[idx] = true;
            }
        }
    }
    (out, addressed)
}

/// Runs `g` on random buffers of the given lengths and checks the result: addressed
/// elements within the tolerance, the others bit for bit unchanged. With `β = 0`, C
/// starts as NaN, so any read of C would show.
fn check(ctx: &GpuContext, g: &Gemm, lens: [usize; 3], seed: u64) {
    let mut rng = TestRng::new(seed);
    let a = rng.vec(lens[0]);
    let b = rng.vec(lens[1]);
    let c0 = if g.beta == 0.0 {
        vec![f32::NAN; lens[2]]
    } else {
        rng.vec(lens[2])
    };
    let ta = ctx.upload(&a, &[lens[0]]).unwrap();
    let tb = ctx.upload(&b, &[lens[1]]).unwrap();
    let tc = ctx.upload(&c0, &[lens[2]]).unwrap();
    let mut rec = ctx.recorder();
    gemm(&mut rec, g, &ta, &tb, &tc).unwrap();
    rec.submit().unwrap();
    let got = ctx.read(&tc).unwrap();
    let (want, addressed) = reference(g, &a, &b, &c0);
    let (mut got_in, mut want_in) = (Vec::new(), Vec::new());
    for i in 0..lens[2] {
        if addressed[i] {
            got_in.push(got[i]);
            want_in.push(want[i]);
        } else {
            assert_eq!(
                got[i].to_bits(),
                c0[i].to_bits(),
                "element {i} outside the product changed ({g:?})"
            );
        }
    }
    let err = rel_err(&got_in, &want_in);
    assert!(
        err <= tolerance(g.k),
        "relative error {err:e} > {:e} for {g:?}",
        tolerance(g.k)
    );
}

/// Packed lengths of A, B and C for `g`.
fn packed(g: &Gemm) -> [usize; 3] {
    [
        g.batch * g.m * g.k,
        g.batch * g.k * g.n,
        g.batch * g.m * g.n,
    ]
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

#[test]
fn awkward_shapes_in_every_transposition() {
    let Some(ctx) = common::gpu() else { return };
    // Degenerate vectors, K = 1, exact tiles, one past a tile, rows that are not a
    // multiple of 4 (scalar loads) next to ones that are (vec4 loads).
    let shapes = [
        (1, 1, 1),
        (1, 37, 5),
        (37, 1, 5),
        (7, 9, 1),
        (64, 64, 64),
        (65, 65, 65),
        (129, 66, 17),
        (4, 132, 20),
        (66, 3, 31),
    ];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
            let g = Gemm::new(m, n, k, ta, tb);
            check(&ctx, &g, packed(&g), (s * 4 + t) as u64);
        }
    }
}

#[test]
fn large_k() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        let g = Gemm::new(9, 12, 6000, ta, tb);
        check(&ctx, &g, packed(&g), 100 + t as u64);
    }
}

/// Few tiles of C and a long K take the split-K path (partial products per K slice,
/// then an ordered sum); the sum must honour α, β, offsets, ldc and broadcasting.
#[test]
fn split_k_long_reductions() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        let g = Gemm::new(1, 70, 3001, ta, tb).scaled(0.5, -1.0);
        check(&ctx, &g, packed(&g), 700 + t as u64);
        let g = Gemm::new(3, 2, 512, ta, tb);
        check(&ctx, &g, packed(&g), 710 + t as u64);
        let mut g = Gemm::new(65, 6, 1000, ta, tb).batched(2).scaled(1.0, 2.0);
        g.stride_a = 0;
        g.offset_a = 3;
        g.offset_c = 5;
        g.ldc = 9;
        g.stride_c = 65 * 9 + 1;
        let lens = [3 + 65 * 1000, 2 * 6 * 1000, 5 + 2 * g.stride_c];
        check(&ctx, &g, lens, 720 + t as u64);
    }
}

/// `m = 1` or `n = 1` runs the matrix-vector kernels; vectors may be strided rows or
/// columns of larger matrices (leading dimensions), batched and broadcast.
#[test]
fn matrix_vector_products() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        for (v, &(m, n)) in [(1, 150), (150, 1), (1, 1)].iter().enumerate() {
            let seed = 800 + (t * 3 + v) as u64 * 10;
            let g = Gemm::new(m, n, 77, ta, tb).scaled(1.5, 0.5);
            check(&ctx, &g, packed(&g), seed);
            let mut g = Gemm::new(m, n, 40, ta, tb).batched(3);
            g.lda += 3;
            g.ldb += 2;
            g.ldc += 5;
            g.offset_a = 1;
            g.offset_c = 2;
            let a_rows = if ta { 40 } else { m };
            let b_rows = if tb { n } else { 40 };
            g.stride_a = if v == 0 { 0 } else { a_rows * g.lda };
            g.stride_b = if v == 1 { 0 } else { b_rows * g.ldb };
            g.stride_c = m * g.ldc;
            let lens = [
                1 + 3 * a_rows * g.lda,
                3 * b_rows * g.ldb,
                2 + 3 * g.stride_c,
            ];
            check(&ctx, &g, lens, seed + 1);
            // Long K: the K slices are added by split_k_sum.
            let g = Gemm::new(m, n, 2600, ta, tb).scaled(1.0, 1.0);
            check(&ctx, &g, packed(&g), seed + 2);
        }
    }
}

#[test]
fn k_zero_scales_c() {
    let Some(ctx) = common::gpu() else { return };
    let g = Gemm::new(5, 6, 0, false, false).scaled(1.0, 0.5);
    check(&ctx, &g, [0, 0, 30], 7);
}

#[test]
fn alpha_beta_accumulate() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        let g = Gemm::new(70, 33, 40, ta, tb).scaled(-0.75, 1.5);
        check(&ctx, &g, packed(&g), 200 + t as u64);
        let g = Gemm::new(70, 33, 40, ta, tb).scaled(2.0, 1.0);
        check(&ctx, &g, packed(&g), 210 + t as u64);
    }
}

#[test]
fn batched_with_broadcast_operands() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        let g = Gemm::new(21, 68, 12, ta, tb).batched(3);
        check(&ctx, &g, packed(&g), 300 + t as u64);
        // One A for every batch entry.
        let mut g = Gemm::new(21, 68, 12, ta, tb).batched(3);
        g.stride_a = 0;
        check(
            &ctx,
            &g,
            [21 * 12, 3 * 12 * 68, 3 * 21 * 68],
            310 + t as u64,
        );
        // One B for every batch entry, accumulating.
        let mut g = Gemm::new(16, 5, 12, ta, tb).batched(4).scaled(1.0, 1.0);
        g.stride_b = 0;
        check(&ctx, &g, [4 * 16 * 12, 5 * 12, 4 * 16 * 5], 320 + t as u64);
    }
}

#[test]
fn offsets_leading_dimensions_and_strides() {
    let Some(ctx) = common::gpu() else { return };
    for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
        // Sub-matrices of larger row-major arrays, some with vec4-aligned layouts and
        // some not, written into a block of a larger C.
        for (v, &(off, ld_pad)) in [(0usize, 0usize), (4, 4), (3, 1), (5, 8)]
            .iter()
            .enumerate()
        {
            let (m, n, k) = (67, 18, 24);
            let mut g = Gemm::new(m, n, k, ta, tb).batched(2).scaled(1.0, 0.25);
            g.lda += ld_pad;
            g.ldb += ld_pad;
            g.ldc += ld_pad + 3;
            g.offset_a = off;
            g.offset_b = 2 * off;
            g.offset_c = off + 1;
            let a_rows = if ta { k } else { m };
            let b_rows = if tb { n } else { k };
            g.stride_a = a_rows * g.lda + off;
            g.stride_b = b_rows * g.ldb;
            g.stride_c = m * g.ldc + 4;
            let lens = [
                g.offset_a + 2 * g.stride_a,
                g.offset_b + 2 * g.stride_b,
                g.offset_c + 2 * g.stride_c + 5,
            ];
            check(&ctx, &g, lens, 400 + (t * 4 + v) as u64);
        }
    }
}

/// Products with `m` and `n` at most 16 run the 16×16-tile kernel (16 invocations, K
/// staged 4 at a time), else with `m` or `n` at most 32 the 32×32 one (64 invocations,
/// K staged 8 at a time), else the 64×64 one; with `K ≤ 32` (most shapes here) the
/// short-K kernels on the same tiles. Around those boundaries, in every
/// transposition, with vec4 and scalar loads, K not a multiple of 8, offsets, padded
/// leading dimensions, batch strides and broadcasting, and the narrow callers' shapes
/// (attention's 16×8 by 8×16 per head, the blocked Jacobi's 32-row rotations).
#[test]
fn narrow_tiles_at_the_selection_boundary() {
    let Some(ctx) = common::gpu() else { return };
    let shapes = [
        (31, 70, 13),
        (32, 100, 32),
        (33, 40, 9),
        (90, 32, 40),
        (70, 31, 8),
        (32, 32, 17),
        (33, 32, 7),
        (16, 16, 8),
        (16, 17, 5),
        (17, 16, 3),
        (13, 9, 22),
        (2, 5, 3),
        (12, 200, 64),
    ];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
            let seed = 900 + (s * 4 + t) as u64 * 4;
            let g = Gemm::new(m, n, k, ta, tb).scaled(1.0, 0.5);
            check(&ctx, &g, packed(&g), seed);
            for (v, &(off, ld_pad)) in [(4usize, 4usize), (3, 1)].iter().enumerate() {
                let mut g = Gemm::new(m, n, k, ta, tb).batched(3);
                g.lda += ld_pad;
                g.ldb += ld_pad;
                g.ldc += ld_pad + 2;
                g.offset_a = off;
                g.offset_b = 2 * off;
                g.offset_c = off + 1;
                let a_rows = if ta { k } else { m };
                let b_rows = if tb { n } else { k };
                g.stride_a = if v == 1 { 0 } else { a_rows * g.lda + off };
                g.stride_b = b_rows * g.ldb;
                g.stride_c = m * g.ldc + 4;
                let lens = [
                    g.offset_a + 3 * a_rows * g.lda + 2 * off,
                    g.offset_b + 3 * g.stride_b,
                    g.offset_c + 3 * g.stride_c + 5,
                ];
                check(&ctx, &g, lens, seed + 1 + v as u64);
            }
        }
    }
    // Attention's per-(example, head) products, batched.
    let g = Gemm::new(16, 16, 8, false, true).batched(130);
    check(&ctx, &g, packed(&g), 990);
    // A long K on a narrow product takes split-K with the narrow kernel.
    let g = Gemm::new(20, 24, 3000, true, false).scaled(1.0, 1.0);
    check(&ctx, &g, packed(&g), 991);
}

/// Every tile adds each output's products in the same order (k ascending, one fma
/// each), so which kernel runs does not change a bit: the first rows of a product with
/// one row more (the next larger tile) equal the product of the same operands with
/// those rows only: 33 rows (64×64) against 32 (32×32) with n = 50, and 17 rows
/// (32×32) against 16 (16×16) with n = 16.
#[test]
fn tiles_agree_bitwise() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(31);
    let k = 45;
    for (rows, n) in [(32, 50), (16, 16)] {
        let a = ctx
            .upload(&rng.vec((rows + 1) * k), &[rows + 1, k])
            .unwrap();
        let b = ctx.upload(&rng.vec(k * n), &[k, n]).unwrap();
        let c_larger = ctx.zeros(&[rows + 1, n]).unwrap();
        let c_smaller = ctx.zeros(&[rows, n]).unwrap();
        let mut rec = ctx.recorder();
        let larger = Gemm::new(rows + 1, n, k, false, false);
        gemm(&mut rec, &larger, &a, &b, &c_larger).unwrap();
        gemm(
            &mut rec,
            &Gemm::new(rows, n, k, false, false),
            &a,
            &b,
            &c_smaller,
        )
        .unwrap();
        rec.submit().unwrap();
        let larger = ctx.read(&c_larger).unwrap();
        let smaller = ctx.read(&c_smaller).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&larger[..rows * n]),
            bits(&smaller),
            "{rows} rows, n = {n}"
        );
    }
}

#[test]
fn random_configurations() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(99);
    let mut pick = |lo: usize, hi: usize| lo + (rng.next_u64() as usize) % (hi - lo + 1);
    for case in 0..16 {
        let (m, n, k) = (pick(1, 140), pick(1, 140), pick(1, 150));
        let (ta, tb) = (pick(0, 1) == 1, pick(0, 1) == 1);
        let batch = pick(1, 3);
        let mut g = Gemm::new(m, n, k, ta, tb).batched(batch);
        if pick(0, 1) == 1 {
            g = g.scaled(0.5, -1.25);
        }
        match pick(0, 2) {
            1 => g.stride_a = 0,
            2 => g.stride_b = 0,
            _ => {}
        }
        let lens = [
            (g.batch - 1) * g.stride_a + m * k,
            (g.batch - 1) * g.stride_b + k * n,
            g.batch * m * n,
        ];
        check(&ctx, &g, lens, 500 + case);
    }
}

#[test]
fn matmul_shapes_and_broadcast() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(600);
    let (bn, m, n, k) = (3, 10, 7, 13);
    let a = rng.vec(bn * k * m);
    let b = rng.vec(n * k);
    let ta = ctx.upload(&a, &[bn, k, m]).unwrap();
    let tb = ctx.upload(&b, &[n, k]).unwrap();
    let c = matmul(&ctx, &ta, &tb, true, true).unwrap();
    assert_eq!(c.shape(), &[bn, m, n]);
    let mut g = Gemm::new(m, n, k, true, true).batched(bn);
    g.stride_b = 0;
    let (want, _) = reference(&g, &a, &b, &vec![0.0; bn * m * n]);
    let err = rel_err(&ctx.read(&c).unwrap(), &want);
    assert!(err <= tolerance(k), "relative error {err:e}");
}

#[test]
fn invalid_problems_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let a = ctx.zeros(&[6, 4]).unwrap();
    let b = ctx.zeros(&[4, 5]).unwrap();
    let c = ctx.zeros(&[6, 5]).unwrap();
    let mut rec = ctx.recorder();
    let ok = Gemm::new(6, 5, 4, false, false);
    gemm(&mut rec, &ok, &a, &b, &c).unwrap();
    let too_big = Gemm::new(7, 5, 4, false, false);
    let err = gemm(&mut rec, &too_big, &a, &b, &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("A needs elements up to index 27"), "{err}");
    let mut short_ld = ok.clone();
    short_ld.lda = 3;
    let err = gemm(&mut rec, &short_ld, &a, &b, &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("leading dimension is 3 < 4"), "{err}");
    let err = gemm(&mut rec, &Gemm::new(6, 4, 4, false, true), &a, &a, &a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must not be the same tensor"), "{err}");
    let mut overlap = Gemm::new(3, 5, 4, false, false).batched(2);
    overlap.stride_b = 0;
    overlap.stride_c = 5;
    let err = gemm(&mut rec, &overlap, &a, &b, &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlap"), "{err}");
    assert_eq!(rec.len(), 1);
    let err = matmul(&ctx, &a, &a, false, false).unwrap_err().to_string();
    assert!(err.contains("inner dimensions differ"), "{err}");
}

/// Operands larger than one storage binding (16384 floats on the small-binding device)
/// are bound as windows and the product cut until every part fits: every transposition,
/// a batch, α/β, matrix-vector products and a single row longer than a binding.
#[test]
fn operands_larger_than_one_binding() {
    let Some(ctx) = common::small_binding_gpu() else {
        return;
    };
    let cases = [
        Gemm::new(200, 200, 300, true, false),
        Gemm::new(200, 180, 150, false, false),
        Gemm::new(150, 210, 190, false, true),
        Gemm::new(130, 140, 150, true, true).scaled(0.5, 1.0),
        Gemm::new(90, 100, 110, false, false).batched(4),
        Gemm::new(1, 300, 250, false, false),
        Gemm::new(260, 1, 240, false, false),
        Gemm::new(1, 3, 20000, false, false),
        Gemm::new(2, 2, 20000, false, false),
    ];
    for (i, g) in cases.iter().enumerate() {
        check(&ctx, g, packed(g), 40 + i as u64);
    }
}

/// `upper_from` (`lower_to`): each batch entry's columns from `z · upper_from` on (before
/// `(z + 1) · lower_to`; `z` modulo `triangle_period` when set) are bitwise those of the
/// full product (whole tiles outside may be computed too), every C element of a tile
/// wholly outside keeps its value, and shapes they cannot serve are errors.
#[test]
fn upper_from_and_lower_to_compute_block_triangles() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(57);
    // (rows, columns, K, batch, panel, period): the blocked Jacobi's panels (rows = K =
    // the pair, columns = batch · pair), a pair that does not divide the tile, the small
    // tile, and stacks of matrices whose triangles restart every `period` entries (four
    // matrices of four panels, as the row-panel GEMM of four n = 128; three of two).
    for (m, n, k, batch, panel, period) in [
        (32, 256, 32, 8, 32, 0),
        (28, 196, 28, 7, 28, 0),
        (8, 40, 8, 5, 8, 0),
        (32, 128, 32, 16, 32, 4),
        (28, 56, 28, 6, 28, 2),
    ] {
        let a = ctx.upload(&rng.vec(batch * m * k), &[batch, m, k]).unwrap();
        let b = ctx.upload(&rng.vec(batch * k * n), &[batch, k, n]).unwrap();
        let sentinel = vec![-7.5f32; batch * m * n];
        let full = ctx.zeros(&[batch, m, n]).unwrap();
        let upper = ctx.upload(&sentinel, &[batch, m, n]).unwrap();
        let lower = ctx.upload(&sentinel, &[batch, m, n]).unwrap();
        let mut g = Gemm::new(m, n, k, false, false).batched(batch);
        let mut rec = ctx.recorder();
        gemm(&mut rec, &g, &a, &b, &full).unwrap();
        g = g.periodic(period);
        g.upper_from = panel;
        gemm(&mut rec, &g, &a, &b, &upper).unwrap();
        g.upper_from = 0;
        g.lower_to = panel;
        gemm(&mut rec, &g, &a, &b, &lower).unwrap();
        rec.submit().unwrap();
        let full = ctx.read(&full).unwrap();
        let upper = ctx.read(&upper).unwrap();
        let lower = ctx.read(&lower).unwrap();
        let tile = if m.max(n) <= 16 { 16 } else { 32 };
        for z in 0..batch {
            // The entry's place in its matrix.
            let p = if period == 0 { z } else { z % period };
            for r in 0..m {
                for c in 0..n {
                    let i = (z * m + r) * n + c;
                    let at = format!("({m}, {n}, period {period}) z {z} ({r}, {c})");
                    if c >= p * panel {
                        assert_eq!(upper[i].to_bits(), full[i].to_bits(), "upper {at}");
                    } else if c < p * panel / tile * tile {
                        assert_eq!(upper[i], -7.5, "upper {at} was written");
                    }
                    if c < (p + 1) * panel {
                        assert_eq!(lower[i].to_bits(), full[i].to_bits(), "lower {at}");
                    } else if c >= ((p + 1) * panel).div_ceil(tile) * tile {
                        assert_eq!(lower[i], -7.5, "lower {at} was written");
                    }
                }
            }
        }
    }
    // Split-K (a long K) and an entry that needs no tile of C are refused.
    let a = ctx.zeros(&[2, 8, 4096]).unwrap();
    let b = ctx.zeros(&[2, 4096, 8]).unwrap();
    let c = ctx.zeros(&[2, 8, 8]).unwrap();
    let mut rec = ctx.recorder();
    let mut g = Gemm::new(8, 8, 4096, false, false).batched(2);
    g.upper_from = 4;
    assert!(gemm(&mut rec, &g, &a, &b, &c).is_err());
    let mut g = Gemm::new(8, 8, 8, false, false).batched(2);
    g.upper_from = 16;
    assert!(gemm(&mut rec, &g, &a, &b, &c).is_err());
}

/// Each recorded product declares `2·k` operations per entry of C it computes
/// (`Recorder::count_flops`), charged to the phase its pass is submitted in: counted
/// here entry by entry over the same block triangles as
/// `upper_from_and_lower_to_compute_block_triangles` (with and without two-level
/// groups), for a plain product, a matrix-vector product and a split-K one.
#[test]
fn the_work_counts_hold_the_flops_of_the_entries_computed() {
    let Some(ctx) = common::gpu() else { return };
    const PHASE: &str = "gemm flops test";
    // (m, n, k, batch, upper_from, lower_to, period)
    for (m, n, k, batch, upper, lower, period) in [
        (7, 9, 5, 1, 0, 0, 0),
        (1, 300, 40, 3, 0, 0, 0),
        (8, 8, 4096, 2, 0, 0, 0),
        (32, 256, 32, 8, 32, 0, 0),
        (28, 196, 28, 7, 0, 28, 0),
        (32, 128, 32, 16, 32, 0, 4),
        (28, 56, 28, 7, 0, 28, 2),
    ] {
        let a = ctx.zeros(&[batch, m, k]).unwrap();
        let b = ctx.zeros(&[batch, k, n]).unwrap();
        let c = ctx.zeros(&[batch, m, n]).unwrap();
        let mut g = Gemm::new(m, n, k, false, false).batched(batch);
        if period > 0 {
            g = g.periodic(period);
        }
        (g.upper_from, g.lower_to) = (upper, lower);
        let flops = |ctx: &GpuContext| ctx.work_counts().get(PHASE).map_or(0, |w| w.flops);
        let before = flops(&ctx);
        {
            let _phase = ctx.gpu_phase(PHASE);
            let mut rec = ctx.recorder();
            gemm(&mut rec, &g, &a, &b, &c).unwrap();
            rec.submit().unwrap();
        }
        let mut entries = 0u64;
        for z in 0..batch {
            let p = if period == 0 { z } else { z % period };
            for _row in 0..m {
                for col in 0..n {
                    let needed =
                        (upper == 0 || col >= p * upper) && (lower == 0 || col < (p + 1) * lower);
                    entries += u64::from(needed);
                }
            }
        }
        assert_eq!(
            flops(&ctx) - before,
            2 * k as u64 * entries,
            "({m}, {n}, {k}) batch {batch} upper_from {upper} lower_to {lower} period {period}"
        );
    }
}

/// Products with `1 ≤ K ≤ 32` run the short-K kernels (no workgroup memory, an 8×8 block
/// per invocation read straight from storage): every transposition, each tile size
/// (16, 32, 64), K around the chunks of 4, sizes that leave partial 8×8 blocks and
/// partial tiles, vec4 and scalar loads (aligned and unaligned offsets and leading
/// dimensions), batch strides, broadcast operands and α/β with C read.
#[test]
fn short_k_products() {
    let Some(ctx) = common::gpu() else { return };
    let shapes = [
        (2, 2, 1),
        (16, 16, 3),
        (13, 15, 4),
        (28, 196, 28),
        (32, 256, 32),
        (31, 9, 31),
        (40, 70, 7),
        (65, 66, 32),
        (130, 9, 5),
        (9, 131, 17),
    ];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (t, &(ta, tb)) in TRANSPOSES.iter().enumerate() {
            let seed = 1100 + (s * 4 + t) as u64 * 4;
            let g = Gemm::new(m, n, k, ta, tb);
            check(&ctx, &g, packed(&g), seed);
            for (v, &(off, ld_pad)) in [(4usize, 4usize), (1, 3)].iter().enumerate() {
                let mut g = Gemm::new(m, n, k, ta, tb).batched(3).scaled(-0.5, 1.25);
                g.lda += ld_pad;
                g.ldb += ld_pad;
                g.ldc += ld_pad + 1;
                g.offset_a = off;
                g.offset_b = 3 * off;
                g.offset_c = off + 2;
                let a_rows = if ta { k } else { m };
                let b_rows = if tb { n } else { k };
                g.stride_a = a_rows * g.lda + off;
                g.stride_b = if v == 1 { 0 } else { b_rows * g.ldb };
                g.stride_c = m * g.ldc + 4;
                let lens = [
                    g.offset_a + 3 * g.stride_a,
                    g.offset_b + 3 * b_rows * g.ldb,
                    g.offset_c + 3 * g.stride_c + 3,
                ];
                check(&ctx, &g, lens, seed + 1 + v as u64);
            }
        }
    }
}

/// The short-K kernels add each output's products in the order of the staged kernels
/// (k ascending, one fma each, from zero), so a product with K = 32 (short-K kernel)
/// is bitwise the product of the same operands with a 33rd value of K whose op(A)
/// column is zero (staged kernel; the extra term adds +0), in every transposition and
/// at each tile size, with vec4 and scalar loads.
#[test]
fn short_k_agrees_bitwise_with_the_staged_kernels() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(77);
    let k = 32;
    // Tiles 16, 32, 64, 64 (odd sizes: scalar loads).
    for (m, n) in [(16, 12), (28, 100), (72, 68), (33, 35)] {
        for &(ta, tb) in &TRANSPOSES {
            // op(A) is m × (k + 1) with a zero last column, op(B) (k + 1) × n.
            let mut a = rng.vec(m * (k + 1));
            for i in 0..m {
                a[if ta { k * m + i } else { i * (k + 1) + k }] = 0.0;
            }
            let b = rng.vec((k + 1) * n);
            let ta_t = ctx.upload(&a, &[a.len()]).unwrap();
            let tb_t = ctx.upload(&b, &[b.len()]).unwrap();
            let staged = ctx.zeros(&[m * n]).unwrap();
            let short = ctx.zeros(&[m * n]).unwrap();
            let long = Gemm::new(m, n, k + 1, ta, tb);
            let mut cut = Gemm::new(m, n, k, ta, tb);
            // The same stored operands: op(A)'s first k columns, op(B)'s first k rows.
            cut.lda = long.lda;
            cut.ldb = long.ldb;
            let mut rec = ctx.recorder();
            gemm(&mut rec, &long, &ta_t, &tb_t, &staged).unwrap();
            gemm(&mut rec, &cut, &ta_t, &tb_t, &short).unwrap();
            rec.submit().unwrap();
            let bits = |t: &ekfac::gpu::GpuTensor| {
                ctx.read(t)
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&staged), bits(&short), "{m}×{n}, {ta}, {tb}");
        }
    }
}

/// Runs `g` (two levels, [`Gemm::period`]) once and then group by group as one-level
/// products (offsets moved by `outer`, triangles counted from 0 in each), on the same
/// random operands and a C of `c0`; returns the two C buffers' bits.
fn folded_and_by_group(
    ctx: &GpuContext,
    g: &Gemm,
    lens: [usize; 3],
    c0: &[f32],
    seed: u64,
) -> (Vec<u32>, Vec<u32>) {
    let mut rng = TestRng::new(seed);
    let a = ctx.upload(&rng.vec(lens[0]), &[lens[0]]).unwrap();
    let b = ctx.upload(&rng.vec(lens[1]), &[lens[1]]).unwrap();
    let folded = ctx.upload(c0, &[lens[2]]).unwrap();
    let by_group = ctx.upload(c0, &[lens[2]]).unwrap();
    let mut rec = ctx.recorder();
    gemm(&mut rec, g, &a, &b, &folded).unwrap();
    for (i, z) in (0..g.batch).step_by(g.period).enumerate() {
        let mut one = g.clone();
        one.batch = g.period.min(g.batch - z);
        one.period = 0;
        one.offset_a += i * g.outer_a;
        one.offset_b += i * g.outer_b;
        one.offset_c += i * g.outer_c;
        gemm(&mut rec, &one, &a, &b, &by_group).unwrap();
    }
    rec.submit().unwrap();
    let bits = |t| ctx.read(t).unwrap().iter().map(|x| x.to_bits()).collect();
    (bits(&folded), bits(&by_group))
}

/// A two-level batch ([`Gemm::period`]: matrix `z` at `offset + (z / period)·outer +
/// (z mod period)·stride`) in one product is bitwise the same as its groups recorded one
/// by one, and within the f64 reference's tolerance: short K (≤ 32) and staged K, vec4
/// and scalar loads, every transposition, a last group shorter than the period, the
/// matrix-vector and split-K paths (run one group per dispatch), and the blocked
/// Jacobi's column-panel layout (B: the `pair`-wide column panels of a stack of `m × m`
/// matrices, transposed) with `upper_from`, and its row-panel product with `lower_to`.
#[test]
fn two_level_batches_match_their_groups_recorded_one_by_one() {
    let Some(ctx) = common::gpu() else { return };
    // (m, n, k, trans_a, trans_b, batch, period, pad, gap): matrices of each group `pad`
    // elements apart beyond their size, groups `gap` apart beyond theirs (multiples of 4
    // keep vec4 loads where the shape allows them; a gap of 1 with aligned matrices must
    // not take them).
    let cases = [
        (32, 64, 32, false, false, 7, 3, 4, 4),
        (32, 64, 32, false, false, 7, 3, 4, 1),
        (20, 36, 13, false, true, 5, 2, 3, 5),
        (16, 24, 28, true, true, 6, 4, 8, 8),
        (40, 72, 48, true, false, 6, 3, 4, 12),
        (40, 72, 48, true, false, 6, 3, 0, 3),
        (33, 35, 70, false, true, 4, 2, 1, 2),
        (64, 68, 36, false, false, 5, 2, 0, 4),
        (1, 50, 40, false, false, 5, 2, 4, 4),
        (30, 1, 40, true, false, 5, 2, 1, 1),
        (8, 8, 4096, false, false, 4, 2, 4, 4),
    ];
    for (i, &(m, n, k, ta, tb, batch, period, pad, gap)) in cases.iter().enumerate() {
        let mut g = Gemm::new(m, n, k, ta, tb);
        g.batch = batch;
        g.period = period;
        let groups = batch.div_ceil(period);
        let mut lens = [0; 3];
        for (x, size) in [m * k, k * n, m * n].into_iter().enumerate() {
            let stride = size + pad;
            let outer = period * stride + gap;
            let offset = 4 * x;
            lens[x] = offset + groups * outer;
            match x {
                0 => (g.stride_a, g.outer_a, g.offset_a) = (stride, outer, offset),
                1 => (g.stride_b, g.outer_b, g.offset_b) = (stride, outer, offset),
                _ => (g.stride_c, g.outer_c, g.offset_c) = (stride, outer, offset),
            }
        }
        let c0 = vec![-7.5; lens[2]];
        let (folded, by_group) = folded_and_by_group(&ctx, &g, lens, &c0, 90 + i as u64);
        assert_eq!(folded, by_group, "{g:?}");
        check(&ctx, &g, lens, 90 + i as u64);
    }
    // Rotations of a stack of 3 matrices of 128 columns (h = 4 panels of pair = 32; rows
    // padded to 132, matrices 8 apart beyond that), as the blocked Jacobi's: the row
    // panels' block lower triangles (one-level layout in groups), and the column panels
    // (Bᵀ a 128 × 32 panel, B two-level), whole and their block upper triangles.
    let (stack, h, pair) = (3, 4, 32);
    let (mm, ld) = (h * pair, h * pair + 4);
    let matrix = mm * ld + 8;
    let c0 = vec![-7.5; stack * matrix];
    let lens = [stack * h * pair * pair, stack * matrix, stack * matrix];
    let rows = Gemm {
        ldb: ld,
        ldc: ld,
        stride_b: pair * ld,
        stride_c: pair * ld,
        outer_b: matrix,
        outer_c: matrix,
        lower_to: pair,
        ..Gemm::new(pair, mm, pair, false, false)
            .batched(stack * h)
            .periodic(h)
    };
    let (folded, by_group) = folded_and_by_group(&ctx, &rows, lens, &c0, 98);
    assert_eq!(folded, by_group, "{rows:?}");
    let mut cols = Gemm {
        stride_b: pair,
        ..rows.clone()
    };
    cols.trans_b = true;
    cols.lower_to = 0;
    check(&ctx, &cols, lens, 99);
    cols.upper_from = pair;
    let (folded, by_group) = folded_and_by_group(&ctx, &cols, lens, &c0, 99);
    assert_eq!(folded, by_group, "{cols:?}");
    assert!(folded.contains(&(-7.5f32).to_bits()), "no tile was skipped");
}

/// Two-level batches on the small-binding device: operands larger than one binding are
/// cut on group boundaries (into parts of several groups, 30 × 40 × 50 in groups of 2;
/// then within a group, 90 × 100 × 110), bitwise as the groups one by one.
#[test]
fn two_level_batches_larger_than_one_binding() {
    let Some(ctx) = common::small_binding_gpu() else {
        return;
    };
    for (i, (m, n, k, batch)) in [(30, 40, 50, 12), (90, 100, 110, 6)]
        .into_iter()
        .enumerate()
    {
        let mut g = Gemm::new(m, n, k, false, true).batched(batch).periodic(2);
        g.outer_a += 12;
        g.outer_b += 8;
        g.outer_c += 4;
        let groups = batch / 2;
        let lens = [groups * g.outer_a, groups * g.outer_b, groups * g.outer_c];
        let seed = 100 + i as u64;
        let (folded, by_group) = folded_and_by_group(&ctx, &g, lens, &vec![0.0; lens[2]], seed);
        assert_eq!(folded, by_group, "{g:?}");
        check(&ctx, &g, lens, seed);
    }
}

/// Bounds and overlap checks follow the two-level layout and name what is wrong: the
/// last element can belong to a group before the last (strides larger than `outer`),
/// and groups of C that overlap are refused naming `outer_c`.
#[test]
fn two_level_batches_are_checked() {
    let Some(ctx) = common::gpu() else { return };
    // Matrices z = 0, 1 (group 0) at 0 and 100, z = 2 (group 1) at 10 of A: A's last
    // element is at 100 + 3·4 − 1 = 111.
    let mut g = Gemm::new(3, 2, 4, false, false).batched(3).periodic(2);
    g.stride_a = 100;
    g.outer_a = 10;
    let b = ctx.zeros(&[3 * 8]).unwrap();
    let c = ctx.zeros(&[3 * 6]).unwrap();
    let mut rec = ctx.recorder();
    gemm(&mut rec, &g, &ctx.zeros(&[112]).unwrap(), &b, &c).unwrap();
    let err = gemm(&mut rec, &g, &ctx.zeros(&[111]).unwrap(), &b, &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("A needs elements up to index 111"), "{err}");
    let mut overlap = g.clone();
    overlap.stride_a = 12;
    overlap.outer_c = 11;
    let err = gemm(&mut rec, &overlap, &ctx.zeros(&[112]).unwrap(), &b, &c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outer_c 11 < 12"), "{err}");
    assert_eq!(rec.len(), 1);
}
