//! Kronecker factors larger than one storage binding (issue 4: "matrices larger than one
//! buffer binding handled"). On a real adapter that is a factor of more than about 5790
//! rows (WebGPU's default 128 MiB binding); here a second device whose bindings hold
//! 16384 floats (`common::small_binding_gpu`) makes a 200 × 200 input factor (40000
//! floats) take three binding windows, at a size the software driver runs quickly. The
//! whole pipeline runs on it: the network (whose first weight, 19900 floats, takes two
//! windows), factor GEMMs, the windowed blocked Jacobi, the correction and the
//! operator's products (whose eigenvalue scaling is cut into pieces: the first layer's
//! block has 20000 entries).

mod common;

use ekfac::curvature::fit::{Fitted, fit};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{DampingMode, FisherType, Options};
use ekfac::curvature::summary::block_scalars;
use ekfac::gpu::GpuContext;
use ekfac::graph::{Model, ModelSpec};
use ekfac::loss::Targets as LossTargets;
use ekfac::model::{Dataset, Targets};
use ekfac::reference::curvature::{CpuCurvature, Dataset as CpuDataset, Network64};

use common::TestRng;

const DAMPING: f64 = 1e-3;
/// Columns of the test vectors.
const K: usize = 3;

/// `Linear(199, 100) Tanh Linear(100, 5)`, cross-entropy, with joint bias blocks: the
/// first layer's input factor is 200 × 200. 300 examples make it full rank (so EKFAC
/// does not depend on a choice inside a null space), in batches of 64 so that every
/// activation tensor fits one small binding.
fn case(rng: &mut TestRng) -> (Model, Dataset, Options) {
    let spec = ModelSpec::from_json_str(
        r#"{"input_shape": [199], "layers": [
        {"type": "linear", "name": "fc1", "in_features": 199, "out_features": 100},
        {"type": "tanh"},
        {"type": "linear", "name": "fc2", "in_features": 100, "out_features": 5}]}"#,
        "large factor model",
    )
    .unwrap();
    let model = common::random_model(spec, rng);
    let data = common::random_classification(rng, 300, &[199], 5);
    let options = Options {
        fisher: FisherType::Type2,
        joint_bias: true,
        batch_size: 64,
        ..Options::default()
    };
    (model, data, options)
}

fn fit_on(ctx: &GpuContext, model: &Model, data: &Dataset, options: &Options) -> Fitted {
    fit(ctx, model, data, options, Some(DAMPING)).unwrap()
}

/// The damping mode of each approximation's inverse: the CPU reference's exact KFAC
/// inverse is a dense solve of the whole Kronecker block (20000 × 20000 here, minutes
/// on the CPU), so KFAC is checked with the plain Kronecker-factored damping; EKFAC
/// only has the exact one.
fn inverse_mode(approx: Approximation) -> DampingMode {
    match approx {
        Approximation::Kfac => DampingMode::Plain,
        Approximation::Ekfac => DampingMode::Exact,
    }
}

/// Forward products and damped inverses of KFAC and EKFAC on `v` (`[P, K]`).
fn products(ctx: &GpuContext, fitted: &Fitted, v: &[f32]) -> Vec<Vec<f32>> {
    let operator = Operator::new(ctx, &fitted.state).unwrap();
    [Approximation::Kfac, Approximation::Ekfac]
        .into_iter()
        .flat_map(|a| {
            let inverse = Transform::Inverse {
                damping: DAMPING,
                mode: inverse_mode(a),
            };
            [(a, Transform::Forward), (a, inverse)]
        })
        .map(|(a, t)| operator.apply(v, K, a, t).unwrap())
        .collect()
}

/// Relative Frobenius tolerances between the windowed and the one-binding fit, for
/// KFAC, KFAC⁻¹, EKFAC and EKFAC⁻¹. The two devices run the same kernels on the same
/// f32 data except for the order in which cut GEMMs add up K, as in
/// `results_do_not_depend_on_the_batch_size`: 1e-5 for the products; the damped
/// inverses amplify the resulting eigenvalue differences by up to `λ_max / δ`, so they
/// get the reference tolerance, 1e-4.
const DEVICE_TOLERANCE: [f64; 4] = [1e-5, 1e-4, 1e-5, 1e-4];

/// The windowed fit against the f64 CPU reference (1e-4 relative Frobenius, the
/// product tolerance of issue 3 for f32 eigenvectors), and against the same fit on the
/// default device (one binding per tensor; `DEVICE_TOLERANCE`). Observed on lavapipe:
/// the inverses at most 2.3e-5 from the reference and 1.7e-5 between the devices, the
/// products 1.2e-6 and 6.2e-7.
#[test]
fn factors_larger_than_one_binding_match_the_reference() {
    let Some(small) = common::small_binding_gpu() else {
        return;
    };
    let mut rng = TestRng::new(29);
    let (model, data, options) = case(&mut rng);
    let windowed = fit_on(&small, &model, &data, &options);
    let v = rng.vec(windowed.state.layout.num_params * K);
    let a = windowed.state.layers[0].input.as_ref().unwrap();
    assert_eq!(a.values.len(), 200);
    assert!(
        (a.values.len() * a.values.len() * 4) as u64 > common::SMALL_BINDING,
        "the input factor must not fit one binding of the small device"
    );
    let got = products(&small, &windowed, &v);
    drop(small);

    let net = Network64::new(&model);
    let x: Vec<f64> = data.x.iter().map(|&x| f64::from(x)).collect();
    let Targets::Classes(y) = &data.y else {
        unreachable!("the case has class targets")
    };
    let classes: Vec<usize> = y.iter().map(|&c| c as usize).collect();
    let cpu_data = CpuDataset {
        x: &x,
        targets: LossTargets::Classes(&classes),
        num_data: data.len,
    };
    let reference = CpuCurvature::fit(&net, &cpu_data, &options, true).unwrap();
    let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    let mut want = Vec::new();
    for approx in [Approximation::Kfac, Approximation::Ekfac] {
        want.push(reference.matmat(approx, &v64, K).unwrap());
        want.push(
            reference
                .inverse_matmat(approx, &v64, K, DAMPING, inverse_mode(approx))
                .unwrap(),
        );
    }
    let names = ["KFAC", "KFAC⁻¹", "EKFAC", "EKFAC⁻¹"];
    let mut failures = Vec::new();
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        let e = common::rel_err(g, w);
        eprintln!("{name}: windowed vs CPU reference {e:.2e}");
        if e.is_nan() || e > 1e-4 {
            failures.push(format!("{name}: windowed vs CPU reference {e:.3e} > 1e-4"));
        }
    }

    let Some(ctx) = common::gpu() else { return };
    let whole = fit_on(&ctx, &model, &data, &options);
    let baseline = products(&ctx, &whole, &v);
    for (((name, g), b), tol) in names.iter().zip(&got).zip(&baseline).zip(DEVICE_TOLERANCE) {
        let b: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
        let e = common::rel_err(g, &b);
        eprintln!("{name}: windowed vs one binding {e:.2e}");
        if e > tol {
            failures.push(format!("{name}: windowed vs one binding {e:.3e} > {tol:e}"));
        }
    }
    let scalars = |f: &Fitted| block_scalars(&f.state, DAMPING);
    for (block, ((k1, e1), (k2, e2))) in scalars(&windowed)
        .into_iter()
        .zip(scalars(&whole))
        .enumerate()
    {
        let (e1, e2) = (e1.unwrap(), e2.unwrap());
        for (what, x, y) in [
            ("KFAC trace", k1.trace, k2.trace),
            ("KFAC logdet_damped", k1.logdet_damped, k2.logdet_damped),
            ("EKFAC trace", e1.trace, e2.trace),
            ("EKFAC frobenius_norm", e1.frobenius_norm, e2.frobenius_norm),
        ] {
            if ((x - y) / y).abs() > 1e-5 {
                failures.push(format!("block {block} {what}: windowed {x} vs {y}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
