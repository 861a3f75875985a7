//! GPU fits of graph models against the crate's f64 reference (`CpuCurvature`), for
//! the tests of graphs written in the test itself (sequences, attention).

use std::collections::HashMap;

use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{DampingMode, Options};
use ekfac::graph::{Graph, Model};
use ekfac::loss::Targets as LossTargets;
use ekfac::model::{Dataset, Targets};
use ekfac::reference::curvature::{CpuCurvature, Dataset as CpuDataset, Network64};

use super::TestRng;

/// Damping of the compared inverse products and of the fits.
pub const DAMPING: f64 = 1e-2;
/// Columns `K` of the random test vectors `[P, K]`.
pub const COLUMNS: usize = 2;

/// Random weights for every parameter of `graph`, node by node: uniform in [-1, 1)
/// scaled by 1.5/√fan_in (fan_in: the product of the dims after the first, 1 for a
/// vector), keyed `<module>.<suffix>`, each `(PyTorch shape, row-major values)`.
pub fn random_weights(graph: &Graph, rng: &mut TestRng) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut tensors = HashMap::new();
    for i in 0..graph.nodes.len() {
        for spec in graph.layer(i).params() {
            let n: usize = spec.shape.iter().product();
            let fan_in: usize = spec.shape.get(1..).unwrap_or(&[]).iter().product();
            let scale = 1.5 / (fan_in.max(1) as f64).sqrt();
            let values = (0..n).map(|_| (rng.uniform() * scale) as f32).collect();
            let key = format!("{}.{}", graph.nodes[i].module(), spec.suffix);
            tensors.insert(key, (spec.shape, values));
        }
    }
    tensors
}

/// Fits `model` on `data` (class targets) with `options` on the GPU and in the f64
/// reference, and compares KFAC and EKFAC forward and damped inverse products (KFAC
/// plain, EKFAC exact damping [`DAMPING`]) on random vectors `[P, COLUMNS]` (seed 3).
/// Relative Frobenius tolerances as against curvlinops: products 1e-4 (f32
/// eigenvectors), damped inverses 1e-3. With `shared = Some(p)` the rows of the first
/// `p` parameters are also checked alone (a large head's block would otherwise
/// dominate the norm). `what` names the case in failures.
pub fn compare_fit(
    ctx: &ekfac::gpu::GpuContext,
    model: &Model,
    data: &Dataset,
    options: &Options,
    shared: Option<usize>,
    what: &str,
) {
    const K: usize = COLUMNS;
    let fitted = fit(ctx, model, data, options, Some(DAMPING)).unwrap();
    let mut rng = TestRng::new(3);
    let v = rng.vec(fitted.state.layout.num_params * K);
    let operator = Operator::new(ctx, &fitted.state).unwrap();

    let net = Network64::new(model);
    let x: Vec<f64> = data.x.iter().map(|&x| f64::from(x)).collect();
    let Targets::Classes(y) = &data.y else {
        unreachable!("class targets")
    };
    let classes: Vec<usize> = y.iter().map(|&c| c as usize).collect();
    let cpu_data = CpuDataset {
        x: &x,
        targets: LossTargets::Classes(&classes),
        num_data: data.len,
    };
    let reference = CpuCurvature::fit(&net, &cpu_data, options, true).unwrap();
    assert_eq!(reference.layout, fitted.state.layout, "{what}: layout");
    let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    for approx in [Approximation::Kfac, Approximation::Ekfac] {
        let mode = match approx {
            Approximation::Kfac => DampingMode::Plain,
            Approximation::Ekfac => DampingMode::Exact,
        };
        let cases = [
            (
                Transform::Forward,
                reference.matmat(approx, &v64, K).unwrap(),
                1e-4,
            ),
            (
                Transform::Inverse {
                    damping: DAMPING,
                    mode,
                },
                reference
                    .inverse_matmat(approx, &v64, K, DAMPING, mode)
                    .unwrap(),
                1e-3,
            ),
        ];
        for (transform, want, tol) in cases {
            let got = operator.apply(&v, K, approx, transform).unwrap();
            let parts = [
                Some(("all", got.len())),
                shared.map(|p| ("shared layers", p * K)),
            ];
            for (part, rows) in parts.into_iter().flatten() {
                let e = super::rel_err(&got[..rows], &want[..rows]);
                assert!(
                    e < tol,
                    "{what}: {approx:?} {transform:?} ({part}): relative error {e:.2e} ≥ \
                     {tol:.0e}"
                );
            }
        }
    }
}
