//! Transformers (issue 11) on the GPU against curvlinops 3.0.1 (float64): every case of
//! `tests/fixtures/curvature_transformer/` (written by
//! `tests/fixtures/generate_transformer.py` through `tools/export_torch.py`): token
//! classifiers with an embedding and learned positions, pre-LN blocks with multi-head
//! attention from `nn.Linear` q/k/v/o (hand-written with a causal `masked_fill`, or
//! `scaled_dot_product_attention` with `is_causal` or a boolean mask), GELU MLPs,
//! eval-mode dropout and mean or last-token pooling; and ViTs with a strided-conv patch
//! embedding, one with a cls token. Every loss; type-2, empirical and forward-only; expand and reduce; joint and
//! separate bias; a parameter subset; batch sizes that do not divide N. Tolerances
//! as for the Sequential cases (see `tests/common/curvlinops.rs`).

mod common;

use common::curvlinops::{check_batch_sizes, check_folder};
use ekfac::curvature::FisherType;
use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};

const FIXTURES: &str = "curvature_transformer";

#[test]
fn gpu_matches_curvlinops_on_every_transformer_fixture() {
    check_folder(FIXTURES);
}

/// KFAC and EKFAC do not depend on the batch size: one exported transformer (causal
/// SDPA, N = 11, fixture batches of 4) fitted with batches of 1, of an uneven 3
/// (11 = 3+3+3+2) and of all 11 examples must each match curvlinops.
#[test]
fn a_transformer_fits_the_same_with_any_batch_size() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture_in(FIXTURES, "tf_sdpa_causal_ce_sum_type2_expand_joint");
    assert_eq!(case.data.len, 11);
    check_batch_sizes(&ctx, case, &[1, 3, 11]);
}

/// The Monte-Carlo Fisher (issue 11: "type-2/empirical/MC"). ekfac samples labels with
/// Philox, curvlinops with torch's generator, so their MC estimates cannot agree
/// number for number; both converge to the type-2 Fisher. The generator ran
/// curvlinops' MC with the same number of samples on this case with six seeds and
/// recorded its largest relative error against the type-2 products
/// (`mc_convergence`); ekfac's MC must land within twice that. A wrong sampler (say,
/// uniform labels, or the true labels: the empirical Fisher) misses by far more.
#[test]
fn monte_carlo_fisher_lands_as_near_type2_as_curvlinops_does() {
    let Some(ctx) = common::gpu() else { return };
    let mut case = common::fixture_in(FIXTURES, "tf_hand_ce_mean_type2_expand_sep");
    let mc = case.expected["mc_convergence"].clone();
    case.options.fisher = FisherType::Mc;
    case.options.mc_samples = mc["mc_samples"].as_u64().unwrap() as usize;
    let fitted = fit(
        &ctx,
        &case.model,
        &case.data,
        &case.options,
        Some(case.damping),
    )
    .unwrap();
    let operator = Operator::new(&ctx, &fitted.state).unwrap();
    for (key, approx) in [
        ("kfac_mv", Approximation::Kfac),
        ("ekfac_mv", Approximation::Ekfac),
    ] {
        let want = case.products.get(key).unwrap().to_f64().unwrap();
        let got = operator
            .apply(&case.vectors, case.columns, approx, Transform::Forward)
            .unwrap();
        let err = common::rel_err(&got, &want);
        let bound = 2.0 * mc[format!("{key}_max_error")].as_f64().unwrap();
        eprintln!("MC {key}: relative error to type-2 {err:.3e} (bound {bound:.3e})");
        assert!(
            err <= bound,
            "MC {key}: relative error {err:.3e} > {bound:.3e}"
        );
    }
}
