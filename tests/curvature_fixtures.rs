//! The GPU pipeline against curvlinops 3.0.1 (float64) on every committed fixture case
//! under `tests/fixtures/curvature/` (see its README for how they were generated).
//!
//! Tolerances (issue 3), relative Frobenius error over the whole output unless noted:
//! KFAC products 1e-5, EKFAC products 1e-4, damped inverse products 1e-3, trace and
//! Frobenius norm 1e-5, logdet and damped logdet 0.05 absolute or 1e-4 relative. Each
//! fixture also records curvlinops' own float32 error on the same case; where that
//! already exceeds a tolerance (tiny eigengaps), the case's bound is twice
//! curvlinops' float32 error instead: a float32 computation cannot do better.

mod common;

use common::curvlinops::{check_batch_sizes, check_folder};
use ekfac::curvature::fit::{fit, fit_from};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::summary::Summary;

#[test]
fn gpu_matches_curvlinops_on_every_fixture() {
    check_folder(common::CHAIN_FIXTURES);
}

/// The graph models (issue 9: BatchNorm, residual additions, LayerNorm, cat, upsample)
/// under the same tolerances as the chains.
#[test]
fn gpu_matches_curvlinops_on_every_graph_fixture() {
    check_folder(common::GRAPH_FIXTURES);
}

/// KFAC and EKFAC do not depend on the batch size (type-2 and empirical sum over
/// examples), so one exported `model.json` fitted with batches of 1, of an uneven 3
/// (11 = 3+3+3+2) and of all 11 examples must each match curvlinops (which used 4)
/// within the same tolerances.
#[test]
fn a_graph_model_fits_the_same_with_any_batch_size() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture_in(
        common::GRAPH_FIXTURES,
        "resnet_down_ce_sum_type2_expand_joint",
    );
    assert_eq!(case.data.len, 11);
    check_batch_sizes(&ctx, case, &[1, 3, 11]);
}

/// A memory budget that only fits about one example with one backpropagated vector
/// (the smallest power-of-two multiple of one example's activations that the fit
/// accepts) forces every batch and every stack of type-2 vectors into chunks; the
/// result must equal the unchunked fit up to f32 summation order (relative 1e-5: sums
/// of at most a few hundred f32 terms reordered). A budget of one example's activations
/// alone is a clear error.
#[test]
fn chunking_to_the_memory_budget_changes_nothing() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture("cnn_a_ce_mean_type2_expand_sep");
    let (model, data, opts) = (&case.model, &case.data, &case.options);
    assert!(opts.batch_size > 1, "the case must have batches to split");
    let whole = fit(&ctx, model, data, opts, Some(1e-2)).unwrap();

    let per_example = 4 * ekfac::graph::Network::new(&ctx, model)
        .unwrap()
        .activation_elements() as u64;
    let default_budget = ctx.memory_budget();
    ctx.set_memory_budget(per_example);
    let too_small = fit(&ctx, model, data, opts, Some(1e-2));
    let mut budget = per_example;
    let chunked = loop {
        budget *= 2;
        ctx.set_memory_budget(budget);
        match fit(&ctx, model, data, opts, Some(1e-2)) {
            Err(ekfac::error::Error::Memory(_)) if budget < 1 << 30 => continue,
            other => break other,
        }
    };
    ctx.set_memory_budget(default_budget);

    let chunked = chunked.unwrap();
    let (a, b) = (
        Summary::new(&whole.state, 1e-2, whole.timings.clone(), 0),
        Summary::new(&chunked.state, 1e-2, chunked.timings.clone(), 0),
    );
    for (x, y) in [
        (a.kfac.trace, b.kfac.trace),
        (a.kfac.frobenius_norm, b.kfac.frobenius_norm),
        (
            a.ekfac.as_ref().unwrap().trace,
            b.ekfac.as_ref().unwrap().trace,
        ),
        (
            a.ekfac.as_ref().unwrap().frobenius_norm,
            b.ekfac.as_ref().unwrap().frobenius_norm,
        ),
    ] {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(((x - y) / x).abs() < 1e-5, "chunked {y} vs whole {x}");
    }
    let err = too_small
        .err()
        .expect("a budget below one example must fail")
        .to_string();
    assert!(err.contains("budget"), "{err}");
}

/// Refitting from an earlier state's eigenbases (`ekfac fit --init-state`) gives the
/// same curvature: Jacobi converges to the same factors' eigenpairs from any start, so
/// the products agree to f32 round-off (1e-5 relative; the case's eigengaps are
/// ≥ 3e-3, so eigenvectors are determined to ~1e-5).
#[test]
fn warm_start_from_a_previous_state_gives_the_same_curvature() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture("mlp_tanh_ce_mean_type2_sep");
    let (model, data, opts) = (&case.model, &case.data, &case.options);
    let cold = fit(&ctx, model, data, opts, Some(1e-2)).unwrap();
    let warm = fit_from(&ctx, model, data, opts, Some(1e-2), Some(&cold.state)).unwrap();
    let (v, columns) = (&case.vectors, case.columns);
    for approx in [Approximation::Kfac, Approximation::Ekfac] {
        let a = Operator::new(&ctx, &cold.state)
            .unwrap()
            .apply(v, columns, approx, Transform::Forward)
            .unwrap();
        let b = Operator::new(&ctx, &warm.state)
            .unwrap()
            .apply(v, columns, approx, Transform::Forward)
            .unwrap();
        let reference: Vec<f64> = a.iter().map(|&x| f64::from(x)).collect();
        let err = common::rel_err(&b, &reference);
        assert!(
            err < 1e-5,
            "{approx:?}: warm vs cold relative error {err:e}"
        );
    }
}
