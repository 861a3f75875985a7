//! The f64 CPU reference of KFAC/EKFAC against SPEC's worked examples (E1–E7), its §8
//! golden numbers (curvlinops 3.0.1 in float64, 12 digits), and the properties of §7.
//!
//! Tolerances: the golden numbers are printed to 10–13 significant digits and the
//! reference is f64 throughout, so they are compared to 1e-9 relative (1e-8 for the
//! inverse traces, whose printed values have 10 digits). Worked examples have exact
//! rational answers: 1e-12. Properties that hold in exact arithmetic (batch-size
//! invariance, one datum ⇒ EKFAC = GGN, trace identities) are checked to 1e-10 relative:
//! the only error is f64 round-off in sums of a few hundred terms and in faer's
//! eigensolver (≈1e-14 relative on these well-scaled problems), with margin.

mod common;

use std::collections::HashMap;

use common::golden_cnn::{self, linspace};

use ekfac::curvature::layout::{BlockKind, ParamLayout};
use ekfac::curvature::{DampingMode, FisherType, KfacApprox, LossKind, Options, Reduction};
use ekfac::graph::chain::{Conv2dSpec, Layer, LinearSpec};
use ekfac::graph::{Model, ModelSpec};
use ekfac::loss::{self, SampledTargets, Targets};
use ekfac::reference::curvature::{
    Approximation, CpuCurvature, Dataset, LayerWeights, Network64, exact_block_diagonal,
};

/// A model from f64 weights (`name → (shape, values)`): the `Model` holds their f32
/// roundings, the returned layer weights the exact f64 values.
fn build(
    input_shape: Vec<usize>,
    layers: Vec<Layer>,
    weights: &[(&str, Vec<usize>, Vec<f64>)],
) -> (Model, Vec<Option<LayerWeights>>) {
    let spec = ModelSpec {
        input_shape,
        layers,
    };
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = weights
        .iter()
        .map(|(k, s, v)| {
            (
                k.to_string(),
                (s.clone(), v.iter().map(|&x| x as f32).collect()),
            )
        })
        .collect();
    let model = Model::new(spec.clone(), tensors).expect("valid test model");
    let find = |key: String| {
        weights
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| v.clone())
    };
    let w64 = spec
        .layers
        .iter()
        .map(|l| {
            l.name().map(|n| {
                (
                    find(format!("{n}.weight")).expect("weight given"),
                    find(format!("{n}.bias")),
                )
            })
        })
        .collect();
    (model, w64)
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-300)
}

fn assert_rel(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        rel(got, want) <= tol,
        "{what}: got {got:.15e}, want {want:.15e} (rel {:.2e} > {tol:.0e})",
        rel(got, want)
    );
}

fn rel_frob(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn opts(loss: LossKind, reduction: Reduction, fisher: FisherType, sep: bool) -> Options {
    Options {
        loss,
        reduction,
        fisher,
        joint_bias: !sep,
        ..Options::default()
    }
}

fn identity(p: usize) -> Vec<f64> {
    let mut e = vec![0.0; p * p];
    for i in 0..p {
        e[i * p + i] = 1.0;
    }
    e
}

fn trace(m: &[f64], p: usize) -> f64 {
    (0..p).map(|i| m[i * p + i]).sum()
}

// ---------------------------------------------------------------------------------
// SPEC §8 problems.

/// MLP: Linear(3,2) → tanh → Linear(2,3).
fn golden_mlp() -> (Model, Vec<Option<LayerWeights>>) {
    build(
        vec![3],
        vec![
            Layer::Linear(LinearSpec::new("0", 3, 2)),
            Layer::Tanh,
            Layer::Linear(LinearSpec::new("2", 2, 3)),
        ],
        &[
            ("0.weight", vec![2, 3], vec![0.1, -0.2, 0.3, 0.4, 0.5, -0.6]),
            ("0.bias", vec![2], vec![0.05, -0.05]),
            ("2.weight", vec![3, 2], vec![0.7, -0.8, 0.9, 1.0, -1.1, 1.2]),
            ("2.bias", vec![3], vec![0.1, 0.2, -0.3]),
        ],
    )
}

const MLP_X: [f64; 9] = [1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 0.3, -0.7, 1.1];
const MLP_CE: [usize; 3] = [0, 2, 1];
const MLP_MSE: [f64; 9] = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0];
const MLP_BCE: [f64; 9] = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0];

fn mlp_targets(loss: LossKind) -> Targets<'static> {
    match loss {
        LossKind::CrossEntropy => Targets::Classes(&MLP_CE),
        LossKind::Mse => Targets::Dense(&MLP_MSE),
        LossKind::BceWithLogits => Targets::Dense(&MLP_BCE),
    }
}

fn mlp_data(loss: LossKind) -> Dataset<'static> {
    Dataset {
        x: &MLP_X,
        targets: mlp_targets(loss),
        num_data: 3,
    }
}

/// Fits the golden MLP with the batches of §8 (`X1` of 2 examples, `X2` of 1).
fn fit_mlp(o: &Options, ekfac: bool) -> CpuCurvature {
    let (model, w) = golden_mlp();
    let net = Network64::with_weights(&model, w).unwrap();
    let o = Options {
        batch_size: 2,
        ..o.clone()
    };
    CpuCurvature::fit(&net, &mlp_data(o.loss), &o, ekfac).unwrap()
}

/// loss, reduction, fisher, separate bias, KFAC [trace, ‖·‖_F], EKFAC [trace, ‖·‖_F].
type MlpRow = (
    LossKind,
    Reduction,
    FisherType,
    bool,
    [f64; 2],
    Option<[f64; 2]>,
);

#[test]
fn golden_mlp_traces_and_frobenius_norms() {
    use FisherType::*;
    use LossKind::*;
    use Reduction::*;
    #[rustfmt::skip]
    let rows: [MlpRow; 8] = [
        (CrossEntropy, Mean, Type2, true, [5.964539331570, 3.016076256214], Some([5.266496514305, 2.570277847664])),
        (CrossEntropy, Mean, Type2, false, [5.964539331570, 3.290274766924], Some([5.266496514305, 2.795812331335])),
        (CrossEntropy, Mean, Empirical, true, [8.732407965847, 4.856921036096], Some([5.335643726308, 1.932171708015])),
        (CrossEntropy, Mean, ForwardOnly, false, [17.71700133402, 7.951818245202], None),
        (Mse, Mean, Type2, false, [18.52600384424, 9.543989964530], Some([17.53297375801, 8.789091317308])),
        (Mse, Mean, Empirical, true, [44.33153048090, 28.43488227255], Some([34.76190458497, 18.14968379264])),
        (BceWithLogits, Sum, Type2, true, [18.06661244287, 8.369922731602], Some([16.09680004417, 6.939198748860])),
        (BceWithLogits, Sum, Empirical, false, [35.34112260115, 21.75212034116], Some([25.13047701979, 11.05408849115])),
    ];
    for (loss, red, fisher, sep, kfac, ekfac) in rows {
        let what = format!("{loss} {red} {fisher} sep={sep}");
        let fit = fit_mlp(&opts(loss, red, fisher, sep), ekfac.is_some());
        let (_, k) = fit.scalars(Approximation::Kfac, 0.0).unwrap();
        assert_rel(k.trace, kfac[0], 1e-9, &format!("{what} KFAC trace"));
        assert_rel(
            k.frobenius_norm,
            kfac[1],
            1e-9,
            &format!("{what} KFAC Frobenius"),
        );
        // The same from the dense matrix, independently of the eigenvalues.
        let p = fit.layout.num_params;
        let dense = fit.dense(Approximation::Kfac).unwrap();
        assert_rel(
            trace(&dense, p),
            kfac[0],
            1e-9,
            &format!("{what} dense KFAC trace"),
        );
        let frob = dense.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert_rel(frob, kfac[1], 1e-9, &format!("{what} dense KFAC Frobenius"));
        if let Some(e) = ekfac {
            let (_, s) = fit.scalars(Approximation::Ekfac, 0.0).unwrap();
            assert_rel(s.trace, e[0], 1e-9, &format!("{what} EKFAC trace"));
            assert_rel(
                s.frobenius_norm,
                e[1],
                1e-9,
                &format!("{what} EKFAC Frobenius"),
            );
            let dense = fit.dense(Approximation::Ekfac).unwrap();
            assert_rel(
                trace(&dense, p),
                e[0],
                1e-9,
                &format!("{what} dense EKFAC trace"),
            );
            let frob = dense.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert_rel(frob, e[1], 1e-9, &format!("{what} dense EKFAC Frobenius"));
        }
    }
}

/// §8 inverse traces (MLP+CE(mean), type-2, δ = 1e-2), 3.0.1's heuristic rule.
#[test]
fn golden_mlp_inverse_traces() {
    #[rustfmt::skip]
    let rows = [
        (true, [3056.684047, 198.8523221, 484.5370323, 483.3661593]),
        (false, [6017.383460, 272.6885165, 729.4165897, 728.7239306]),
    ];
    for (sep, want) in rows {
        let fit = fit_mlp(
            &opts(
                LossKind::CrossEntropy,
                Reduction::Mean,
                FisherType::Type2,
                sep,
            ),
            true,
        );
        let p = fit.layout.num_params;
        let eye = identity(p);
        let cases = [
            (Approximation::Kfac, DampingMode::Plain),
            (Approximation::Kfac, DampingMode::Heuristic),
            (Approximation::Kfac, DampingMode::Exact),
            (Approximation::Ekfac, DampingMode::Exact),
        ];
        for ((which, mode), want) in cases.into_iter().zip(want) {
            let inv = fit.inverse_matmat(which, &eye, p, 1e-2, mode).unwrap();
            assert_rel(
                trace(&inv, p),
                want,
                1e-8,
                &format!("sep={sep} {which:?} {mode} inverse trace"),
            );
        }
    }
}

/// SPEC §8's CNN ([`golden_cnn`]) with f64 weights.
fn golden_cnn_model() -> (Model, Vec<Option<LayerWeights>>) {
    build(
        golden_cnn::input_shape(),
        golden_cnn::layers(),
        &golden_cnn::weights(),
    )
}

#[test]
fn golden_cnn_traces_and_frobenius_norms() {
    let (x, y) = golden_cnn::data();
    let data = Dataset {
        x: &x,
        targets: Targets::Dense(&y),
        num_data: 3,
    };
    let (model, w) = golden_cnn_model();
    let net = Network64::with_weights(&model, w).unwrap();
    for (approx, fisher, sep, kfac, ekfac) in golden_cnn::ROWS {
        let what = format!("CNN {approx} {fisher} sep={sep}");
        let o = Options {
            approx,
            batch_size: 1,
            ..opts(LossKind::Mse, Reduction::Sum, fisher, sep)
        };
        let fit = CpuCurvature::fit(&net, &data, &o, ekfac.is_some()).unwrap();
        let (_, k) = fit.scalars(Approximation::Kfac, 0.0).unwrap();
        assert_rel(k.trace, kfac[0], 1e-9, &format!("{what} KFAC trace"));
        assert_rel(
            k.frobenius_norm,
            kfac[1],
            1e-9,
            &format!("{what} KFAC Frobenius"),
        );
        if let Some((t, f)) = ekfac {
            let (_, e) = fit.scalars(Approximation::Ekfac, 0.0).unwrap();
            assert_rel(e.trace, t, 1e-9, &format!("{what} EKFAC trace"));
            if let Some(f) = f {
                assert_rel(
                    e.frobenius_norm,
                    f,
                    1e-9,
                    &format!("{what} EKFAC Frobenius"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Worked examples of SPEC §2–§3.

fn assert_mat(got: &faer::Mat<f64>, want: &[&[f64]], tol: f64, what: &str) {
    assert_eq!(got.nrows(), want.len(), "{what}: rows");
    for (i, row) in want.iter().enumerate() {
        assert_eq!(got.ncols(), row.len(), "{what}: columns");
        for (j, &w) in row.iter().enumerate() {
            assert!(
                (got[(i, j)] - w).abs() <= tol * w.abs().max(1.0),
                "{what}[{i},{j}]: got {}, want {w}",
                got[(i, j)]
            );
        }
    }
}

/// E1: Linear(2→2), MSE mean, type-2, joint block: G = I, A = ½[[1,0,1],[0,4,2],[1,2,2]]
/// and the dense operator of the SPEC.
#[test]
fn e1_joint_linear_mse() {
    let (model, w) = build(
        vec![2],
        vec![Layer::Linear(LinearSpec::new("0", 2, 2))],
        &[
            ("0.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("0.bias", vec![2], vec![0.5, -0.5]),
        ],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    let x = [1.0, 0.0, 0.0, 2.0];
    let y = [0.3, -0.1, 2.0, 1.0];
    let data = Dataset {
        x: &x,
        targets: Targets::Dense(&y),
        num_data: 2,
    };
    let o = opts(LossKind::Mse, Reduction::Mean, FisherType::Type2, false);
    let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
    assert_eq!(fit.layout.blocks.len(), 1);
    assert_eq!(fit.layout.blocks[0].kind, BlockKind::Joint);
    assert_mat(&fit.blocks[0].g, &[&[1.0, 0.0], &[0.0, 1.0]], 1e-12, "G");
    let a = fit.blocks[0].a.as_ref().unwrap();
    assert_mat(
        a,
        &[&[0.5, 0.0, 0.5], &[0.0, 2.0, 1.0], &[0.5, 1.0, 1.0]],
        1e-12,
        "A",
    );
    #[rustfmt::skip]
    let want = [
        0.5, 0.0, 0.0, 0.0, 0.5, 0.0,
        0.0, 2.0, 0.0, 0.0, 1.0, 0.0,
        0.0, 0.0, 0.5, 0.0, 0.0, 0.5,
        0.0, 0.0, 0.0, 2.0, 0.0, 1.0,
        0.5, 1.0, 0.0, 0.0, 1.0, 0.0,
        0.0, 0.0, 0.5, 1.0, 0.0, 1.0,
    ];
    let dense = fit.dense(Approximation::Kfac).unwrap();
    assert!(rel_frob(&dense, &want) < 1e-12, "{dense:?}");
    // KFAC is exact for a linear model with MSE (SPEC §7.6 item 2), so is EKFAC.
    let ggn = exact_block_diagonal(&net, &data, &o).unwrap();
    assert!(rel_frob(&ggn, &want) < 1e-12);
    let ekfac = fit.dense(Approximation::Ekfac).unwrap();
    assert!(rel_frob(&ekfac, &want) < 1e-12);
}

/// E2: the √C rule: G = 4ffᵀ (sum) and 4ffᵀ/3 (mean) for the empirical Fisher.
#[test]
fn e2_sqrt_c_rule() {
    let (model, w) = build(
        vec![1],
        vec![Layer::Linear(LinearSpec {
            bias: false,
            ..LinearSpec::new("0", 1, 3)
        })],
        &[("0.weight", vec![3, 1], vec![1.0, 2.0, 3.0])],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    let y = [0.0; 3];
    let data = Dataset {
        x: &[1.0],
        targets: Targets::Dense(&y),
        num_data: 1,
    };
    for (red, s) in [(Reduction::Sum, 4.0), (Reduction::Mean, 4.0 / 3.0)] {
        let o = opts(LossKind::Mse, red, FisherType::Empirical, true);
        let fit = CpuCurvature::fit(&net, &data, &o, false).unwrap();
        let f = [1.0, 2.0, 3.0];
        let want: Vec<Vec<f64>> = f
            .iter()
            .map(|a| f.iter().map(|b| s * a * b).collect())
            .collect();
        let rows: Vec<&[f64]> = want.iter().map(Vec::as_slice).collect();
        assert_mat(&fit.blocks[0].g, &rows, 1e-12, &format!("G {red}"));
    }
}

/// E3: Conv2d(2→1, k=2) with joint bias, one example `arange(1..12)`: A[0,0] = 2.5,
/// A[0,8] = 1.5, A[8,8] = 1, A[7,7] = 132.5.
#[test]
fn e3_conv_joint_input_covariance() {
    let (model, w) = build(
        vec![2, 2, 3],
        vec![
            Layer::Conv2d(Conv2dSpec::new("0", 2, 1, [2, 2])),
            Layer::Flatten,
        ],
        &[
            ("0.weight", vec![1, 2, 2, 2], linspace(-0.4, 0.3, 8)),
            ("0.bias", vec![1], vec![0.2]),
        ],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    let x: Vec<f64> = (1..=12).map(f64::from).collect();
    let data = Dataset {
        x: &x,
        targets: Targets::Dense(&[0.0, 1.0]),
        num_data: 1,
    };
    let o = opts(LossKind::Mse, Reduction::Sum, FisherType::Type2, false);
    let fit = CpuCurvature::fit(&net, &data, &o, false).unwrap();
    assert_eq!(fit.layout.layers[0].positions, 2);
    let a = fit.blocks[0].a.as_ref().unwrap();
    assert_eq!(a.nrows(), 9);
    for (i, j, want) in [(0, 0, 2.5), (0, 8, 1.5), (8, 8, 1.0), (7, 7, 132.5)] {
        assert!(
            (a[(i, j)] - want).abs() < 1e-12,
            "A[{i},{j}] = {}",
            a[(i, j)]
        );
    }
}

/// E4: Conv2d(4→2, k=1, groups=2, no bias) on channels [1,2,10,20]: the group-averaged
/// input is [5.5, 11], A = [[30.25, 60.5], [60.5, 121]].
#[test]
fn e4_conv_groups_average_channels() {
    let mut conv = Conv2dSpec::new("0", 4, 2, [1, 1]);
    conv.groups = 2;
    conv.bias = false;
    let (model, w) = build(
        vec![4, 1, 1],
        vec![Layer::Conv2d(conv), Layer::Flatten],
        &[("0.weight", vec![2, 2, 1, 1], vec![0.1, 0.2, 0.3, 0.4])],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    let data = Dataset {
        x: &[1.0, 2.0, 10.0, 20.0],
        targets: Targets::Dense(&[0.0, 0.0]),
        num_data: 1,
    };
    let o = opts(LossKind::Mse, Reduction::Sum, FisherType::Type2, true);
    let fit = CpuCurvature::fit(&net, &data, &o, false).unwrap();
    assert_mat(
        fit.blocks[0].a.as_ref().unwrap(),
        &[&[30.25, 60.5], &[60.5, 121.0]],
        1e-12,
        "A",
    );
}

/// E5: CE type-2, one datum with logits [0, ln 2, ln 3]: G = diag(p) − ppᵀ.
#[test]
fn e5_cross_entropy_type2() {
    let (model, w) = build(
        vec![1],
        vec![Layer::Linear(LinearSpec {
            bias: false,
            ..LinearSpec::new("0", 1, 3)
        })],
        &[("0.weight", vec![3, 1], vec![0.0, 2f64.ln(), 3f64.ln()])],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    for red in [Reduction::Sum, Reduction::Mean] {
        let data = Dataset {
            x: &[1.0],
            targets: Targets::Classes(&[1]),
            num_data: 1,
        };
        let o = opts(LossKind::CrossEntropy, red, FisherType::Type2, true);
        let fit = CpuCurvature::fit(&net, &data, &o, false).unwrap();
        assert_mat(
            &fit.blocks[0].g,
            &[
                &[5.0 / 36.0, -1.0 / 18.0, -1.0 / 12.0],
                &[-1.0 / 18.0, 2.0 / 9.0, -1.0 / 6.0],
                &[-1.0 / 12.0, -1.0 / 6.0, 0.25],
            ],
            1e-12,
            &format!("G {red}"),
        );
    }
}

/// E6/E7 through a 1×1 convolution, which is a linear layer shared over `S = 3`
/// positions: `Linear(2→1)` on `x = [[1,0],[0,1],[1,1]]`. A expand = (1/3)[[2,1],[1,2]],
/// A reduce = (4/9)·ones. With the output flattened to `C = 3` (our outputs are 2-D) and
/// MSE type-2, `g_s = √2·δ` per Hessian column, so G expand = 6 (sum) and 2 (mean,
/// `c_C = 1/3`), as in E7; E7's reduce values need `R = 3` loss terms per example, which
/// 2-D outputs do not have.
#[test]
fn e6_e7_weight_sharing() {
    let mut conv = Conv2dSpec::new("0", 2, 1, [1, 1]);
    conv.bias = false;
    let (model, w) = build(
        vec![2, 1, 3],
        vec![Layer::Conv2d(conv), Layer::Flatten],
        &[("0.weight", vec![1, 2, 1, 1], vec![0.3, -0.7])],
    );
    let net = Network64::with_weights(&model, w).unwrap();
    // NCHW: channel 0 over the 3 positions is [1, 0, 1], channel 1 is [0, 1, 1].
    let data = Dataset {
        x: &[1.0, 0.0, 1.0, 0.0, 1.0, 1.0],
        targets: Targets::Dense(&[0.0, 0.0, 0.0]),
        num_data: 1,
    };
    for (approx, a_want) in [
        (
            KfacApprox::Expand,
            [[2.0 / 3.0, 1.0 / 3.0], [1.0 / 3.0, 2.0 / 3.0]],
        ),
        (KfacApprox::Reduce, [[4.0 / 9.0; 2]; 2]),
    ] {
        for (red, g_want) in [(Reduction::Sum, 6.0), (Reduction::Mean, 2.0)] {
            let o = Options {
                approx,
                ..opts(LossKind::Mse, red, FisherType::Type2, true)
            };
            let fit = CpuCurvature::fit(&net, &data, &o, false).unwrap();
            assert_mat(
                fit.blocks[0].a.as_ref().unwrap(),
                &[&a_want[0], &a_want[1]],
                1e-12,
                &format!("A {approx}"),
            );
            if approx == KfacApprox::Expand {
                assert_mat(&fit.blocks[0].g, &[&[g_want]], 1e-12, &format!("G {red}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Properties (SPEC §7).

/// A random MLP with sigmoid/relu and `n` random examples.
fn random_mlp(seed: u64, n: usize) -> (Model, Vec<Option<LayerWeights>>, Vec<f64>) {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut vals = |k: usize| (0..k).map(|_| next()).collect::<Vec<f64>>();
    let w = [
        ("0.weight", vec![4, 3], vals(12)),
        ("0.bias", vec![4], vals(4)),
        ("2.weight", vec![3, 4], vals(12)),
        ("2.bias", vec![3], vals(3)),
    ];
    let x = vals(3 * n);
    let (model, w64) = build(
        vec![3],
        vec![
            Layer::Linear(LinearSpec::new("0", 3, 4)),
            Layer::Sigmoid,
            Layer::Linear(LinearSpec::new("2", 4, 3)),
        ],
        &w,
    );
    (model, w64, x)
}

const RANDOM_CE: [usize; 7] = [0, 2, 1, 1, 0, 2, 2];
const RANDOM_DENSE: [f64; 21] = [
    1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0,
    1.0, 1.0,
];

fn random_targets(loss: LossKind, n: usize) -> Targets<'static> {
    match loss {
        LossKind::CrossEntropy => Targets::Classes(&RANDOM_CE[..n]),
        _ => Targets::Dense(&RANDOM_DENSE[..3 * n]),
    }
}

const LOSSES: [LossKind; 3] = [
    LossKind::Mse,
    LossKind::CrossEntropy,
    LossKind::BceWithLogits,
];

#[test]
fn batch_size_invariance() {
    let (model, w, x) = random_mlp(1, 7);
    let net = Network64::with_weights(&model, w).unwrap();
    for loss in LOSSES {
        for (fisher, mc) in [
            (FisherType::Type2, 1),
            (FisherType::Mc, 3),
            (FisherType::Empirical, 1),
        ] {
            for red in [Reduction::Mean, Reduction::Sum] {
                let data = Dataset {
                    x: &x,
                    targets: random_targets(loss, 7),
                    num_data: 7,
                };
                let fit = |b: usize| {
                    let o = Options {
                        batch_size: b,
                        mc_samples: mc,
                        ..opts(loss, red, fisher, false)
                    };
                    CpuCurvature::fit(&net, &data, &o, true).unwrap()
                };
                let whole = fit(7);
                for b in [1, 3] {
                    let split = fit(b);
                    for which in [Approximation::Kfac, Approximation::Ekfac] {
                        let e =
                            rel_frob(&split.dense(which).unwrap(), &whole.dense(which).unwrap());
                        assert!(
                            e < 1e-10,
                            "{loss} {fisher} {red} batch {b} {which:?}: {e:e}"
                        );
                    }
                }
            }
        }
    }
}

/// One datum: KFAC and EKFAC equal the exact block diagonal of the GGN (type-2), the
/// MC Fisher with the same samples, and the empirical Fisher.
#[test]
fn one_datum_ekfac_equals_exact_block_diagonal() {
    let (model, w, x) = random_mlp(2, 1);
    let net = Network64::with_weights(&model, w).unwrap();
    for loss in LOSSES {
        for (fisher, mc) in [
            (FisherType::Type2, 1),
            (FisherType::Mc, 2),
            (FisherType::Empirical, 1),
        ] {
            for sep in [true, false] {
                let data = Dataset {
                    x: &x,
                    targets: random_targets(loss, 1),
                    num_data: 1,
                };
                let o = Options {
                    mc_samples: mc,
                    ..opts(loss, Reduction::Mean, fisher, sep)
                };
                let exact = exact_block_diagonal(&net, &data, &o).unwrap();
                let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
                let e = rel_frob(&fit.dense(Approximation::Ekfac).unwrap(), &exact);
                assert!(e < 1e-10, "{loss} {fisher} sep={sep}: EKFAC vs exact {e:e}");
                let k = rel_frob(&fit.dense(Approximation::Kfac).unwrap(), &exact);
                assert!(k < 1e-10, "{loss} {fisher} sep={sep}: KFAC vs exact {k:e}");
            }
        }
    }
}

/// EKFAC is the exact block diagonal in the Kronecker eigenbasis, so its trace equals
/// the exact one and it is at least as close to it as KFAC in Frobenius norm.
#[test]
fn ekfac_trace_and_closer_than_kfac() {
    let (model, w, x) = random_mlp(3, 7);
    let net = Network64::with_weights(&model, w).unwrap();
    for loss in LOSSES {
        for fisher in [FisherType::Type2, FisherType::Empirical] {
            for sep in [true, false] {
                let data = Dataset {
                    x: &x,
                    targets: random_targets(loss, 7),
                    num_data: 7,
                };
                let o = Options {
                    batch_size: 3,
                    ..opts(loss, Reduction::Sum, fisher, sep)
                };
                let exact = exact_block_diagonal(&net, &data, &o).unwrap();
                let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
                let p = fit.layout.num_params;
                let (_, s) = fit.scalars(Approximation::Ekfac, 0.0).unwrap();
                assert_rel(
                    s.trace,
                    trace(&exact, p),
                    1e-10,
                    &format!("{loss} {fisher} trace"),
                );
                let ek = rel_frob(&fit.dense(Approximation::Ekfac).unwrap(), &exact);
                let kf = rel_frob(&fit.dense(Approximation::Kfac).unwrap(), &exact);
                assert!(
                    ek < kf,
                    "{loss} {fisher} sep={sep}: EKFAC {ek:e} ≥ KFAC {kf:e}"
                );
            }
        }
    }
}

/// Trace identity with weight sharing (conv, groups = 1) in expand and reduce mode.
#[test]
fn conv_ekfac_trace_equals_ggn_trace() {
    let (x, y) = golden_cnn::data();
    let data = Dataset {
        x: &x,
        targets: Targets::Dense(&y),
        num_data: 3,
    };
    let (model, w) = golden_cnn_model();
    let net = Network64::with_weights(&model, w).unwrap();
    for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
        for red in [Reduction::Sum, Reduction::Mean] {
            let o = Options {
                approx,
                batch_size: 2,
                ..opts(LossKind::Mse, red, FisherType::Type2, false)
            };
            let exact = exact_block_diagonal(&net, &data, &o).unwrap();
            let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
            let (_, s) = fit.scalars(Approximation::Ekfac, 0.0).unwrap();
            let p = fit.layout.num_params;
            assert_rel(s.trace, trace(&exact, p), 1e-10, &format!("{approx} {red}"));
        }
    }
}

/// MC with one sample is the empirical Fisher of the sampled labels, exactly.
#[test]
fn mc_one_sample_is_empirical_with_sampled_labels() {
    let (model, w, x) = random_mlp(4, 7);
    let net = Network64::with_weights(&model, w).unwrap();
    // Logits of the whole data set for drawing the labels.
    let exact_logits = net.outputs(&x, 7);
    for loss in LOSSES {
        let o = Options {
            batch_size: 3,
            ..opts(loss, Reduction::Mean, FisherType::Mc, true)
        };
        let sampled = loss::sample_targets(loss, &exact_logits, 3, o.seed, 0, 0);
        let data = Dataset {
            x: &x,
            targets: random_targets(loss, 7),
            num_data: 7,
        };
        let mc = CpuCurvature::fit(&net, &data, &o, true).unwrap();
        let emp_data = Dataset {
            targets: sampled.as_targets(),
            ..data
        };
        let emp = CpuCurvature::fit(
            &net,
            &emp_data,
            &Options {
                fisher: FisherType::Empirical,
                ..o.clone()
            },
            true,
        )
        .unwrap();
        if let SampledTargets::Classes(c) = &sampled {
            assert!(c.iter().all(|&c| c < 3));
        }
        for which in [Approximation::Kfac, Approximation::Ekfac] {
            let e = rel_frob(&mc.dense(which).unwrap(), &emp.dense(which).unwrap());
            assert!(e < 1e-13, "{loss} {which:?}: {e:e}");
        }
    }
}

// ---------------------------------------------------------------------------------
// Layout, inverses and scalars.

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn layout_selection_and_model_order() {
    let (model, _) = golden_mlp();
    let spec = &model.graph;
    let all = ParamLayout::new(spec, None, false).unwrap();
    assert_eq!(
        all.param_names(),
        names(&["0.weight", "0.bias", "2.weight", "2.bias"])
    );
    assert_eq!(all.num_params, 17);
    assert_eq!(all.blocks.len(), 4);
    // Names in any order give model order.
    let shuffled = ParamLayout::new(
        spec,
        Some(&names(&["2.bias", "0.weight", "2.weight"])),
        true,
    )
    .unwrap();
    assert_eq!(
        shuffled.param_names(),
        names(&["0.weight", "2.weight", "2.bias"])
    );
    let kinds: Vec<BlockKind> = shuffled.blocks.iter().map(|b| b.kind).collect();
    assert_eq!(kinds, [BlockKind::Weight, BlockKind::Joint]);
    assert_eq!((shuffled.blocks[1].offset, shuffled.blocks[1].d_in), (6, 3));
    // Bias only: no input factor.
    let bias = ParamLayout::new(spec, Some(&names(&["0.bias"])), false).unwrap();
    assert!(!bias.layers[0].needs_input_factor(&bias));
    assert_eq!((bias.blocks[0].kind, bias.num_params), (BlockKind::Bias, 2));
    for (sel, fragment) in [
        (vec!["3.weight"], "unknown parameter \"3.weight\""),
        (vec!["1.weight"], "has no parameters"),
        (vec!["0.weight", "0.weight"], "selected twice"),
        (vec![], "empty"),
    ] {
        let err = ParamLayout::new(spec, Some(&names(&sel)), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains(fragment), "{sel:?}: {err}");
    }
    let (nobias, _) = build(
        vec![2],
        vec![Layer::Linear(LinearSpec {
            bias: false,
            ..LinearSpec::new("fc", 2, 2)
        })],
        &[("fc.weight", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])],
    );
    let err = ParamLayout::new(&nobias.graph, Some(&names(&["fc.bias"])), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no bias"), "{err}");
}

/// Gather/scatter: joint blocks map the model-order vector (weight rows, then bias) to
/// `[d_out, d_in + 1]` rows `[W_o | b_o]` and back.
#[test]
fn layout_gather_scatter_joint() {
    let (model, _) = golden_mlp();
    let layout = ParamLayout::new(&model.graph, None, true).unwrap();
    let p = layout.num_params;
    let k = 2;
    let x: Vec<f64> = (0..p * k).map(|i| i as f64).collect();
    // Layer 0: weight [2,3] at 0..6, bias at 6..8; block row o = [W[o,0..3], b[o]].
    let g = layout.gather(0, &x, k);
    let want_col0 = [0.0, 2.0, 4.0, 12.0, 6.0, 8.0, 10.0, 14.0];
    assert_eq!(&g[..8], &want_col0);
    assert_eq!(g[8], 1.0);
    let mut back = vec![f64::NAN; p * k];
    for b in 0..layout.blocks.len() {
        let v = layout.gather(b, &x, k);
        layout.scatter(b, &v, &mut back, k);
    }
    assert_eq!(back, x);
}

/// Damped inverses are inverses: (X + δI)·inverse(v) = v for EKFAC and exact KFAC;
/// plain and heuristic invert (G + δ_G I) ⊗ (A + δ_A I).
#[test]
fn inverses_invert() {
    let (model, w, x) = random_mlp(5, 7);
    let net = Network64::with_weights(&model, w).unwrap();
    let data = Dataset {
        x: &x,
        targets: random_targets(LossKind::CrossEntropy, 7),
        num_data: 7,
    };
    for sep in [true, false] {
        let o = Options {
            params: Some(names(&["0.weight", "2.weight", "2.bias"])),
            ..opts(
                LossKind::CrossEntropy,
                Reduction::Mean,
                FisherType::Type2,
                sep,
            )
        };
        let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
        let p = fit.layout.num_params;
        let v: Vec<f64> = (0..p * 2)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let delta = 1e-3;
        for which in [Approximation::Kfac, Approximation::Ekfac] {
            let inv = fit
                .inverse_matmat(which, &v, 2, delta, DampingMode::Exact)
                .unwrap();
            let back: Vec<f64> = fit
                .matmat(which, &inv, 2)
                .unwrap()
                .iter()
                .zip(&inv)
                .map(|(a, b)| a + delta * b)
                .collect();
            let e = rel_frob(&back, &v);
            assert!(e < 1e-9, "sep={sep} {which:?}: {e:e}");
        }
        // Plain: with δ_A = δ_G = δ the inverse of (G+δI)⊗(A+δI), checked through the
        // dense Kronecker matrix of the damped factors.
        let inv = fit
            .inverse_matmat(Approximation::Kfac, &v, 2, delta, DampingMode::Plain)
            .unwrap();
        let mut damped = fit.clone();
        for f in &mut damped.blocks {
            for i in 0..f.g.nrows() {
                f.g[(i, i)] += delta;
            }
            if let Some(a) = f.a.as_mut() {
                for i in 0..a.nrows() {
                    a[(i, i)] += delta;
                }
            }
        }
        let back = damped.matmat(Approximation::Kfac, &inv, 2).unwrap();
        assert!(rel_frob(&back, &v) < 1e-9, "plain sep={sep}");
        let err = fit
            .inverse_matmat(Approximation::Ekfac, &v, 2, delta, DampingMode::Plain)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only exact damping"), "{err}");
    }
}

/// log det, det and the damped log det against the dense matrices (faer Cholesky), and
/// the zero-eigenvalue rule on a singular CE problem.
#[test]
fn scalars_match_dense_matrices() {
    let (model, w, x) = random_mlp(6, 7);
    let net = Network64::with_weights(&model, w).unwrap();
    let data = Dataset {
        x: &x,
        targets: random_targets(LossKind::Mse, 7),
        num_data: 7,
    };
    let o = Options {
        params: Some(names(&["0.weight", "0.bias"])),
        ..opts(LossKind::Mse, Reduction::Sum, FisherType::Type2, false)
    };
    let fit = CpuCurvature::fit(&net, &data, &o, true).unwrap();
    let p = fit.layout.num_params;
    let logdet_dense = |m: &[f64], shift: f64| {
        let mat = faer::Mat::from_fn(p, p, |i, j| m[i * p + j] + if i == j { shift } else { 0.0 });
        let l = mat.llt(faer::Side::Lower).expect("positive definite");
        (0..p).map(|i| 2.0 * l.L()[(i, i)].ln()).sum::<f64>()
    };
    for which in [Approximation::Kfac, Approximation::Ekfac] {
        let dense = fit.dense(which).unwrap();
        let (_, s) = fit.scalars(which, 1e-2).unwrap();
        assert_eq!(s.zero_eigenvalues, 0, "{which:?}");
        assert_rel(
            s.logdet,
            logdet_dense(&dense, 0.0),
            1e-9,
            &format!("{which:?} logdet"),
        );
        assert_rel(
            s.det,
            logdet_dense(&dense, 0.0).exp(),
            1e-9,
            &format!("{which:?} det"),
        );
        assert_rel(
            s.logdet_damped,
            logdet_dense(&dense, 1e-2),
            1e-10,
            &format!("{which:?} damped logdet"),
        );
    }
    // CE: the last layer's G has the all-ones null vector, so logdet is −∞ and det 0.
    let fit = fit_mlp(
        &opts(
            LossKind::CrossEntropy,
            Reduction::Mean,
            FisherType::Type2,
            true,
        ),
        true,
    );
    let (blocks, total) = fit.scalars(Approximation::Kfac, 1e-2).unwrap();
    assert_eq!(total.logdet, f64::NEG_INFINITY);
    assert_eq!(total.det, 0.0);
    // Block 2 is the weight of Linear(2,3): one zero of G (3×3) kills 1·2 eigenvalues;
    // block 3 its bias: 1.
    assert_eq!(blocks[2].zero_eigenvalues, 2);
    assert_eq!(blocks[3].zero_eigenvalues, 1);
    assert!(total.logdet_damped.is_finite());
}

// ---------------------------------------------------------------------------------
// curvlinops 3.0.1 fixtures (tests/fixtures/curvature, float64 references).

/// Every fixture case through the CPU reference. Both sides are f64 on the same
/// f32-representable inputs, and the generator guarantees relative eigengaps ≥ 3e-3
/// between non-zero factor eigenvalues (or exact degeneracy where EKFAC is
/// basis-independent), so eigenvector perturbations are ≲ 1e-16/3e-3 ≈ 3e-14: products,
/// inverses and factors are compared to 1e-8 relative (Frobenius over the whole
/// output), scalars to 1e-9, zero-eigenvalue counts exactly. The large case (more than
/// 4096 parameters; its smallest relative eigengap is 4e-6, so perturbations stay
/// ≲ 3e-11) skips the exact KFAC inverse (this reference solves the dense
/// `(d_out·D)²` Kronecker block, 16128 rows there) and the inverse traces (P columns);
/// the GPU test checks both against curvlinops.
#[test]
fn curvlinops_fixtures() {
    curvlinops_fixtures_in("curvature", 30);
}

/// The graph models of issue 9 (`tests/fixtures/curvature_graph`: BatchNorm, residual
/// additions, LayerNorm, cat, upsample) under the same checks and tolerances: the
/// generator holds them to the same eigengap rules.
#[test]
fn curvlinops_graph_fixtures() {
    curvlinops_fixtures_in("curvature_graph", 14);
}

/// The transformers of issue 11 (`tests/fixtures/curvature_transformer`: token
/// embeddings, learned positions, attention by hand and by SDPA, masks, GELU MLPs,
/// mean pooling, a ViT) under the same checks and tolerances.
#[test]
fn curvlinops_transformer_fixtures() {
    curvlinops_fixtures_in("curvature_transformer", 11);
}

/// Every case of `tests/fixtures/<folder>` (at least `min_cases`) through the CPU
/// reference.
fn curvlinops_fixtures_in(folder: &str, min_cases: usize) {
    use ekfac::model::TensorFile;
    use ekfac::model::data::{Dataset as FileData, Targets as FileTargets};
    use serde_json::Value;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(folder);
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .expect("fixture directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= min_cases,
        "found only {} fixture cases in {folder}",
        cases.len()
    );
    let mut worst: Vec<(f64, String)> = Vec::new();
    for dir in cases {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let tensors = TensorFile::load(dir.join("expected.safetensors")).unwrap();
        let get = |k: &str| tensors.get(k).map(|t| t.to_f64().unwrap());
        let model = Model::load(dir.join("model.json"), dir.join("weights.safetensors")).unwrap();
        let file_data = FileData::load(dir.join("data.safetensors")).unwrap();
        // Token ids (issue 11) go to the reference as their f64 values.
        let x: Vec<f64> = match &file_data.ids {
            Some(ids) => ids.iter().map(|&id| f64::from(id)).collect(),
            None => file_data.x.iter().map(|&v| f64::from(v)).collect(),
        };
        let (classes, dense): (Vec<usize>, Vec<f64>) = match &file_data.y {
            FileTargets::Classes(c) => (c.iter().map(|&v| v as usize).collect(), Vec::new()),
            FileTargets::Values { data, .. } => {
                (Vec::new(), data.iter().map(|&v| f64::from(v)).collect())
            }
        };
        let targets = if dense.is_empty() {
            Targets::Classes(&classes)
        } else {
            Targets::Dense(&dense)
        };
        let data = Dataset {
            x: &x,
            targets,
            num_data: file_data.len,
        };
        let s = |k: &str| exp[k].as_str().unwrap().to_string();
        let o = Options {
            loss: s("loss").parse().unwrap(),
            reduction: s("reduction").parse().unwrap(),
            fisher: s("fisher").parse().unwrap(),
            approx: s("approx").parse().unwrap(),
            joint_bias: exp["joint_bias"].as_bool().unwrap(),
            params: Some(
                exp["params"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            ),
            batch_size: exp["batch_size"].as_u64().unwrap() as usize,
            ..Options::default()
        };
        let delta = exp["damping"].as_f64().unwrap();
        let has_ekfac = !exp["ekfac"].is_null();
        let net = Network64::new(&model);
        let fit = CpuCurvature::fit(&net, &data, &o, has_ekfac).unwrap();
        let p = fit.layout.num_params;
        assert_eq!(p as u64, exp["num_params"].as_u64().unwrap(), "{case}: P");
        let large = p > 4096;
        assert_eq!(
            fit.layout.param_names(),
            o.params.clone().unwrap(),
            "{case}: parameter order"
        );
        let mut check = |what: &str, got: &[f64], want: &[f64], tol: f64| {
            assert_eq!(got.len(), want.len(), "{case} {what}: length");
            let e = rel_frob(got, want);
            assert!(e <= tol, "{case} {what}: relative error {e:e} > {tol:e}");
            worst.push((e, format!("{case} {what}")));
        };
        let v = get("vectors").unwrap();
        let k = v.len() / p;
        check(
            "kfac_mv",
            &fit.matmat(Approximation::Kfac, &v, k).unwrap(),
            &get("kfac_mv").unwrap(),
            1e-8,
        );
        for (key, mode) in [
            ("kfac_inv_exact_mv", DampingMode::Exact),
            ("kfac_inv_plain_mv", DampingMode::Plain),
            ("kfac_inv_heuristic_mv", DampingMode::Heuristic),
        ] {
            if large && mode == DampingMode::Exact {
                continue;
            }
            let got = fit
                .inverse_matmat(Approximation::Kfac, &v, k, delta, mode)
                .unwrap();
            check(key, &got, &get(key).unwrap(), 1e-8);
        }
        let mut approximations = vec![("kfac", Approximation::Kfac)];
        if has_ekfac {
            approximations.push(("ekfac", Approximation::Ekfac));
            check(
                "ekfac_mv",
                &fit.matmat(Approximation::Ekfac, &v, k).unwrap(),
                &get("ekfac_mv").unwrap(),
                1e-8,
            );
            let got = fit
                .inverse_matmat(Approximation::Ekfac, &v, k, delta, DampingMode::Exact)
                .unwrap();
            check("ekfac_inv_mv", &got, &get("ekfac_inv_mv").unwrap(), 1e-8);
        }
        // Factors.
        for cl in &fit.layout.layers {
            let bi = cl.blocks[0];
            let f = &fit.blocks[bi];
            let rows = |m: &faer::Mat<f64>| -> Vec<f64> {
                (0..m.nrows())
                    .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
                    .collect()
            };
            check(
                &format!("factors.{}.G", cl.name),
                &rows(&f.g),
                &get(&format!("factors.{}.G", cl.name)).unwrap(),
                1e-10,
            );
            if let Some(a) = &f.a {
                check(
                    &format!("factors.{}.A", cl.name),
                    &rows(a),
                    &get(&format!("factors.{}.A", cl.name)).unwrap(),
                    1e-10,
                );
            } else {
                assert!(
                    get(&format!("factors.{}.A", cl.name)).is_none(),
                    "{case}: A of a bias-only layer"
                );
            }
        }
        // Dense matrices (P ≤ 64).
        for (name, which) in &approximations {
            if let Some(want) = get(&format!("{name}_dense")) {
                check(
                    &format!("{name}_dense"),
                    &fit.dense(*which).unwrap(),
                    &want,
                    1e-8,
                );
            }
        }
        if let Some(want) = get("ggn_dense") {
            check(
                "ggn_dense",
                &exact_block_diagonal(&net, &data, &o).unwrap(),
                &want,
                1e-10,
            );
        }
        // Scalars.
        for (name, which) in &approximations {
            let (_, sc) = fit.scalars(*which, delta).unwrap();
            let e = &exp[*name];
            for (key, got) in [
                ("trace", sc.trace),
                ("frobenius_norm", sc.frobenius_norm),
                ("logdet_damped", sc.logdet_damped),
            ] {
                let want = e[key].as_f64().unwrap();
                assert_rel(got, want, 1e-9, &format!("{case} {name} {key}"));
                worst.push((rel(got, want), format!("{case} {name} {key}")));
            }
            assert_eq!(
                sc.zero_eigenvalues as u64,
                e["zero_eigenvalues"].as_u64().unwrap(),
                "{case} {name} zero eigenvalues"
            );
            match e["logdet"].as_f64() {
                Some(want) => {
                    assert_rel(sc.logdet, want, 1e-9, &format!("{case} {name} logdet"));
                    assert_rel(
                        sc.det,
                        e["det"].as_f64().unwrap(),
                        1e-8,
                        &format!("{case} {name} det"),
                    );
                }
                None => {
                    assert_eq!(sc.logdet, f64::NEG_INFINITY, "{case} {name} logdet");
                    assert_eq!(sc.det, 0.0, "{case} {name} det");
                }
            }
            if large {
                continue;
            }
            let inv_traces = &exp["inverse_trace"];
            let eye = identity(p);
            let modes: &[(&str, DampingMode)] = match which {
                Approximation::Kfac => &[
                    ("kfac_exact", DampingMode::Exact),
                    ("kfac_plain", DampingMode::Plain),
                    ("kfac_heuristic", DampingMode::Heuristic),
                ],
                Approximation::Ekfac => &[("ekfac", DampingMode::Exact)],
            };
            for (key, mode) in modes {
                let inv = fit.inverse_matmat(*which, &eye, p, delta, *mode).unwrap();
                let want = inv_traces[*key].as_f64().unwrap();
                assert_rel(
                    trace(&inv, p),
                    want,
                    1e-9,
                    &format!("{case} inverse trace {key}"),
                );
            }
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!("largest relative errors against curvlinops ({folder}):");
    for (e, what) in worst.iter().take(5) {
        eprintln!("  {e:.2e}  {what}");
    }
}
