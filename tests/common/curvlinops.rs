//! Fits on the GPU against curvlinops 3.0.1 (float64) on committed fixture cases
//! (`tests/fixtures/<folder>/<case>/`, written by the generator scripts there).
//!
//! Tolerances (issue 3), relative Frobenius error over the whole output unless noted:
//! KFAC products 1e-5, EKFAC products 1e-4, damped inverse products 1e-3, trace and
//! Frobenius norm 1e-5, logdet and damped logdet 0.05 absolute or 1e-4 relative. Each
//! fixture also records curvlinops' own float32 error on the same case; where that
//! already exceeds a tolerance (tiny eigengaps), the case's bound is twice
//! curvlinops' float32 error instead: a float32 computation cannot do better.

use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::DampingMode;
use ekfac::curvature::summary::{ScalarsJson, Summary};
use serde_json::Value;

/// The bound for a quantity: the tolerance, or twice curvlinops' own float32
/// error on this case when that is larger.
fn bound(expected: &Value, key: &str, tolerance: f64) -> f64 {
    let f32_error = expected["float32_curvlinops_error"][key]
        .as_f64()
        .unwrap_or(0.0);
    tolerance.max(2.0 * f32_error)
}

fn check_scalars(
    case: &str,
    name: &str,
    got: &ScalarsJson,
    want: &Value,
    expected: &Value,
) -> Vec<String> {
    let mut failures = Vec::new();
    for key in ["trace", "frobenius_norm"] {
        let (g, w) = (got_value(got, key), want[key].as_f64());
        let tol = bound(expected, &format!("scalar.{name}_{key}"), 1e-5);
        match (g, w) {
            (Some(g), Some(w)) if ((g - w) / w).abs() <= tol => {}
            _ => failures.push(format!(
                "{case}: {name} {key}: got {g:?}, want {w:?} (rel tol {tol:e})"
            )),
        }
    }
    for key in ["logdet", "logdet_damped"] {
        let (g, w) = (got_value(got, key), want[key].as_f64());
        let ok = match (g, w) {
            (None, None) => true,
            (Some(g), Some(w)) => (g - w).abs() <= 0.05 || ((g - w) / w).abs() <= 1e-4,
            _ => false,
        };
        if !ok {
            failures.push(format!("{case}: {name} {key}: got {g:?}, want {w:?}"));
        }
    }
    failures
}

fn got_value(s: &ScalarsJson, key: &str) -> Option<f64> {
    match key {
        "trace" => s.trace,
        "frobenius_norm" => s.frobenius_norm,
        "logdet" => s.logdet,
        "logdet_damped" => s.logdet_damped,
        _ => unreachable!(),
    }
}

/// Every case of `tests/fixtures/<folder>/` fitted on the GPU against curvlinops;
/// prints each case's largest error as a fraction of its bound.
pub fn check_folder(folder: &str) {
    let Some(ctx) = super::gpu() else { return };
    let mut failures = Vec::new();
    for name in super::fixture_names_in(folder) {
        let case = super::fixture_in(folder, &name);
        failures.extend(check_case(&ctx, &format!("{folder}/{name}"), &case));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One case fitted with each of `batch_sizes` against the same curvlinops numbers
/// (the fit must not depend on how the data is batched): asserts no failures.
pub fn check_batch_sizes(
    ctx: &ekfac::gpu::GpuContext,
    mut case: super::FixtureCase,
    batch_sizes: &[usize],
) {
    let mut failures = Vec::new();
    for &batch_size in batch_sizes {
        case.options.batch_size = batch_size;
        let name = format!("{} (batch size {batch_size})", case.name);
        failures.extend(check_case(ctx, &name, &case));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One case fitted on the GPU with its options against curvlinops: the failures,
/// each naming `name`; prints the largest product error as a fraction of its bound.
pub fn check_case(
    ctx: &ekfac::gpu::GpuContext,
    name: &str,
    case: &super::FixtureCase,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut worst = (0.0f64, String::new());
    let expected = &case.expected;
    let damping = case.damping;
    let fitted = fit(ctx, &case.model, &case.data, &case.options, Some(damping))
        .unwrap_or_else(|e| panic!("{name}: fit failed: {e}"));
    let summary = Summary::new(&fitted.state, damping, fitted.timings.clone(), 0);
    assert_eq!(
        summary.num_params,
        expected["num_params"].as_u64().unwrap() as usize,
        "{name}"
    );
    failures.extend(check_scalars(
        name,
        "kfac",
        &summary.kfac,
        &expected["kfac"],
        expected,
    ));
    match (&summary.ekfac, expected["ekfac"].is_null()) {
        (Some(e), false) => failures.extend(check_scalars(
            name,
            "ekfac",
            e,
            &expected["ekfac"],
            expected,
        )),
        (None, true) => {}
        _ => failures.push(format!("{name}: EKFAC presence differs")),
    }

    let operator = Operator::new(ctx, &fitted.state).unwrap();
    let inverse = |mode| Transform::Inverse { damping, mode };
    let checks = [
        (
            "kfac_mv",
            "product.kfac_mv",
            Approximation::Kfac,
            Transform::Forward,
            1e-5,
        ),
        (
            "ekfac_mv",
            "ekfac_product.ekfac_mv",
            Approximation::Ekfac,
            Transform::Forward,
            1e-4,
        ),
        (
            "kfac_inv_exact_mv",
            "inverse.kfac_exact",
            Approximation::Kfac,
            inverse(DampingMode::Exact),
            1e-3,
        ),
        (
            "kfac_inv_plain_mv",
            "inverse.kfac_plain",
            Approximation::Kfac,
            inverse(DampingMode::Plain),
            1e-3,
        ),
        (
            "kfac_inv_heuristic_mv",
            "inverse.kfac_heuristic",
            Approximation::Kfac,
            inverse(DampingMode::Heuristic),
            1e-3,
        ),
        (
            "ekfac_inv_mv",
            "inverse.ekfac",
            Approximation::Ekfac,
            inverse(DampingMode::Exact),
            1e-3,
        ),
    ];
    for (key, error_key, approx, transform, tolerance) in checks {
        let Some(want) = case.products.get(key) else {
            continue;
        };
        let want = want.to_f64().unwrap();
        let got = operator
            .apply(&case.vectors, case.columns, approx, transform)
            .unwrap();
        let err = super::rel_err(&got, &want);
        let tol = bound(expected, error_key, tolerance);
        if err / tol > worst.0 {
            worst = (err / tol, format!("{key} {err:.2e} (bound {tol:.0e})"));
        }
        if err.is_nan() || err > tol {
            failures.push(format!(
                "{name}: {key}: relative error {err:.3e} > {tol:.1e}"
            ));
        }
    }
    eprintln!("{name}: largest product error {}", worst.1);
    failures
}
