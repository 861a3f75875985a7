//! The main job (`cargo run --release` without arguments): KFAC and EKFAC of a small
//! classifier on scikit-learn's 8×8 digits (`assets/digits/`, compiled in), compared
//! with a committed curvlinops 3.0.1 float64 reference for the same model and data.

use std::fmt::Write;
use std::time::Instant;

use crate::curvature::eigen::JacobiSolver;
use crate::curvature::fit::{FitRun, fit_run};
use crate::curvature::operator::{Approximation, Operator, Transform};
use crate::curvature::options::DampingMode;
use crate::curvature::options::{FisherType, LossKind, Options, Reduction};
use crate::curvature::summary::{ScalarsJson, Summary};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::graph::Model;
use crate::model::TensorFile;
use crate::model::data::{Dataset, Targets};
use crate::progress::Progress;

const MODEL: &str = include_str!("../assets/digits/model.json");
const WEIGHTS: &[u8] = include_bytes!("../assets/digits/weights.safetensors");
const DATA: &[u8] = include_bytes!("../assets/digits/data.safetensors");
const REFERENCE: &str = include_str!("../assets/digits/reference.json");
const REFERENCE_PRODUCTS: &[u8] = include_bytes!("../assets/digits/reference.safetensors");

/// The options of the reference: type-2 Fisher, cross-entropy with mean reduction, all
/// parameters, separate weight and bias, batches of 128.
pub fn digits_options() -> Options {
    Options {
        loss: LossKind::CrossEntropy,
        reduction: Reduction::Mean,
        fisher: FisherType::Type2,
        batch_size: 128,
        ..Options::default()
    }
}

/// The bundled digits model and data.
pub fn digits_problem() -> Result<(Model, Dataset)> {
    let spec = crate::graph::json::from_json_str(MODEL, "assets/digits/model.json")?;
    let weights = TensorFile::from_bytes(WEIGHTS.to_vec(), "assets/digits/weights.safetensors")?;
    let model = Model::from_tensor_file(spec, &weights)?;
    let data = Dataset::from_tensor_file(&TensorFile::from_bytes(
        DATA.to_vec(),
        "assets/digits/data.safetensors",
    )?)?;
    Ok((model, data))
}

/// Examples `start .. start + len` of the digits `data` (class labels) as a data set of
/// their own: the examples' training and test splits.
pub fn digits_subset(data: &Dataset, start: usize, len: usize) -> Result<Dataset> {
    let e = data.example_len();
    let Targets::Classes(y) = &data.y else {
        return Err(Error::Options("the digits have class labels".into()));
    };
    Dataset::new(
        data.x[start * e..(start + len) * e].to_vec(),
        data.example_shape.clone(),
        Targets::Classes(y[start..start + len].to_vec()),
    )
}

/// The class labels `[N]` of the digits `data` (empty for value targets).
pub fn digits_labels(data: &Dataset) -> &[i64] {
    match &data.y {
        Targets::Classes(y) => y,
        Targets::Values { .. } => &[],
    }
}

fn relative(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
}

fn relative_frobenius(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// Runs the main job and returns its report, reporting the fit's progress to
/// `progress`; with `spectrum`, also draws the layers' eigenvalue spectra there
/// ([`crate::plot::spectrum`], PNG or SVG by the name) and says so in the report.
pub fn run_digits(spectrum: Option<&std::path::Path>, progress: &dyn Progress) -> Result<String> {
    let start = Instant::now();
    let (model, data) = digits_problem()?;
    let reference: serde_json::Value = serde_json::from_str(REFERENCE)
        .map_err(|e| Error::input("assets/digits/reference.json", e.to_string()))?;
    let damping = reference["damping"].as_f64().unwrap_or(1e-3);
    let ctx = GpuContext::new()?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let options = digits_options();
    let run = FitRun {
        damping: Some(damping),
        previous: None,
        solver: &JacobiSolver::default(),
        progress,
    };
    let mut fitted = fit_run(&ctx, &model, &data, &options, &run)?;
    fitted.timings.load = load_ms;
    let mut summary = Summary::new(
        &fitted.state,
        damping,
        fitted.timings,
        fitted.peak_gpu_bytes,
    );
    summary.eigensolver = Some(run.solver.name().to_string());

    let mut report = String::from(
        "Main job: KFAC and EKFAC (type-2 Fisher, cross-entropy, mean) of Linear(64,32)-tanh-\
         Linear(32,10) on 1024 scikit-learn digits\n\n",
    );
    report += &summary.render();
    report += "\nAgainst curvlinops 3.0.1 (float64) on the same model and data:\n";
    let compare = |report: &mut String,
                   name: &str,
                   ours: &ScalarsJson,
                   theirs: &serde_json::Value| {
        for (key, value) in [
            ("trace", ours.trace),
            ("frobenius_norm", ours.frobenius_norm),
            ("logdet_damped", ours.logdet_damped),
        ] {
            if let (Some(v), Some(r)) = (value, theirs[key].as_f64()) {
                let _ = writeln!(
                    report,
                    "  {name:<6} {key:<15} ours {v:>16.9e}  curvlinops {r:>16.9e}  relative error {:.2e}",
                    relative(v, r)
                );
            }
        }
        let _ = writeln!(
            report,
            "  {name:<6} zero eigenvalues ours {} curvlinops {}",
            ours.zero_eigenvalues, theirs["zero_eigenvalues"]
        );
    };
    compare(&mut report, "KFAC", &summary.kfac, &reference["kfac"]);
    if let Some(e) = &summary.ekfac {
        compare(&mut report, "EKFAC", e, &reference["ekfac"]);
    }

    let products = TensorFile::from_bytes(
        REFERENCE_PRODUCTS.to_vec(),
        "assets/digits/reference.safetensors",
    )?;
    let vectors = products.require("vectors", "test vectors")?;
    let columns = vectors.shape[1];
    let v = vectors.to_f32()?;
    let operator = Operator::new(&ctx, &fitted.state)?;
    for (key, approx, transform) in [
        ("kfac_mv", Approximation::Kfac, Transform::Forward),
        ("ekfac_mv", Approximation::Ekfac, Transform::Forward),
        (
            "ekfac_inv_mv",
            Approximation::Ekfac,
            Transform::Inverse {
                damping,
                mode: DampingMode::Exact,
            },
        ),
    ] {
        let want = products.require(key, "reference product")?.to_f64()?;
        let got = operator.apply(&v, columns, approx, transform)?;
        let _ = writeln!(
            report,
            "  product {key:<13} relative Frobenius error {:.2e}",
            relative_frobenius(&got, &want)
        );
    }
    if let Some(path) = spectrum {
        let picture = crate::plot::spectrum(&fitted.state, damping);
        crate::io::write_atomic(path, &picture.encode(crate::plot::Format::of(path), path)?)?;
        let _ = writeln!(
            report,
            "\nwrote the eigenvalue spectra of every layer (KFAC, EKFAC, damping) to {} \
             ({} × {} pixels)",
            path.display(),
            picture.width,
            picture.height
        );
    }
    Ok(report)
}
