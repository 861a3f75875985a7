//! Jacobi eigendecomposition against faer's f64 self-adjoint solver.
//!
//! Every input is rounded to f32 first and the reference is computed in f64 on exactly
//! those f32 values, so the comparison measures the GPU solver alone. Tolerances are the
//! accuracy targets of the issue: an f32 solver can reach `‖AV−VΛ‖_F/‖A‖_F` and
//! `‖VᵀV−I‖_F` of a few `n·ε_f32` (ε ≈ 6e-8, so ~1e-5 at n = 256). Eigenvalues follow
//! from the residual: for symmetric `A` and (nearly) orthonormal `V`, every computed
//! eigenvalue lies within `‖AV−VΛ‖_F` of an exact one (Bauer–Fike), so the eigenvalue
//! errors are held to the residual target times `‖A‖_F`.

mod common;

use common::TestRng;
use ekfac::curvature::eigen::{EigenSolver, Factor, HostSolver, JacobiSolver};
use ekfac::curvature::fit::{FitRun, fit_run};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::state::FactorEigen;
use ekfac::error::Error;
use ekfac::gpu::GpuContext;
use ekfac::ops::jacobi::{
    Eigen, EighInput, F32_RESOLUTION, JacobiOptions, JacobiPath, SweepObserver, Sweeps, eigh,
    eigh_each, eigh_many,
};
use ekfac::progress::Silent;
use faer::{Mat, Side};

/// The kinds of spectra the tests use.
#[derive(Debug, Clone, Copy)]
enum Spectrum {
    /// Log-spaced from 1 down to 1e-6 (condition number 1e6).
    Spread,
    /// Three clusters of equal eigenvalues (1, 0.25, 1e-3), rounded to f32 only once.
    Clustered,
    /// `X Xᵀ / k` with `X` `n × k`, `k = max(1, n/3)`: rank `k`.
    RankDeficient,
}

const ALL: [Spectrum; 3] = [
    Spectrum::Spread,
    Spectrum::Clustered,
    Spectrum::RankDeficient,
];

/// A random orthogonal `n × n` matrix: the eigenvectors of a random symmetric matrix.
fn random_orthogonal(n: usize, rng: &mut TestRng) -> Mat<f64> {
    let mut s = Mat::<f64>::zeros(n, n);
    for i in 0..n {
        for j in 0..=i {
            let x = rng.uniform();
            s[(i, j)] = x;
            s[(j, i)] = x;
        }
    }
    s.self_adjoint_eigen(Side::Lower)
        .expect("eigenvectors of a random symmetric matrix")
        .U()
        .to_owned()
}

/// A symmetric PSD `n × n` matrix with the given spectrum, rounded to f32 (row-major,
/// exactly symmetric).
fn test_matrix(n: usize, spectrum: Spectrum, rng: &mut TestRng) -> Vec<f32> {
    let full = match spectrum {
        Spectrum::Spread | Spectrum::Clustered => {
            let q = random_orthogonal(n, rng);
            let lambda: Vec<f64> = (0..n)
                .map(|i| match spectrum {
                    Spectrum::Spread if n > 1 => 10f64.powf(-6.0 * i as f64 / (n - 1) as f64),
                    Spectrum::Spread => 1.0,
                    _ => [1.0, 0.25, 1e-3][i % 3],
                })
                .collect();
            Mat::from_fn(n, n, |i, j| {
                (0..n).map(|k| q[(i, k)] * lambda[k] * q[(j, k)]).sum()
            })
        }
        Spectrum::RankDeficient => {
            let k = (n / 3).max(1);
            let x = Mat::from_fn(n, k, |_, _| rng.uniform());
            Mat::from_fn(n, n, |i, j| {
                (0..k).map(|l| x[(i, l)] * x[(j, l)]).sum::<f64>() / k as f64
            })
        }
    };
    let mut a = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..=i {
            let x = full[(i, j)] as f32;
            a[i * n + j] = x;
            a[j * n + i] = x;
        }
    }
    a
}

/// Errors of one computed decomposition against the f64 reference.
#[derive(Debug, Default, Clone, Copy)]
struct Accuracy {
    /// ‖AV − VΛ‖_F / ‖A‖_F
    residual: f64,
    /// ‖VᵀV − I‖_F
    orthogonality: f64,
    /// max |λ − λ_ref| / ‖A‖_F
    eigenvalues: f64,
}

impl Accuracy {
    /// The eigenvalue errors get the residual's bound (1e-5 up to n = 256, 3e-5 above),
    /// both relative to `‖A‖_F` (module doc).
    fn assert_within(&self, residual: f64, orthogonality: f64, what: &str) {
        assert!(
            self.residual <= residual
                && self.orthogonality <= orthogonality
                && self.eigenvalues <= residual,
            "{what}: {self:?} exceeds residual and eigenvalues {residual:e}, orthogonality \
             {orthogonality:e}"
        );
    }
}

/// Compares `values` (ascending) and `vectors` (columns) of one `n × n` matrix `a`.
fn accuracy(a: &[f32], n: usize, values: &[f32], vectors: &[f32]) -> Accuracy {
    let am = Mat::from_fn(n, n, |i, j| f64::from(a[i * n + j]));
    let v = Mat::from_fn(n, n, |i, j| f64::from(vectors[i * n + j]));
    let reference = am
        .self_adjoint_eigen(Side::Lower)
        .expect("faer reference eigendecomposition");
    let lambda_ref = reference.S().column_vector();
    let norm_f = am.norm_l2();
    assert!(
        values.windows(2).all(|w| w[0] <= w[1]),
        "eigenvalues not ascending: {values:?}"
    );
    let av = &am * &v;
    let residual = Mat::from_fn(n, n, |i, j| av[(i, j)] - v[(i, j)] * f64::from(values[j]));
    let vtv = v.transpose() * &v;
    let gram_error = Mat::from_fn(n, n, |i, j| vtv[(i, j)] - if i == j { 1.0 } else { 0.0 });
    let eigenvalues = (0..n)
        .map(|i| (f64::from(values[i]) - lambda_ref[i]).abs())
        .fold(0.0, f64::max);
    Accuracy {
        residual: residual.norm_l2() / norm_f.max(f64::MIN_POSITIVE),
        orthogonality: gram_error.norm_l2(),
        eigenvalues: eigenvalues / norm_f.max(f64::MIN_POSITIVE),
    }
}

/// Runs `eigh` on a batch of `n × n` matrices and measures each one.
fn run_batch(
    ctx: &GpuContext,
    matrices: &[Vec<f32>],
    n: usize,
    opts: &JacobiOptions,
) -> (Eigen, Vec<Accuracy>) {
    let flat: Vec<f32> = matrices.concat();
    let a = ctx.upload(&flat, &[matrices.len(), n, n]).unwrap();
    let eig = eigh(ctx, &a, opts).unwrap();
    assert_eq!(eig.values.shape(), &[matrices.len(), n]);
    assert_eq!(eig.vectors.shape(), &[matrices.len(), n, n]);
    let values = ctx.read(&eig.values).unwrap();
    let vectors = ctx.read(&eig.vectors).unwrap();
    let acc = matrices
        .iter()
        .enumerate()
        .map(|(b, m)| {
            accuracy(
                m,
                n,
                &values[b * n..(b + 1) * n],
                &vectors[b * n * n..(b + 1) * n * n],
            )
        })
        .collect();
    (eig, acc)
}

/// Decomposes one batch of each spectrum at size `n` on `path` and checks the targets.
fn check_sizes(sizes: &[usize], path: JacobiPath, residual: f64, orthogonality: f64) {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(7);
    let opts = JacobiOptions {
        path,
        ..JacobiOptions::default()
    };
    for &n in sizes {
        let matrices: Vec<Vec<f32>> = ALL.iter().map(|&s| test_matrix(n, s, &mut rng)).collect();
        let (eig, acc) = run_batch(&ctx, &matrices, n, &opts);
        for (spectrum, a) in ALL.iter().zip(&acc) {
            eprintln!(
                "{path:?} n={n} {spectrum:?}: residual {:.2e} orthogonality {:.2e} \
                 eigenvalues {:.2e} (sweeps {}, off {:.1e})",
                a.residual, a.orthogonality, a.eigenvalues, eig.sweeps, eig.off_diagonal
            );
            a.assert_within(
                residual,
                orthogonality,
                &format!("{path:?} n={n} {spectrum:?}"),
            );
        }
    }
}

#[test]
fn workgroup_path_meets_the_targets_on_small_batches() {
    check_sizes(&[1, 2, 3, 5, 17, 32, 64, 100], JacobiPath::Auto, 1e-5, 1e-4);
}

#[test]
fn global_path_meets_the_targets_on_odd_and_even_sizes() {
    check_sizes(&[1, 2, 5, 17, 40], JacobiPath::Global, 1e-5, 1e-4);
}

#[test]
fn workgroup_path_in_storage_buffers_up_to_its_limit() {
    check_sizes(&[33], JacobiPath::Workgroup, 1e-5, 1e-4);
    check_one(
        256,
        Spectrum::RankDeficient,
        JacobiPath::Workgroup,
        1e-5,
        1e-4,
    );
}

/// One matrix of size `n` with the given spectrum on `path`; returns the sweeps (0
/// when skipped without a GPU).
fn check_one(
    n: usize,
    spectrum: Spectrum,
    path: JacobiPath,
    residual: f64,
    orthogonality: f64,
) -> usize {
    let Some(ctx) = common::gpu() else { return 0 };
    let mut rng = TestRng::new(n as u64);
    let opts = JacobiOptions {
        path,
        ..JacobiOptions::default()
    };
    let a = test_matrix(n, spectrum, &mut rng);
    let start = std::time::Instant::now();
    let (eig, acc) = run_batch(&ctx, &[a], n, &opts);
    eprintln!(
        "{path:?} n={n} {spectrum:?}: residual {:.2e} orthogonality {:.2e} eigenvalues {:.2e} \
         (sweeps {}, off {:.1e}, {:.1?})",
        acc[0].residual,
        acc[0].orthogonality,
        acc[0].eigenvalues,
        eig.sweeps,
        eig.off_diagonal,
        start.elapsed()
    );
    acc[0].assert_within(
        residual,
        orthogonality,
        &format!("{path:?} n={n} {spectrum:?}"),
    );
    eig.sweeps
}

#[test]
fn global_path_n256() {
    check_one(256, Spectrum::Spread, JacobiPath::Global, 1e-5, 1e-4);
}

#[test]
fn global_path_n300() {
    check_one(300, Spectrum::RankDeficient, JacobiPath::Global, 1e-5, 1e-4);
}

/// Batches larger than one storage binding (16384 floats on the small-binding device)
/// run on the blocked path with each tensor bound as up to three windows: one matrix of
/// n = 200 (40000 floats) of each spectrum, refined by a warm restart (whose products
/// are cut into windows too), and a batch of three n = 100 (30000 floats, two windows)
/// that `Auto` sends to the blocked path. The targets are those of `blocked_path_n300`.
/// Larger batches, and the paths that bind one window, are refused.
#[test]
fn matrices_larger_than_one_binding() {
    let Some(ctx) = common::small_binding_gpu() else {
        return;
    };
    let mut rng = TestRng::new(11);
    let opts = JacobiOptions {
        refine_min_n: 150,
        ..JacobiOptions::default()
    };
    for spectrum in ALL {
        let a = test_matrix(200, spectrum, &mut rng);
        let (_, acc) = run_batch(&ctx, &[a], 200, &opts);
        eprintln!("windowed n=200 {spectrum:?}: {:?}", acc[0]);
        acc[0].assert_within(1e-5, 1e-4, &format!("windowed n=200 {spectrum:?}"));
    }
    let matrices: Vec<Vec<f32>> = ALL.iter().map(|&s| test_matrix(100, s, &mut rng)).collect();
    let (_, acc) = run_batch(&ctx, &matrices, 100, &opts);
    for (spectrum, a) in ALL.iter().zip(&acc) {
        a.assert_within(1e-5, 1e-4, &format!("windowed batch n=100 {spectrum:?}"));
    }
    // 3 · 16384 floats hold the blocked path's padded 210² (14 blocks of 15) but not
    // 224² (n = 211 … 224: 14 blocks of 16).
    assert_eq!(ekfac::ops::jacobi::max_dimension(&ctx), 210);
    let too_big = ctx.zeros(&[211, 211]).unwrap();
    let one_window = ctx.zeros(&[200, 200]).unwrap();
    for (a, path) in [
        (&too_big, JacobiPath::Auto),
        (&one_window, JacobiPath::Global),
        (&one_window, JacobiPath::Workgroup),
    ] {
        let opts = JacobiOptions {
            path,
            ..JacobiOptions::default()
        };
        match eigh(&ctx, a, &opts) {
            Err(Error::Memory(msg)) => {
                assert!(msg.contains("max_storage_buffer_binding_size"), "{msg}")
            }
            other => panic!(
                "{path:?} on {:?}: expected Error::Memory, got {other:?}",
                a.shape()
            ),
        }
    }
}

/// On a device whose storage bindings hold 16384 floats, ten matrices of n = 33 fit one
/// binding (10890 floats) but the QR's triangular factors `T` (two panels of 32 × 32
/// each, 20480 floats) do not: `qr` refuses them with
/// [`Error::Memory`] naming the limit, and `eigh` skips the QR step (eight fit and
/// take it) and still meets the targets.
#[test]
fn the_qr_step_is_skipped_beyond_one_binding() {
    let Some(ctx) = common::small_binding_gpu() else {
        return;
    };
    let n = 33;
    assert!(ekfac::ops::qr::fits_one_binding(&ctx, 8, n));
    assert!(!ekfac::ops::qr::fits_one_binding(&ctx, 10, n));
    let mut rng = TestRng::new(23);
    let matrices: Vec<Vec<f32>> = (0..10)
        .map(|i| test_matrix(n, ALL[i % 3], &mut rng))
        .collect();
    let a = ctx.upload(&matrices.concat(), &[10, n, n]).unwrap();
    match ekfac::ops::qr::qr(&ctx, &a) {
        Err(Error::Memory(msg)) => {
            assert!(msg.contains("max_storage_buffer_binding_size"), "{msg}")
        }
        other => panic!("expected Error::Memory, got {other:?}"),
    }
    let (_, acc) = run_batch(&ctx, &matrices, n, &JacobiOptions::default());
    for (i, a) in acc.iter().enumerate() {
        a.assert_within(1e-5, 1e-4, &format!("matrix {i} of ten n = 33"));
    }
}

/// Slow on the software driver: run with `--ignored` on a real GPU. Looser targets
/// for large n (issue 4): rounding grows with the number of rotations per entry.
#[test]
#[ignore]
fn global_path_large() {
    for n in [1024, 2048] {
        for spectrum in ALL {
            check_one(n, spectrum, JacobiPath::Global, 3e-5, 2e-4);
        }
    }
}

/// The blocked path at n = 300: 20 blocks of 15 indices, so 10 block pairs per round,
/// on every kind of spectrum. Bounds are the targets above n = 256 (3e-5, 2e-4;
/// `n·ε` alone is 1.8e-5 at n = 300): the clustered spectrum reaches 8.5e-6 on
/// lavapipe, too close to 1e-5 for an adapter that rounds differently (FMA contraction).
/// Sweeps after the QR preconditioner (`precondition_min_n`): at most 6 on the graded
/// and rank-deficient spectra and 13 on the clustered one (measured on lavapipe: 5,
/// 11–12 and 5; without the QR step 11, 15 and 11).
#[test]
fn blocked_path_n300() {
    for (spectrum, most) in ALL.into_iter().zip([6, 13, 6]) {
        let sweeps = check_one(300, spectrum, JacobiPath::Blocked, 3e-5, 2e-4);
        assert!(sweeps <= most, "{spectrum:?}: {sweeps} sweeps > {most}");
    }
}

/// Issue 13's sweep target: at most 8 sweeps at n = 512 on the graded spectrum (blocked
/// path, QR-preconditioned), within the accuracy targets of large n. Run with
/// `--ignored` (8 s on lavapipe: 5 sweeps, residual 4.0e-6, `‖VᵀV−I‖_F` 7.9e-6; the
/// blocked path took 13 sweeps without the QR step).
#[test]
#[ignore]
fn preconditioned_graded_n512() {
    let sweeps = check_one(512, Spectrum::Spread, JacobiPath::Blocked, 3e-5, 2e-4);
    assert!(sweeps <= 8, "{sweeps} sweeps > 8");
}

/// The blocked path on sizes below, at and just above one block pair (2 · 16 indices).
#[test]
fn blocked_path_small_sizes() {
    check_sizes(&[1, 2, 17, 32, 33, 70], JacobiPath::Blocked, 1e-5, 1e-4);
}

/// Errors of a computed `A = Q R` (`[n, n]` each, row-major), in f64:
/// `(‖QᵀQ − I‖_F, ‖tril(QᵀA, −1)‖_F / ‖A‖_F, ‖Q R − A‖_F / ‖A‖_F)`: orthogonality, how
/// far `QᵀA` is from upper triangular (zero when `Q R = A` with `R` upper triangular),
/// and the backward error of both factors. Panics unless `R` is exactly zero below the
/// diagonal.
fn qr_errors(a: &[f32], q: &[f32], r: &[f32], n: usize) -> (f64, f64, f64) {
    let am = Mat::from_fn(n, n, |i, j| f64::from(a[i * n + j]));
    let qm = Mat::from_fn(n, n, |i, j| f64::from(q[i * n + j]));
    let rm = Mat::from_fn(n, n, |i, j| f64::from(r[i * n + j]));
    assert!(
        (0..n).all(|i| (0..i).all(|j| r[i * n + j] == 0.0)),
        "R is not zero below the diagonal"
    );
    let qtq = qm.transpose() * &qm;
    let gram = Mat::from_fn(n, n, |i, j| qtq[(i, j)] - if i == j { 1.0 } else { 0.0 });
    let qta = qm.transpose() * &am;
    let below = Mat::from_fn(n, n, |i, j| if i > j { qta[(i, j)] } else { 0.0 });
    let backward = &qm * &rm - &am;
    let relative = |x: f64| {
        let norm = am.norm_l2();
        if norm > 0.0 { x / norm } else { x }
    };
    (
        gram.norm_l2(),
        relative(below.norm_l2()),
        relative(backward.norm_l2()),
    )
}

/// The QR factors of a batch of n = 70 matrices (panels of 32, 32 and 6
/// columns): a random non-symmetric one, the three test spectra, a zero matrix and one
/// whose odd columns repeat the even ones (rank 35), the random one times 1e-30 (its
/// squares underflow f32: the reflectors are computed on scaled columns), plus single
/// matrices of n = 1, 32 and 33. Held in f64 to `‖QᵀQ − I‖_F ≤ 4·n·ε`,
/// `‖tril(QᵀA, −1)‖_F ≤ 4·n·ε·‖A‖_F` and `‖Q R − A‖_F ≤ 4·n·ε·‖A‖_F`, with `R` exactly
/// zero below the diagonal (Householder QR is backward stable with errors of a few
/// `n·ε`; ε = 2⁻²³); the zero
/// matrix gives `Q = I` exactly; on the random matrix `Q` equals faer's f64 `Q` up to
/// the signs of its columns (`1 − |⟨q_j, q_ref_j⟩| ≤ 1e-5`; measured 1.5e-7).
#[test]
fn qr_factors_against_f64() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(17);
    let n = 70;
    let random: Vec<f32> = rng.vec(n * n);
    let mut matrices = vec![random.clone()];
    matrices.extend(ALL.iter().map(|&s| test_matrix(n, s, &mut rng)));
    matrices.push(vec![0.0; n * n]);
    let mut dependent = rng.vec(n * n);
    for i in 0..n {
        for j in (1..n).step_by(2) {
            dependent[i * n + j] = dependent[i * n + j - 1];
        }
    }
    matrices.push(dependent);
    matrices.push(random.iter().map(|&x| x * 1e-30).collect());
    let names = [
        "random",
        "spread",
        "clustered",
        "rank n/3",
        "zero",
        "repeated columns",
        "random × 1e-30",
    ];
    let a = ctx
        .upload(&matrices.concat(), &[matrices.len(), n, n])
        .unwrap();
    let factors = ekfac::ops::qr::qr(&ctx, &a).unwrap();
    assert_eq!(factors.q.shape(), a.shape());
    assert_eq!(factors.r.shape(), a.shape());
    let q = ctx.read(&factors.q).unwrap();
    let r = ctx.read(&factors.r).unwrap();
    let bound = |n: usize| 4.0 * n as f64 * f64::from(f32::EPSILON);
    for (((m, name), qb), rb) in matrices
        .iter()
        .zip(names)
        .zip(q.chunks(n * n))
        .zip(r.chunks(n * n))
    {
        let (orthogonality, triangular, backward) = qr_errors(m, qb, rb, n);
        eprintln!(
            "qr n={n} {name}: ‖QᵀQ−I‖ {orthogonality:.2e}, tril {triangular:.2e}, \
             ‖QR−A‖ {backward:.2e}"
        );
        assert!(
            orthogonality <= bound(n) && triangular <= bound(n) && backward <= bound(n),
            "{name}: ‖QᵀQ − I‖_F {orthogonality:e}, ‖tril(QᵀA)‖/‖A‖ {triangular:e}, \
             ‖QR − A‖/‖A‖ {backward:e}"
        );
    }
    let identity: Vec<f32> = (0..n * n)
        .map(|e| if e / n == e % n { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(&q[4 * n * n..5 * n * n], &identity[..], "zero matrix");
    let reference = Mat::from_fn(n, n, |i, j| f64::from(random[i * n + j]))
        .qr()
        .compute_Q();
    let sign_free = (0..n)
        .map(|j| {
            let dot: f64 = (0..n)
                .map(|i| f64::from(q[i * n + j]) * reference[(i, j)])
                .sum();
            1.0 - dot.abs()
        })
        .fold(0.0, f64::max);
    eprintln!("qr n={n} random: max_j 1 − |⟨q_j, q_ref_j⟩| {sign_free:.2e}");
    assert!(
        sign_free <= 1e-5,
        "random: Q differs from faer's: {sign_free:e}"
    );
    for n in [1, 32, 33] {
        let m = rng.vec(n * n);
        let a = ctx.upload(&m, &[n, n]).unwrap();
        let factors = ekfac::ops::qr::qr(&ctx, &a).unwrap();
        assert_eq!(factors.q.shape(), &[n, n]);
        let (orthogonality, triangular, backward) = qr_errors(
            &m,
            &ctx.read(&factors.q).unwrap(),
            &ctx.read(&factors.r).unwrap(),
            n,
        );
        eprintln!(
            "qr n={n}: ‖QᵀQ−I‖ {orthogonality:.2e}, tril {triangular:.2e}, ‖QR−A‖ {backward:.2e}"
        );
        let bound = bound(n.max(8));
        assert!(
            orthogonality <= bound && triangular <= bound && backward <= bound,
            "n = {n}: ‖QᵀQ − I‖_F {orthogonality:e}, ‖tril(QᵀA)‖/‖A‖ {triangular:e}, \
             ‖QR − A‖/‖A‖ {backward:e}"
        );
    }
}

/// Slow on the software driver: run with `--ignored` on a real GPU. Looser targets
/// for large n (issue 4): rounding grows with the number of rotations per entry. Run
/// once on lavapipe (about 80 minutes in all); every case met the targets (README,
/// "Eigenbases").
#[test]
#[ignore]
fn blocked_path_large() {
    for n in [1024, 2048] {
        for spectrum in ALL {
            check_one(n, spectrum, JacobiPath::Blocked, 3e-5, 2e-4);
        }
    }
}

/// Times the blocked and global paths at n = 300 and 512 (prints the times; checks
/// only the accuracy targets of large n).
#[test]
#[ignore]
fn blocked_and_global_timings() {
    for n in [300, 512] {
        for path in [JacobiPath::Blocked, JacobiPath::Global] {
            check_one(n, Spectrum::Spread, path, 3e-5, 2e-4);
        }
    }
}

/// A symmetric perturbation of relative Frobenius size `eps`.
fn perturb(a: &[f32], n: usize, eps: f64, rng: &mut TestRng) -> Vec<f32> {
    let norm = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let mut out = a.to_vec();
    for i in 0..n {
        for j in 0..=i {
            let d = (eps * norm / n as f64 * rng.uniform()) as f32;
            out[i * n + j] += d;
            if i != j {
                out[j * n + i] += d;
            }
        }
    }
    out
}

/// A warm start from the basis of a nearby matrix (relative perturbation 1e-3) takes
/// fewer sweeps than the cold start without the QR preconditioner, and no more than
/// the preconditioned cold start (the default, with which the two tie on the graded
/// spectrum at n = 40: 4 and 4, against 8 without the QR step).
#[test]
fn warm_start_needs_fewer_sweeps_than_cold() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(3);
    for (n, path) in [
        (24, JacobiPath::Workgroup),
        (64, JacobiPath::Workgroup),
        (40, JacobiPath::Global),
        (150, JacobiPath::Blocked),
    ] {
        let opts = JacobiOptions {
            path,
            ..JacobiOptions::default()
        };
        let a = test_matrix(n, Spectrum::Spread, &mut rng);
        let (previous, _) = run_batch(&ctx, std::slice::from_ref(&a), n, &opts);
        let basis = previous.vectors.reshape(&[n, n]).unwrap();
        let moved = perturb(&a, n, 1e-3, &mut rng);
        let (cold, _) = run_batch(&ctx, std::slice::from_ref(&moved), n, &opts);
        let plain_opts = JacobiOptions {
            precondition_min_n: usize::MAX,
            ..opts
        };
        let (plain, _) = run_batch(&ctx, std::slice::from_ref(&moved), n, &plain_opts);
        let warm_opts = JacobiOptions {
            warm_start: Some(&basis),
            ..opts
        };
        let (warm, acc) = run_batch(&ctx, &[moved], n, &warm_opts);
        eprintln!(
            "{path:?} n={n}: cold {} sweeps (without the QR step {}), warm {} sweeps, warm {:?}",
            cold.sweeps, plain.sweeps, warm.sweeps, acc[0]
        );
        acc[0].assert_within(1e-5, 1e-4, &format!("warm start {path:?} n={n}"));
        assert!(
            warm.sweeps < plain.sweeps && warm.sweeps <= cold.sweeps,
            "{path:?} n={n}: warm start took {} sweeps, cold {} (without the QR step {})",
            warm.sweeps,
            cold.sweeps,
            plain.sweeps
        );
    }
}

/// The refinement of large cold starts (`refine_min_n`, default 768, too slow to reach
/// in CI on the software driver) forced on at n = 150: restarting from the computed
/// basis on the original matrix (Rayleigh quotients of `VᵀAV` formed afresh, then
/// sweeps while it is not diagonal) stays within the targets and lowers the residual
/// (measured here: 2.0e-6 → 1.0e-6).
#[test]
fn refinement_restarts_from_the_computed_basis() {
    let Some(ctx) = common::gpu() else { return };
    let n = 150;
    let a = test_matrix(n, Spectrum::Spread, &mut TestRng::new(11));
    let run = |refine_min_n| {
        let opts = JacobiOptions {
            path: JacobiPath::Blocked,
            refine_min_n,
            ..JacobiOptions::default()
        };
        let (eig, acc) = run_batch(&ctx, std::slice::from_ref(&a), n, &opts);
        (eig.sweeps, acc[0])
    };
    let (plain_sweeps, plain) = run(usize::MAX);
    let (refined_sweeps, refined) = run(0);
    eprintln!(
        "n={n}: plain {plain_sweeps} sweeps {plain:?}, refined {refined_sweeps} sweeps {refined:?}"
    );
    refined.assert_within(1e-5, 1e-4, "refined");
    assert!(
        refined.residual < plain.residual,
        "refinement did not lower the residual: {} ≥ {}",
        refined.residual,
        plain.residual
    );
}

#[test]
fn a_single_matrix_keeps_its_shape() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(5);
    let n = 6;
    let a = test_matrix(n, Spectrum::Clustered, &mut rng);
    let t = ctx.upload(&a, &[n, n]).unwrap();
    let eig = eigh(&ctx, &t, &JacobiOptions::default()).unwrap();
    assert_eq!(eig.values.shape(), &[n]);
    assert_eq!(eig.vectors.shape(), &[n, n]);
    let acc = accuracy(
        &a,
        n,
        &ctx.read(&eig.values).unwrap(),
        &ctx.read(&eig.vectors).unwrap(),
    );
    acc.assert_within(1e-5, 1e-4, "[n, n] input");
}

#[test]
fn factors_of_different_sizes_in_one_call() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(9);
    let sizes = [3, 10, 1];
    let matrices: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| test_matrix(n, Spectrum::RankDeficient, &mut rng))
        .collect();
    let tensors: Vec<_> = matrices
        .iter()
        .zip(sizes)
        .map(|(m, n)| ctx.upload(m, &[n, n]).unwrap())
        .collect();
    let refs: Vec<_> = tensors.iter().collect();
    let eigs = eigh_each(&ctx, &refs, &JacobiOptions::default()).unwrap();
    for ((m, n), eig) in matrices.iter().zip(sizes).zip(&eigs) {
        let acc = accuracy(
            m,
            n,
            &ctx.read(&eig.values).unwrap(),
            &ctx.read(&eig.vectors).unwrap(),
        );
        acc.assert_within(1e-5, 1e-4, &format!("eigh_each n={n}"));
    }
}

/// A stack of matrices on the blocked path (n ≥ 33; per round the column-panel GEMM of
/// the whole stack is one two-level product) gives each matrix bitwise the values and
/// vectors of a one-matrix call: when both run the same sweeps (`tol = 0`: every pair
/// rotated in each of 3 sweeps), and with the default stopping rule, where the stack
/// runs until its slowest matrix is done and leaves the matrices done before alone
/// (spectra that take different sweeps).
#[test]
fn a_stack_on_the_blocked_path_matches_one_matrix_calls() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(34);
    let fixed = JacobiOptions {
        tol: 0.0,
        max_sweeps: 3,
        ..JacobiOptions::default()
    };
    for (n, spectra) in [
        (
            40,
            [
                Spectrum::Spread,
                Spectrum::Clustered,
                Spectrum::RankDeficient,
            ]
            .as_slice(),
        ),
        (70, [Spectrum::Clustered, Spectrum::Spread].as_slice()),
    ] {
        let k = spectra.len();
        let matrices: Vec<Vec<f32>> = spectra
            .iter()
            .map(|&spectrum| test_matrix(n, spectrum, &mut rng))
            .collect();
        let stack = ctx.upload(&matrices.concat(), &[k, n, n]).unwrap();
        for (rule, opts) in [("3 sweeps", fixed), ("default", JacobiOptions::default())] {
            let (values, vectors, sweeps, _) = bits(&ctx, &eigh(&ctx, &stack, &opts).unwrap());
            let mut most = 0;
            for (i, a) in matrices.iter().enumerate() {
                let one = eigh(&ctx, &ctx.upload(a, &[n, n]).unwrap(), &opts).unwrap();
                let (one_values, one_vectors, one_sweeps, _) = bits(&ctx, &one);
                most = most.max(one_sweeps);
                let at = format!("{rule}: n = {n}, matrix {i} of {k} ({one_sweeps} sweeps)");
                assert_eq!(one_values, values[i * n..][..n], "values, {at}");
                assert_eq!(one_vectors, vectors[i * n * n..][..n * n], "vectors, {at}");
            }
            assert_eq!(
                sweeps, most,
                "{rule}: the stack runs its slowest matrix's sweeps"
            );
        }
    }
}

/// The bits of an eigendecomposition: values, vectors, sweeps, off-diagonal norm.
fn bits(ctx: &GpuContext, eig: &Eigen) -> (Vec<u32>, Vec<u32>, usize, u32) {
    let values = ctx.read(&eig.values).unwrap();
    let vectors = ctx.read(&eig.vectors).unwrap();
    (
        values.iter().map(|x| x.to_bits()).collect(),
        vectors.iter().map(|x| x.to_bits()).collect(),
        eig.sweeps,
        eig.off_diagonal.to_bits(),
    )
}

/// `eigh_many` records every input into the same passes, but each input runs the same
/// kernels with the same parameters and stops by its own rule: its results are bitwise
/// those of a separate `eigh`. Auto path: workgroup-memory batches (n ≤ 32) of two
/// spectra, a blocked input with the QR step (n = 40), a warm-started blocked one and a
/// `[n, n]` one; global path (explicit): a batch, a warm start and a QR-preconditioned
/// input. The inputs need different sweep counts (checked), so some stop while others
/// go on.
#[test]
fn many_inputs_in_one_call_match_separate_calls() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(21);
    let upload = |matrices: &[Vec<f32>], shape: &[usize]| ctx.upload(&matrices.concat(), shape);
    for path in [JacobiPath::Auto, JacobiPath::Global] {
        let opts = JacobiOptions {
            path,
            ..JacobiOptions::default()
        };
        // (n, matrices, shape, warm start)
        let cases: Vec<(usize, usize, Spectrum, bool)> = match path {
            JacobiPath::Auto => vec![
                (12, 3, Spectrum::Spread, false),
                (40, 1, Spectrum::Spread, false),
                (20, 2, Spectrum::Clustered, false),
                (36, 1, Spectrum::Spread, true),
                (48, 0, Spectrum::RankDeficient, false),
            ],
            _ => vec![
                (9, 2, Spectrum::Clustered, false),
                (16, 1, Spectrum::Spread, true),
                (40, 1, Spectrum::Spread, false),
            ],
        };
        let mut tensors = Vec::new();
        let mut bases = Vec::new();
        for &(n, k, spectrum, warm) in &cases {
            let shape = if k == 0 { vec![n, n] } else { vec![k, n, n] };
            let mut matrices: Vec<Vec<f32>> = (0..k.max(1))
                .map(|_| test_matrix(n, spectrum, &mut rng))
                .collect();
            let basis = if warm {
                let t = upload(&matrices, &shape).unwrap();
                let previous = eigh(&ctx, &t, &opts).unwrap();
                matrices = matrices
                    .iter()
                    .map(|a| perturb(a, n, 1e-3, &mut rng))
                    .collect();
                Some(previous.vectors)
            } else {
                None
            };
            tensors.push(upload(&matrices, &shape).unwrap());
            bases.push(basis);
        }
        let inputs: Vec<EighInput> = tensors
            .iter()
            .zip(&bases)
            .map(|(matrices, basis)| EighInput {
                matrices,
                warm_start: basis.as_ref(),
            })
            .collect();
        let observed = std::cell::RefCell::new(Vec::new());
        let observe = |s: Sweeps| observed.borrow_mut().push(s);
        let observed_opts = JacobiOptions {
            on_sweep: Some(SweepObserver(&observe)),
            ..opts
        };
        let together = eigh_many(&ctx, &inputs, &observed_opts).unwrap();
        let mut sweeps = Vec::new();
        for (i, (input, many)) in inputs.iter().zip(&together).enumerate() {
            let alone = eigh(
                &ctx,
                input.matrices,
                &JacobiOptions {
                    warm_start: input.warm_start,
                    ..opts
                },
            )
            .unwrap();
            assert_eq!(many.values.shape(), alone.values.shape());
            assert_eq!(many.vectors.shape(), alone.vectors.shape());
            let (b_many, b_alone) = (bits(&ctx, many), bits(&ctx, &alone));
            assert!(
                b_many == b_alone,
                "{path:?} input {i} {:?}: eigh_many differs from eigh (sweeps {} vs {}, \
                 off {} vs {})",
                cases[i],
                many.sweeps,
                alone.sweeps,
                many.off_diagonal,
                alone.off_diagonal
            );
            sweeps.push(many.sweeps);
        }
        eprintln!("{path:?}: sweeps {sweeps:?} for {cases:?}");
        // One report per shared readback after a sweep of the host-driven inputs (all
        // on the global path, n > 32 on the automatic one): 1, 2, … up to their most.
        let host_driven = cases
            .iter()
            .zip(&sweeps)
            .filter(|((n, ..), _)| path == JacobiPath::Global || *n > 32);
        let most = host_driven.clone().map(|(_, &s)| s).max().unwrap();
        let largest_n = host_driven.map(|((n, ..), _)| *n).max().unwrap();
        let observed = observed.into_inner();
        let counts: Vec<usize> = observed.iter().map(|s| s.sweeps).collect();
        assert_eq!(counts, (1..=most).collect::<Vec<_>>(), "{path:?}");
        assert!(
            observed
                .iter()
                .all(|s| s.dim <= largest_n && s.off_diagonal.is_finite()),
            "{path:?}: {observed:?}"
        );
        let first = sweeps[0];
        assert!(
            sweeps.iter().any(|&s| s != first),
            "{path:?}: every input took {first} sweeps; the test needs different counts"
        );
    }
}

/// Bad input in one of several inputs is the error it is alone, naming the input.
#[test]
fn a_bad_input_among_many_is_named() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(22);
    let good = ctx
        .upload(&test_matrix(10, Spectrum::Spread, &mut rng), &[10, 10])
        .unwrap();
    let good_large = ctx
        .upload(&test_matrix(36, Spectrum::Spread, &mut rng), &[36, 36])
        .unwrap();
    for (n, path) in [
        (8, JacobiPath::Auto),
        (40, JacobiPath::Auto),
        (12, JacobiPath::Global),
    ] {
        let mut a = vec![0f32; 2 * n * n];
        a[n * n + 3] = f32::NAN;
        let bad = ctx.upload(&a, &[2, n, n]).unwrap();
        let opts = JacobiOptions {
            path,
            ..JacobiOptions::default()
        };
        let alone = eigh(&ctx, &bad, &opts).unwrap_err().to_string();
        let inputs = [&good, &bad, &good_large].map(|matrices| EighInput {
            matrices,
            warm_start: None,
        });
        let many = eigh_many(&ctx, &inputs, &opts).unwrap_err().to_string();
        assert!(
            alone.contains("matrix 1") && alone.contains("NaN"),
            "{path:?} n={n}: {alone}"
        );
        assert_eq!(
            many.replacen("input 1: ", "", 1),
            alone,
            "{path:?} n={n}: {many}"
        );
    }
    // A warm start of the wrong shape in the third input.
    let wrong = ctx.zeros(&[3, 3]).unwrap();
    let alone = eigh(
        &ctx,
        &good_large,
        &JacobiOptions {
            warm_start: Some(&wrong),
            ..JacobiOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    let inputs = [
        (&good, None),
        (&good_large, None),
        (&good_large, Some(&wrong)),
    ]
    .map(|(matrices, warm_start)| EighInput {
        matrices,
        warm_start,
    });
    let many = eigh_many(&ctx, &inputs, &JacobiOptions::default())
        .unwrap_err()
        .to_string();
    assert!(alone.contains("[3, 3]"), "{alone}");
    assert_eq!(many.replacen("input 2: ", "", 1), alone, "{many}");
}

/// [`JacobiSolver`] through the [`EigenSolver`] seam on factors of two sizes given
/// interleaved, one with a warm start of its size and one with a warm start of another
/// size (ignored): each result belongs to its own factor, in the order given, and its
/// GPU eigenbasis equals the host copy.
fn check_solver(ctx: &GpuContext, sizes: &[usize], what: &str) {
    let mut rng = TestRng::new(12);
    let matrices: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&n| test_matrix(n, Spectrum::Spread, &mut rng))
        .collect();
    let tensors: Vec<_> = matrices
        .iter()
        .zip(sizes)
        .map(|(m, &n)| ctx.upload(m, &[n, n]).unwrap())
        .collect();
    let identity = FactorEigen::identity(sizes[0]);
    let factors: Vec<Factor> = tensors
        .iter()
        .enumerate()
        .map(|(i, matrix)| Factor {
            matrix,
            warm_start: (i < 2).then_some(&identity),
        })
        .collect();
    let results = JacobiSolver::default()
        .eigendecompose(ctx, &factors, &Silent)
        .unwrap();
    assert_eq!(results.len(), sizes.len());
    for (i, ((m, &n), (eigen, basis))) in matrices.iter().zip(sizes).zip(&results).enumerate() {
        assert_eq!(basis.shape(), &[n, n], "{what}: factor {i}");
        assert_eq!(
            ctx.read(basis).unwrap(),
            eigen.vectors,
            "{what}: factor {i}"
        );
        accuracy(m, n, &eigen.values, &eigen.vectors).assert_within(
            1e-5,
            1e-4,
            &format!("{what}: factor {i} (n = {n})"),
        );
    }
}

#[test]
fn jacobi_solver_keeps_each_factor_its_result() {
    let Some(ctx) = common::gpu() else { return };
    check_solver(&ctx, &[5, 3, 5, 3, 5, 1], "stacked");
}

/// On a device whose storage bindings hold 16384 floats, the factors of size 100 are
/// too large to stack two at a time: the stacks are cut.
#[test]
fn jacobi_solver_cuts_stacks_that_exceed_a_binding() {
    let Some(ctx) = common::small_binding_gpu() else {
        return;
    };
    check_solver(&ctx, &[100, 7, 100, 100, 7], "small bindings");
}

#[test]
fn bad_inputs_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let opts = JacobiOptions::default();
    let rectangular = ctx.zeros(&[2, 3]).unwrap();
    let err = eigh(&ctx, &rectangular, &opts).unwrap_err().to_string();
    assert!(err.contains("[2, 3]"), "{err}");

    let square = ctx.zeros(&[2, 4, 4]).unwrap();
    let wrong_basis = ctx.zeros(&[3, 3]).unwrap();
    let warm = JacobiOptions {
        warm_start: Some(&wrong_basis),
        ..opts
    };
    let err = eigh(&ctx, &square, &warm).unwrap_err().to_string();
    assert!(err.contains("[4, 4]") && err.contains("[3, 3]"), "{err}");

    for path in [
        JacobiPath::Workgroup,
        JacobiPath::Global,
        JacobiPath::Blocked,
    ] {
        let mut a = vec![0f32; 2 * 4 * 4];
        a[16 + 5] = f32::NAN;
        let t = ctx.upload(&a, &[2, 4, 4]).unwrap();
        let opts = JacobiOptions {
            path,
            max_sweeps: 3,
            ..opts
        };
        let err = eigh(&ctx, &t, &opts).unwrap_err().to_string();
        assert!(
            err.contains("matrix 1") && err.contains("NaN"),
            "{path:?}: {err}"
        );
    }
    // Through the QR preconditioner (n = 40 ≥ precondition_min_n), NaN above the
    // diagonal of the last panel (a part of R that Q never reads) included.
    let n = 40;
    for at in [5 * n + 7, 2 * n + 38] {
        let mut a = vec![0f32; 2 * n * n];
        a[n * n + at] = f32::NAN;
        let t = ctx.upload(&a, &[2, n, n]).unwrap();
        let err = eigh(&ctx, &t, &opts).unwrap_err().to_string();
        assert!(
            err.contains("matrix 1") && err.contains("NaN"),
            "QR step, NaN at {at}: {err}"
        );
    }
}

/// One fixture case fitted with `solver`: its KFAC and EKFAC products of the
/// fixture's vectors (EKFAC `None` for forward-only).
fn fixture_products(
    ctx: &GpuContext,
    case: &common::FixtureCase,
    solver: &dyn EigenSolver,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let run = FitRun {
        damping: Some(case.damping),
        previous: None,
        solver,
        progress: &Silent,
    };
    let fitted = fit_run(ctx, &case.model, &case.data, &case.options, &run)
        .unwrap_or_else(|e| panic!("{}: {} fit failed: {e}", case.name, solver.name()));
    let operator = Operator::new(ctx, &fitted.state).unwrap();
    let product = |approx| {
        operator
            .apply(&case.vectors, case.columns, approx, Transform::Forward)
            .unwrap()
    };
    let ekfac = fitted
        .state
        .has_ekfac()
        .then(|| product(Approximation::Ekfac));
    (product(Approximation::Kfac), ekfac)
}

/// `--eigensolver host` (faer, f64) and the GPU Jacobi give the same KFAC and EKFAC
/// products on every committed curvlinops fixture, chains and graphs, within the EKFAC
/// product tolerance of tests/curvature_fixtures.rs (relative 1e-4, or twice
/// curvlinops' own float32 error on the case where that is larger: two f32 bases of a
/// nearly degenerate factor may differ as much as curvlinops' f32 and f64 do). Both
/// are also held to curvlinops' f64 products within those bounds.
#[test]
fn host_and_jacobi_solvers_give_the_same_products_on_the_fixtures() {
    let Some(ctx) = common::gpu() else { return };
    let mut failures = Vec::new();
    let mut cases = 0;
    for folder in [common::CHAIN_FIXTURES, common::GRAPH_FIXTURES] {
        for name in common::fixture_names_in(folder) {
            let case = common::fixture_in(folder, &name);
            let (host_kfac, host_ekfac) = fixture_products(&ctx, &case, &HostSolver);
            let (gpu_kfac, gpu_ekfac) = fixture_products(&ctx, &case, &JacobiSolver::default());
            let bound = |key: &str, tolerance: f64| {
                let f32_error = case.expected["float32_curvlinops_error"][key]
                    .as_f64()
                    .unwrap_or(0.0);
                tolerance.max(2.0 * f32_error)
            };
            let as_f64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            let mut check = |what: &str, got: &[f32], want: &[f64], tol: f64| {
                let err = common::rel_err(got, want);
                if err.is_nan() || err > tol {
                    failures.push(format!("{folder}/{name}: {what}: {err:.3e} > {tol:.1e}"));
                }
            };
            let ekfac_tol = bound("ekfac_product.ekfac_mv", 1e-4);
            check(
                "KFAC host vs jacobi",
                &host_kfac,
                &as_f64(&gpu_kfac),
                ekfac_tol,
            );
            if let Some(want) = case.products.get("kfac_mv") {
                let want = want.to_f64().unwrap();
                let tol = bound("product.kfac_mv", 1e-5);
                check("KFAC host vs curvlinops", &host_kfac, &want, tol);
            }
            match (&host_ekfac, &gpu_ekfac) {
                (Some(host), Some(gpu)) => {
                    check("EKFAC host vs jacobi", host, &as_f64(gpu), ekfac_tol);
                    if let Some(want) = case.products.get("ekfac_mv") {
                        let want = want.to_f64().unwrap();
                        check("EKFAC host vs curvlinops", host, &want, ekfac_tol);
                    }
                }
                (None, None) => {}
                _ => failures.push(format!("{folder}/{name}: EKFAC presence differs")),
            }
            cases += 1;
        }
    }
    assert!(cases >= 14, "only {cases} fixture cases found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `ekfac fit --eigensolver host` runs and its summary names the solver; the default
/// names `jacobi`; `auto` is `host` on an adapter whose device type is CPU (lavapipe)
/// and `jacobi` elsewhere; an unknown solver is a clear error naming the option's values.
#[test]
fn the_command_line_names_the_eigensolver() {
    let Some(ctx) = common::gpu() else { return };
    let auto = if ctx.info.device_type == wgpu::DeviceType::Cpu {
        "host"
    } else {
        "jacobi"
    };
    drop(ctx);
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature/mlp_tanh_ce_mean_type2_sep");
    let run = |solver: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ekfac"));
        cmd.arg("fit");
        for (flag, file) in [
            ("--model", "model.json"),
            ("--weights", "weights.safetensors"),
            ("--data", "data.safetensors"),
        ] {
            cmd.arg(flag).arg(fixture.join(file));
        }
        cmd.args(["--loss", "cross_entropy", "--out"])
            .arg(dir.path().join("state.safetensors"))
            .arg("--summary")
            .arg(dir.path().join("summary.json"));
        if let Some(s) = solver {
            cmd.args(["--eigensolver", s]);
        }
        cmd.output().unwrap()
    };
    for (solver, name) in [
        (None, "jacobi"),
        (Some("host"), "host"),
        (Some("jacobi"), "jacobi"),
        (Some("auto"), auto),
    ] {
        let out = run(solver);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{solver:?}: {out:?}");
        assert!(
            stdout.contains(&format!("eigensolver: {name}")),
            "{solver:?}:\n{stdout}"
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["eigensolver"], name, "{solver:?}");
    }
    let out = run(Some("lapack"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("lapack") && err.contains("jacobi, host, auto"),
        "{err}"
    );
}

/// A PSD matrix whose upper half of eigenvalues is graded from 1 to 1e-3 and whose lower
/// half lies at 1e-10·(1 + i/n), below f32's resolution of `ε·‖A‖` (rounded to f32).
fn tiny_eigenvalues(n: usize, rng: &mut TestRng) -> Vec<f32> {
    let q = random_orthogonal(n, rng);
    let lambda: Vec<f64> = (0..n)
        .map(|i| {
            if i < n / 2 {
                1e-10 * (1.0 + i as f64 / n as f64)
            } else {
                10f64.powf(-3.0 * (n - 1 - i) as f64 / (n / 2) as f64)
            }
        })
        .collect();
    let full = Mat::from_fn(n, n, |i, j| {
        (0..n)
            .map(|k| q[(i, k)] * lambda[k] * q[(j, k)])
            .sum::<f64>()
    });
    let mut a = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..=i {
            let x = full[(i, j)] as f32;
            a[i * n + j] = x;
            a[j * n + i] = x;
        }
    }
    a
}

/// The default stopping rule `off ≤ 32ε·‖A‖_F` stops on a matrix whose small eigenvalues
/// f32 cannot resolve, on both the workgroup (n = 96) and the blocked path (n = 160),
/// meeting the accuracy targets: within 12 sweeps from the matrix itself (no QR step),
/// within 7 after the QR preconditioner (the default; measured on lavapipe 5 and 4,
/// without it 11 and 7–8); a rule
/// that asks for more than f32 resolves (tol 0) sweeps on (into the cap of 14, or until
/// the off-diagonal is exactly zero). (The f32 rounding of the input spreads the tiny
/// eigenvalues into a cluster of width about `ε·‖A‖` whose off-diagonal entries Jacobi
/// reduces only linearly, 2–3× per sweep.)
#[test]
fn the_stopping_rule_stops_at_f32_resolution() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(31);
    for (n, path) in [(96, JacobiPath::Workgroup), (160, JacobiPath::Blocked)] {
        let a = tiny_eigenvalues(n, &mut rng);
        let t = ctx.upload(&a, &[n, n]).unwrap();
        for (precondition_min_n, most) in [(usize::MAX, 12), (n, 7)] {
            let opts = JacobiOptions {
                path,
                precondition_min_n,
                ..JacobiOptions::default()
            };
            assert_eq!(opts.tol, F32_RESOLUTION);
            let what = format!("{path:?} n = {n}, QR step {}", precondition_min_n == n);
            let eig = eigh(&ctx, &t, &opts).unwrap();
            assert!(
                eig.sweeps <= most && eig.off_diagonal <= F32_RESOLUTION,
                "{what}: {} sweeps, off {:e}",
                eig.sweeps,
                eig.off_diagonal
            );
            accuracy(
                &a,
                n,
                &ctx.read(&eig.values).unwrap(),
                &ctx.read(&eig.vectors).unwrap(),
            )
            .assert_within(1e-5, 1e-4, &what);
            let chasing = JacobiOptions {
                tol: 0.0,
                max_sweeps: 14,
                ..opts
            };
            let chased = eigh(&ctx, &t, &chasing).unwrap();
            eprintln!(
                "{what}: {} sweeps (off {:.1e}), tol 0: {} sweeps (off {:.1e})",
                eig.sweeps, eig.off_diagonal, chased.sweeps, chased.off_diagonal
            );
            assert!(
                chased.sweeps > eig.sweeps,
                "{what}: tol 0 stopped after {} sweeps, the rule after {}",
                chased.sweeps,
                eig.sweeps
            );
        }
    }
}

/// The QR of a matrix large enough that its panels run with more row lanes than two
/// (n = 1792: four; `qr_panel`'s `LANES`): with two, lavapipe's cap of 65535 loop
/// iterations per invocation silently cut the panels short from n ≈ 1640 on and `Q`
/// was garbage (‖QᵀQ − I‖_F ≈ 0.9). Checked in f64 on 24 columns (the first and last
/// panels', and some between): `Q`'s columns orthonormal and `Q R = A` there to
/// `4·n·ε` (as in `qr_factors_against_f64`), `R` exactly zero below the diagonal.
#[test]
fn qr_of_a_large_matrix() {
    let Some(ctx) = common::gpu() else { return };
    let n = 1792;
    let mut rng = TestRng::new(29);
    let a: Vec<f32> = rng.vec(n * n);
    let factors = ekfac::ops::qr::qr(&ctx, &ctx.upload(&a, &[n, n]).unwrap()).unwrap();
    let q = ctx.read(&factors.q).unwrap();
    let r = ctx.read(&factors.r).unwrap();
    let columns: Vec<usize> = [0, 1, 2, 31, 32, 33, 500, 900, 1300, 1700]
        .into_iter()
        .chain(n - 14..n)
        .collect();
    let bound = 4.0 * n as f64 * f64::from(f32::EPSILON);
    let mut gram = 0.0f64;
    for (x, &i) in columns.iter().enumerate() {
        for &j in &columns[x..] {
            let dot: f64 = (0..n)
                .map(|k| f64::from(q[k * n + i]) * f64::from(q[k * n + j]))
                .sum();
            let e = dot - if i == j { 1.0 } else { 0.0 };
            gram += if i == j { e * e } else { 2.0 * e * e };
        }
    }
    let (mut residual, mut norm) = (0.0f64, 0.0f64);
    for &j in &columns {
        assert!(
            (j + 1..n).all(|i| r[i * n + j] == 0.0),
            "R[.., {j}] is not zero below the diagonal"
        );
        for i in 0..n {
            let qr: f64 = (0..=j)
                .map(|k| f64::from(q[i * n + k]) * f64::from(r[k * n + j]))
                .sum();
            residual += (qr - f64::from(a[i * n + j])).powi(2);
            norm += f64::from(a[i * n + j]).powi(2);
        }
    }
    let (gram, backward) = (gram.sqrt(), (residual / norm).sqrt());
    eprintln!("qr n={n}: ‖QᵀQ−I‖ on 24 columns {gram:.2e}, ‖QR−A‖/‖A‖ there {backward:.2e}");
    assert!(
        gram <= bound && backward <= bound,
        "n = {n}: ‖QᵀQ − I‖_F {gram:e}, ‖QR − A‖/‖A‖ {backward:e} on 24 columns"
    );
}
