//! SPEC's RNG-free golden numbers on the GPU: the §8 CNN rows (expand and reduce,
//! type-2, empirical, forward-only) and worked example E1. (The §8 MLP rows run on the
//! GPU through the `golden_mlp_*` fixtures in `tests/curvature_fixtures.rs`; all of
//! them also run on the f64 CPU reference in `tests/cpu_curvature.rs`.)
//!
//! Tolerance: 1e-5 relative. SPEC's numbers are float64 with float64 weights; here the
//! weights and inputs are rounded to f32 (relative perturbation ≤ 6e-8) and the
//! pipeline runs in f32, whose accumulated error on these sums of a few hundred terms
//! is ~1e-6.

mod common;

use std::collections::HashMap;

use common::golden_cnn;

use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{FisherType, KfacApprox, LossKind, Options, Reduction};
use ekfac::curvature::summary::Summary;
use ekfac::graph::chain::{Conv2dSpec, Layer, LinearSpec};
use ekfac::graph::{Model, ModelSpec};
use ekfac::model::data::{Dataset, Targets};

/// [`golden_cnn::linspace`] rounded to f32.
fn linspace(a: f64, b: f64, n: usize) -> Vec<f32> {
    golden_cnn::linspace(a, b, n)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

fn model(
    input_shape: Vec<usize>,
    layers: Vec<Layer>,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) -> Model {
    let spec = ModelSpec {
        input_shape,
        layers,
    };
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(k, s, v)| (k.to_string(), (s.clone(), v.clone())))
        .collect();
    Model::new(spec, tensors).unwrap()
}

fn close(got: Option<f64>, want: f64, what: &str) {
    let got = got.unwrap_or(f64::NAN);
    assert!(
        ((got - want) / want).abs() <= 1e-5,
        "{what}: got {got}, want {want}"
    );
}

/// SPEC §8's CNN rows ([`golden_cnn`]) with the f64 weights and inputs rounded to f32.
#[test]
fn spec_section_8_cnn_rows() {
    let Some(ctx) = common::gpu() else { return };
    let to32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&a| a as f32).collect() };
    let weights: Vec<_> = golden_cnn::weights()
        .into_iter()
        .map(|(k, s, v)| (k, s, to32(&v)))
        .collect();
    let model = model(golden_cnn::input_shape(), golden_cnn::layers(), &weights);
    let (x, y) = golden_cnn::data();
    let targets = Targets::Values {
        data: to32(&y),
        cols: 2,
    };
    let data = Dataset::new(to32(&x), golden_cnn::input_shape(), targets).unwrap();
    for (approx, fisher, separate, kfac, ekfac) in golden_cnn::ROWS {
        let options = Options {
            loss: LossKind::Mse,
            reduction: Reduction::Sum,
            fisher,
            approx,
            joint_bias: !separate,
            batch_size: 2,
            ..Options::default()
        };
        let what = format!("{approx:?} {fisher:?} separate={separate}");
        let fitted = fit(&ctx, &model, &data, &options, Some(1e-3)).unwrap();
        let s = Summary::new(&fitted.state, 1e-3, fitted.timings.clone(), 0);
        close(s.kfac.trace, kfac[0], &format!("{what} KFAC trace"));
        close(
            s.kfac.frobenius_norm,
            kfac[1],
            &format!("{what} KFAC ‖·‖_F"),
        );
        match (ekfac, &s.ekfac) {
            (Some((trace, norm)), Some(e)) => {
                close(e.trace, trace, &format!("{what} EKFAC trace"));
                if let Some(norm) = norm {
                    close(e.frobenius_norm, norm, &format!("{what} EKFAC ‖·‖_F"));
                }
            }
            (None, None) => {}
            _ => panic!("{what}: EKFAC presence differs"),
        }
    }
}

/// E1: `Linear(2→2)`, `W=[[1,2],[3,4]]`, `b=[.5,−.5]`, `X=[[1,0],[0,2]]`, MSE mean,
/// type-2, joint block: `G = I`, `A = ½[[1,0,1],[0,4,2],[1,2,2]]`, and the dense
/// operator in parameter order `(W00,W01,W10,W11,b0,b1)` is given; KFAC is exact here,
/// so EKFAC equals it too. Products with the identity columns give the dense matrix
/// (tolerance 1e-6 absolute on entries of size ≤ 2).
#[test]
fn spec_e1_dense_operator() {
    let Some(ctx) = common::gpu() else { return };
    let model = model(
        vec![2],
        vec![Layer::Linear(LinearSpec::new("0", 2, 2))],
        &[
            ("0.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("0.bias", vec![2], vec![0.5, -0.5]),
        ],
    );
    let data = Dataset::new(
        vec![1.0, 0.0, 0.0, 2.0],
        vec![2],
        Targets::Values {
            data: vec![0.0; 4],
            cols: 2,
        },
    )
    .unwrap();
    let options = Options {
        loss: LossKind::Mse,
        reduction: Reduction::Mean,
        fisher: FisherType::Type2,
        joint_bias: true,
        ..Options::default()
    };
    let fitted = fit(&ctx, &model, &data, &options, None).unwrap();
    #[rustfmt::skip]
    let want = [
        0.5, 0.0, 0.0, 0.0, 0.5, 0.0,
        0.0, 2.0, 0.0, 0.0, 1.0, 0.0,
        0.0, 0.0, 0.5, 0.0, 0.0, 0.5,
        0.0, 0.0, 0.0, 2.0, 0.0, 1.0,
        0.5, 1.0, 0.0, 0.0, 1.0, 0.0,
        0.0, 0.0, 0.5, 1.0, 0.0, 1.0,
    ];
    let mut identity = vec![0.0f32; 36];
    for i in 0..6 {
        identity[i * 6 + i] = 1.0;
    }
    let operator = Operator::new(&ctx, &fitted.state).unwrap();
    for approx in [Approximation::Kfac, Approximation::Ekfac] {
        let dense = operator
            .apply(&identity, 6, approx, Transform::Forward)
            .unwrap();
        for (i, (&g, &w)) in dense.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-6,
                "{approx:?} entry ({}, {}): got {g}, want {w}",
                i / 6,
                i % 6
            );
        }
    }
}

/// `Q diag(λ) Qᵀ` of an eigendecomposed factor, row-major.
fn reconstruct(e: &ekfac::curvature::state::FactorEigen) -> Vec<f64> {
    let n = e.dim();
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = (0..n)
                .map(|k| {
                    f64::from(e.vectors[i * n + k])
                        * f64::from(e.values[k])
                        * f64::from(e.vectors[j * n + k])
                })
                .sum();
        }
    }
    m
}

/// Entries of a reconstructed f32 factor against SPEC's exact values: 1e-5 relative to
/// the largest entry (f32 eigendecomposition and reconstruction of a small factor).
fn assert_factor(got: &[f64], want: &[f64], what: &str) {
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale,
            "{what}[{i}]: got {g}, want {w} (all: {got:?})"
        );
    }
}

fn options(loss: LossKind, reduction: Reduction, fisher: FisherType) -> Options {
    Options {
        loss,
        reduction,
        fisher,
        ..Options::default()
    }
}

/// E2, the √C rule: `Linear(1→3, no bias)`, `x = 1`, `f = [1, 2, 3]`, `y = 0`,
/// empirical MSE: `G = 4ffᵀ` (sum) and `4ffᵀ/3` (mean).
#[test]
fn spec_e2_sqrt_c_rule() {
    let Some(ctx) = common::gpu() else { return };
    let mut linear = LinearSpec::new("0", 1, 3);
    linear.bias = false;
    let model = model(
        vec![1],
        vec![Layer::Linear(linear)],
        &[("0.weight", vec![3, 1], vec![1.0, 2.0, 3.0])],
    );
    let data = Dataset::new(
        vec![1.0],
        vec![1],
        Targets::Values {
            data: vec![0.0; 3],
            cols: 3,
        },
    )
    .unwrap();
    let f = [1.0, 2.0, 3.0];
    for (reduction, scale) in [(Reduction::Sum, 4.0), (Reduction::Mean, 4.0 / 3.0)] {
        let opts = options(LossKind::Mse, reduction, FisherType::Empirical);
        let fitted = fit(&ctx, &model, &data, &opts, None).unwrap();
        let want: Vec<f64> = (0..9).map(|i| scale * f[i / 3] * f[i % 3]).collect();
        let g = reconstruct(&fitted.state.layers[0].gradient);
        assert_factor(&g, &want, &format!("E2 G ({reduction:?})"));
    }
}

/// E3: `Conv2d(2→1, k=2)` with bias, joint block, one example
/// `x = arange(1..=12).reshape(1, 2, 2, 3)`: patches `[1,2,4,5,7,8,10,11]` and
/// `[2,3,5,6,8,9,11,12]`, so `A[0,0] = 2.5`, `A[0,8] = 1.5`, `A[8,8] = 1`,
/// `A[7,7] = 132.5`; the whole `A = (p₀p₀ᵀ + p₁p₁ᵀ)/2` with `p = [patch; 1]`.
#[test]
fn spec_e3_conv_input_covariance() {
    let Some(ctx) = common::gpu() else { return };
    let model = model(
        vec![2, 2, 3],
        vec![
            Layer::Conv2d(Conv2dSpec::new("0", 2, 1, [2, 2])),
            Layer::Flatten,
        ],
        &[
            ("0.weight", vec![1, 2, 2, 2], linspace(-0.3, 0.4, 8)),
            ("0.bias", vec![1], vec![0.1]),
        ],
    );
    let data = Dataset::new(
        (1..=12).map(|v| v as f32).collect(),
        vec![2, 2, 3],
        Targets::Values {
            data: vec![0.0; 2],
            cols: 2,
        },
    )
    .unwrap();
    let mut opts = options(LossKind::Mse, Reduction::Sum, FisherType::Type2);
    opts.joint_bias = true;
    let fitted = fit(&ctx, &model, &data, &opts, None).unwrap();
    let p = [
        [1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 11.0, 1.0],
        [2.0, 3.0, 5.0, 6.0, 8.0, 9.0, 11.0, 12.0, 1.0],
    ];
    let want: Vec<f64> = (0..81)
        .map(|i| (p[0][i / 9] * p[0][i % 9] + p[1][i / 9] * p[1][i % 9]) / 2.0)
        .collect();
    assert_eq!(
        (want[0], want[8], want[80], want[7 * 9 + 7]),
        (2.5, 1.5, 1.0, 132.5)
    );
    let a = reconstruct(fitted.state.layers[0].input.as_ref().unwrap());
    assert_factor(&a, &want, "E3 A");
}

/// E4: `Conv2d(4→2, k=1, groups=2, bias=False)` on input channels `[1, 2, 10, 20]`:
/// the group-averaged input is `[5.5, 11]` and `A = [[30.25, 60.5], [60.5, 121]]`.
#[test]
fn spec_e4_group_averaged_input_covariance() {
    let Some(ctx) = common::gpu() else { return };
    let mut conv = Conv2dSpec::new("0", 4, 2, [1, 1]);
    conv.groups = 2;
    conv.bias = false;
    let model = model(
        vec![4, 1, 1],
        vec![Layer::Conv2d(conv), Layer::Flatten],
        &[("0.weight", vec![2, 2, 1, 1], vec![0.5, -0.25, 0.75, 1.0])],
    );
    let data = Dataset::new(
        vec![1.0, 2.0, 10.0, 20.0],
        vec![4, 1, 1],
        Targets::Values {
            data: vec![0.0; 2],
            cols: 2,
        },
    )
    .unwrap();
    let opts = options(LossKind::Mse, Reduction::Sum, FisherType::Type2);
    let fitted = fit(&ctx, &model, &data, &opts, None).unwrap();
    let a = reconstruct(fitted.state.layers[0].input.as_ref().unwrap());
    assert_factor(&a, &[30.25, 60.5, 60.5, 121.0], "E4 A");
}

/// E5: cross-entropy type-2 on one datum with logits `[0, ln 2, ln 3]`
/// (`p = [1/6, 1/3, 1/2]`): `G = diag(p) − ppᵀ`.
#[test]
fn spec_e5_cross_entropy_hessian() {
    let Some(ctx) = common::gpu() else { return };
    let mut linear = LinearSpec::new("0", 1, 3);
    linear.bias = false;
    let model = model(
        vec![1],
        vec![Layer::Linear(linear)],
        &[("0.weight", vec![3, 1], vec![0.0, 2f32.ln(), 3f32.ln()])],
    );
    let data = Dataset::new(vec![1.0], vec![1], Targets::Classes(vec![0])).unwrap();
    let opts = options(LossKind::CrossEntropy, Reduction::Mean, FisherType::Type2);
    let fitted = fit(&ctx, &model, &data, &opts, None).unwrap();
    #[rustfmt::skip]
    let want = [
        5.0 / 36.0, -1.0 / 18.0, -1.0 / 12.0,
        -1.0 / 18.0, 2.0 / 9.0, -1.0 / 6.0,
        -1.0 / 12.0, -1.0 / 6.0, 1.0 / 4.0,
    ];
    let g = reconstruct(&fitted.state.layers[0].gradient);
    assert_factor(&g, &want, "E5 G");
}

/// E6 and E7 (sum, expand) with the three sharing positions of a sequence expressed as
/// a 1×3 image under a 1×1 convolution (our linear layers take 2-D inputs):
/// positions `x = [[1,0],[0,1],[1,1]]` give `A = (1/3)[[2,1],[1,2]]` (expand) and
/// `(4/9)·ones` (reduce); MSE sum type-2 gives `G = Σ_c Σ_s g g = 3·2 = 6` (expand).
/// (E7's other entries need `R = 3` loss terms per example, which 2-D outputs cannot
/// express; the CPU reference checks them through its own loss.)
#[test]
fn spec_e6_e7_sharing_positions() {
    let Some(ctx) = common::gpu() else { return };
    let mut conv = Conv2dSpec::new("0", 2, 1, [1, 1]);
    conv.bias = false;
    let model = model(
        vec![2, 1, 3],
        vec![Layer::Conv2d(conv), Layer::Flatten],
        &[("0.weight", vec![1, 2, 1, 1], vec![0.3, -0.7])],
    );
    let data = Dataset::new(
        vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
        vec![2, 1, 3],
        Targets::Values {
            data: vec![0.0; 3],
            cols: 3,
        },
    )
    .unwrap();
    for (approx, want_a, want_g) in [
        (
            KfacApprox::Expand,
            [2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0],
            Some(6.0),
        ),
        (KfacApprox::Reduce, [4.0 / 9.0; 4], None),
    ] {
        let mut opts = options(LossKind::Mse, Reduction::Sum, FisherType::Type2);
        opts.approx = approx;
        let fitted = fit(&ctx, &model, &data, &opts, None).unwrap();
        let a = reconstruct(fitted.state.layers[0].input.as_ref().unwrap());
        assert_factor(&a, &want_a, &format!("E6 A ({approx:?})"));
        if let Some(g) = want_g {
            let got = reconstruct(&fitted.state.layers[0].gradient);
            assert_factor(&got, &[g], "E7 G (sum, expand)");
        }
    }
}
