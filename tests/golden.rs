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

use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{FisherType, KfacApprox, LossKind, Options, Reduction};
use ekfac::curvature::summary::Summary;
use ekfac::model::data::{Dataset, Targets};
use ekfac::model::{Conv2dSpec, Layer, LinearSpec, Model, ModelSpec};

fn linspace(a: f64, b: f64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (a + (b - a) * i as f64 / (n - 1) as f64) as f32)
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

/// approx, fisher, separate bias, KFAC [trace, ‖·‖_F], EKFAC (trace, ‖·‖_F if compared).
type CnnRow = (
    KfacApprox,
    FisherType,
    bool,
    [f64; 2],
    Option<(f64, Option<f64>)>,
);

#[test]
fn spec_section_8_cnn_rows() {
    let Some(ctx) = common::gpu() else { return };
    let mut conv = Conv2dSpec::new("0", 2, 2, [2, 2]);
    conv.padding = [1, 1];
    let model = model(
        vec![2, 3, 3],
        vec![
            Layer::Conv2d(conv),
            Layer::Relu,
            Layer::Flatten,
            Layer::Linear(LinearSpec::new("3", 32, 2)),
        ],
        &[
            ("0.weight", vec![2, 2, 2, 2], linspace(-1.0, 1.0, 16)),
            ("0.bias", vec![2], vec![0.1, -0.1]),
            ("3.weight", vec![2, 32], linspace(-0.5, 0.5, 64)),
            ("3.bias", vec![2], vec![0.0, 0.3]),
        ],
    );
    let mut x = linspace(0.0, 1.0, 18);
    x.extend(linspace(1.0, -1.0, 36));
    let y = vec![1.0, -1.0, 0.5, 0.5, 0.0, 2.0];
    let data = Dataset::new(x, vec![2, 3, 3], Targets::Values { data: y, cols: 2 }).unwrap();
    use FisherType::*;
    use KfacApprox::*;
    // (approx, fisher, separate bias, KFAC [trace, ‖·‖_F], EKFAC [trace, ‖·‖_F or None]);
    // the reduce EKFAC Frobenius norm depends on the eigenbasis (SPEC §9.1).
    #[rustfmt::skip]
    let rows: [CnnRow; 5] = [
        (Expand, Type2, true, [382.8636581032, 172.1190080319], Some((779.5879884411, Some(273.5694546285)))),
        (Expand, Type2, false, [382.8636581032, 178.0065111650], Some((779.5879884411, Some(343.2108265559)))),
        (Reduce, Type2, true, [772.5843550338, 273.0698862742], Some((779.5879884411, None))),
        (Expand, Empirical, true, [24647.75915806, 12607.65350913], Some((77368.48639427, Some(35771.94746235)))),
        (Reduce, ForwardOnly, true, [60.39055684248, 28.60392229406], None),
    ];
    for (approx, fisher, separate, kfac, ekfac) in rows {
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
