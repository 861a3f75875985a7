//! The `ekfac` binary end to end: `fit` then `apply` on committed curvlinops fixtures
//! (tests/fixtures/curvature, see its README), and bad inputs, each of which must exit
//! non-zero with a message naming the problem and leave no output file.
//!
//! Tolerances are those of `tests/curvature_fixtures.rs` (issue 3), relative Frobenius
//! error over the whole `[P, 3]` output: KFAC products 1e-5, EKFAC products 1e-4, damped
//! inverse products 1e-3, trace and Frobenius norm 1e-5. The binary runs the same
//! pipeline as that test; the cases used here (`mlp_tanh_ce_mean_type2_sep`,
//! `mlp_relu_ce_mean_forwardonly_sep`) have curvlinops' own float32 error at least 10×
//! inside every tolerance (fixtures README, "Conditioning"), so no case-specific bound
//! is needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ekfac::model::TensorFile;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

const KFAC_TOL: f64 = 1e-5;
const EKFAC_TOL: f64 = 1e-4;
const INVERSE_TOL: f64 = 1e-3;
const SCALAR_TOL: f64 = 1e-5;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature")
        .join(case)
}

fn ekfac<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .args(args)
        .output()
        .expect("running the ekfac binary")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        stderr(out)
    );
}

/// Asserts a failed run: non-zero exit, `needle` in stderr, no file at any of `outputs`.
fn assert_fails(out: &Output, needle: &str, outputs: &[&Path]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected a failure mentioning {needle:?}, but the command succeeded"
    );
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    for p in outputs {
        assert!(!p.exists(), "{} was written despite the error", p.display());
    }
}

/// Writes a safetensors file of f64 tensors.
fn write_f64(path: &Path, tensors: &[(&str, Vec<usize>, &[f64])]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.to_string(),
                TensorView::new(Dtype::F64, shape.clone(), bytemuck::cast_slice(data)).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes a data file with `x` F32 and `y` I64 class indices.
fn write_data(path: &Path, x: &[f32], x_shape: Vec<usize>, y: &[i64]) {
    let views = vec![
        (
            "x".to_string(),
            TensorView::new(Dtype::F32, x_shape, bytemuck::cast_slice(x)).unwrap(),
        ),
        (
            "y".to_string(),
            TensorView::new(Dtype::I64, vec![y.len()], bytemuck::cast_slice(y)).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_out(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let file = TensorFile::load(path).unwrap();
    let t = file.require("out", "apply output").unwrap();
    (t.shape.to_vec(), t.to_f32().unwrap())
}

fn expected_json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

/// The `fit` arguments reproducing a fixture case (all parameters are selected in
/// the cases used here, so no `--params`).
fn fit_args(dir: &Path, expected: &Value) -> Vec<String> {
    let mut args: Vec<String> = [
        "fit",
        "--model",
        s(&dir.join("model.json")),
        "--weights",
        s(&dir.join("weights.safetensors")),
        "--data",
        s(&dir.join("data.safetensors")),
        "--loss",
        expected["loss"].as_str().unwrap(),
        "--reduction",
        expected["reduction"].as_str().unwrap(),
        "--fisher",
        expected["fisher"].as_str().unwrap(),
        "--approx",
        expected["approx"].as_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push("--batch-size".into());
    args.push(expected["batch_size"].to_string());
    if expected["joint_bias"].as_bool().unwrap() {
        args.push("--joint-bias".into());
    }
    args
}

fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    base.extend(extra.iter().map(|a| a.to_string()));
    base
}

/// Fits the fixture `case` by the command line into `tmp/state.safetensors`; its
/// directory, its `expected.json` and the state's path.
fn fit_state(case: &str, tmp: &Path) -> (PathBuf, Value, PathBuf) {
    let dir = fixture(case);
    let expected = expected_json(&dir);
    let state = tmp.join("state.safetensors");
    let out = ekfac(&with(fit_args(&dir, &expected), &["--out", s(&state)]));
    assert_success(&out, &format!("fit {case}"));
    (dir, expected, state)
}

/// `apply` on `state` and the vectors file `vectors`, writing `out`, with `extra` flags.
fn apply(state: &Path, vectors: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = [
        "apply",
        "--state",
        s(state),
        "--vectors",
        s(vectors),
        "--out",
        s(out),
    ];
    ekfac(&[&args[..], extra].concat())
}

/// `apply` on `state` with `extra` flags; the output against `want` within `tol`.
fn check_apply(
    tmp: &Path,
    state: &Path,
    vectors: &Path,
    extra: &[&str],
    want: &[f64],
    tol: f64,
    failures: &mut Vec<String>,
) {
    let out = tmp.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let result = apply(state, vectors, &out, extra);
    assert_success(&result, &format!("apply {extra:?}"));
    let (shape, got) = read_out(&out);
    assert_eq!(
        shape,
        vec![want.len() / 3, 3],
        "apply {extra:?}: output shape"
    );
    let e = common::rel_err(&got, want);
    if e.is_nan() || e > tol {
        failures.push(format!("apply {extra:?}: relative error {e:.3e} > {tol:e}"));
    }
}

#[test]
fn fit_and_apply_match_curvlinops() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let dir = fixture("mlp_tanh_ce_mean_type2_sep");
    let expected = expected_json(&dir);
    let damping = expected["damping"].as_f64().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.safetensors");
    let summary_path = tmp.path().join("s.json");
    let damping_arg = damping.to_string();
    let out = ekfac(&with(
        fit_args(&dir, &expected),
        &[
            "--damping",
            &damping_arg,
            "--summary",
            s(&summary_path),
            "--out",
            s(&state),
        ],
    ));
    assert_success(&out, "fit");
    assert!(state.exists());

    // Summary: every key of issue 3, values against curvlinops.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    for key in [
        "num_data",
        "num_params",
        "params",
        "kfac",
        "ekfac",
        "layers",
        "damping",
        "adapter",
        "timings_ms",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}: {summary}");
    }
    for which in ["kfac", "ekfac"] {
        for key in [
            "trace",
            "det",
            "logdet",
            "logdet_damped",
            "frobenius_norm",
            "zero_eigenvalues",
        ] {
            assert!(
                summary[which].get(key).is_some(),
                "summary.{which} lacks {key}"
            );
        }
        for key in ["trace", "frobenius_norm"] {
            let (got, want) = (
                summary[which][key].as_f64().unwrap(),
                expected[which][key].as_f64().unwrap(),
            );
            assert!(
                ((got - want) / want).abs() <= SCALAR_TOL,
                "summary.{which}.{key}: {got} vs curvlinops {want}"
            );
        }
        assert_eq!(
            summary[which]["zero_eigenvalues"], expected[which]["zero_eigenvalues"],
            "summary.{which}.zero_eigenvalues"
        );
    }
    for key in ["name", "backend", "driver", "device_type"] {
        assert!(
            summary["adapter"][key].is_string(),
            "summary.adapter.{key} missing"
        );
    }
    for key in [
        "load",
        "factors",
        "eigendecomposition",
        "correction",
        "scalars",
        "save",
    ] {
        assert!(
            summary["timings_ms"][key]
                .as_f64()
                .is_some_and(|t| t >= 0.0),
            "summary.timings_ms.{key} missing or negative"
        );
    }
    assert_eq!(summary["num_data"], expected["num_data"]);
    assert_eq!(summary["num_params"], expected["num_params"]);
    assert_eq!(summary["params"], expected["params"]);
    assert_eq!(summary["damping"].as_f64(), Some(damping));
    assert_eq!(
        summary["layers"].as_array().map(Vec::len),
        Some(2),
        "one summary entry per curvature layer"
    );

    // apply: every mode against the fixture's products.
    let products = TensorFile::load(dir.join("expected.safetensors")).unwrap();
    let get = |key: &str| products.get(key).unwrap().to_f64().unwrap();
    let v = get("vectors");
    let p = expected["num_params"].as_u64().unwrap() as usize;
    let vectors = tmp.path().join("v.safetensors");
    write_f64(&vectors, &[("V", vec![p, 3], &v)]);
    let mut failures = Vec::new();
    let tmp = tmp.path();
    check_apply(
        tmp,
        &state,
        &vectors,
        &[],
        &get("ekfac_mv"),
        EKFAC_TOL,
        &mut failures,
    );
    check_apply(
        tmp,
        &state,
        &vectors,
        &["--kfac"],
        &get("kfac_mv"),
        KFAC_TOL,
        &mut failures,
    );
    check_apply(
        tmp,
        &state,
        &vectors,
        &["--inverse"],
        &get("ekfac_inv_mv"),
        INVERSE_TOL,
        &mut failures,
    );
    for (mode, key) in [
        ("exact", "kfac_inv_exact_mv"),
        ("plain", "kfac_inv_plain_mv"),
        ("heuristic", "kfac_inv_heuristic_mv"),
    ] {
        check_apply(
            tmp,
            &state,
            &vectors,
            &["--kfac", "--inverse", "--damping-mode", mode],
            &get(key),
            INVERSE_TOL,
            &mut failures,
        );
    }

    // A state fitted with another damping: --inverse uses the stored one unless
    // --damping overrides it.
    let state_other = tmp.join("state_other.safetensors");
    let out = ekfac(&with(
        fit_args(&dir, &expected),
        &["--damping", "0.5", "--out", s(&state_other)],
    ));
    assert_success(&out, "fit --damping 0.5");
    check_apply(
        tmp,
        &state_other,
        &vectors,
        &["--inverse", "--damping", &damping_arg],
        &get("ekfac_inv_mv"),
        INVERSE_TOL,
        &mut failures,
    );
    let out_path = tmp.join("stored.safetensors");
    let result = apply(&state_other, &vectors, &out_path, &["--inverse"]);
    assert_success(&result, "apply --inverse with the stored damping");
    let (_, stored) = read_out(&out_path);
    let e = common::rel_err(&stored, &get("ekfac_inv_mv"));
    assert!(
        e > 10.0 * INVERSE_TOL,
        "--inverse on a state fitted with damping 0.5 should not match δ = {damping} \
         (relative difference {e:.3e})"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn forward_only_state_needs_kfac() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _, state) = fit_state("mlp_relu_ce_mean_forwardonly_sep", tmp.path());
    let products = TensorFile::load(dir.join("expected.safetensors")).unwrap();
    let v = products.get("vectors").unwrap().to_f64().unwrap();
    let p = v.len() / 3;
    let vectors = tmp.path().join("v.safetensors");
    write_f64(&vectors, &[("V", vec![p, 3], &v)]);
    let out_path = tmp.path().join("out.safetensors");
    let result = apply(&state, &vectors, &out_path, &[]);
    assert_fails(&result, "forward-only", &[&out_path]);
    assert!(stderr(&result).contains("--kfac"), "{}", stderr(&result));
    let mut failures = Vec::new();
    let kfac_mv = products.get("kfac_mv").unwrap().to_f64().unwrap();
    check_apply(
        tmp.path(),
        &state,
        &vectors,
        &["--kfac"],
        &kfac_mv,
        KFAC_TOL,
        &mut failures,
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Bad inputs to `fit`: each exits non-zero naming the problem, writing neither the
/// state nor the summary.
#[test]
fn fit_rejects_bad_inputs() {
    let dir = fixture("mlp_tanh_ce_mean_type2_sep");
    let expected = expected_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state.safetensors");
    let summary = tmp.path().join("s.json");
    let outputs = [state.as_path(), summary.as_path()];
    let tail = ["--summary", s(&summary), "--out", s(&state)];
    let base = || fit_args(&dir, &expected);
    let replace = |flag: &str, value: &str| {
        let mut args = base();
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_string();
        with(args, &tail)
    };

    // The fixture's data: x F32 [10, 4], y I64 class indices in 0..3.
    let data = TensorFile::load(dir.join("data.safetensors")).unwrap();
    let x = data.get("x").unwrap().to_f32().unwrap();
    let y = data.get("y").unwrap().to_i64().unwrap();
    let n = y.len();
    assert_eq!(x.len(), n * 4);

    let missing = tmp.path().join("no_such_model.json");
    let out = ekfac(&replace("--model", s(&missing)));
    assert_fails(&out, "no_such_model.json", &outputs);

    let mut bad_y = y.clone();
    bad_y[3] = 3;
    let labels = tmp.path().join("labels.safetensors");
    write_data(&labels, &x, vec![n, 4], &bad_y);
    let out = ekfac(&replace("--data", s(&labels)));
    assert_fails(&out, "y[3] = 3", &outputs);
    assert!(
        stderr(&out).contains("labels.safetensors"),
        "{}",
        stderr(&out)
    );

    let wide = tmp.path().join("wide.safetensors");
    write_data(&wide, &x[..n / 2 * 4 * 2], vec![n / 2, 8], &y[..n / 2]);
    let out = ekfac(&replace("--data", s(&wide)));
    assert_fails(&out, "input_shape", &outputs);
    assert!(
        stderr(&out).contains("wide.safetensors"),
        "{}",
        stderr(&out)
    );

    let mut nan_x = x.clone();
    nan_x[6] = f32::NAN;
    let nan = tmp.path().join("nan.safetensors");
    write_data(&nan, &nan_x, vec![n, 4], &y);
    let out = ekfac(&replace("--data", s(&nan)));
    assert_fails(&out, "x[1, 2] is NaN", &outputs);

    let mut inf_x = x.clone();
    inf_x[0] = f32::INFINITY;
    let inf = tmp.path().join("inf.safetensors");
    write_data(&inf, &inf_x, vec![n, 4], &y);
    let out = ekfac(&replace("--data", s(&inf)));
    assert_fails(&out, "x[0, 0] is inf", &outputs);

    let out = ekfac(&replace("--loss", "hinge"));
    assert_fails(&out, "hinge", &outputs);
    let out = ekfac(&replace("--fisher", "foo"));
    assert_fails(&out, "foo", &outputs);

    let out = ekfac(&with(
        base(),
        &[
            "--mc-samples",
            "2",
            "--summary",
            s(&summary),
            "--out",
            s(&state),
        ],
    ));
    assert_fails(&out, "mc_samples", &outputs);
}

/// Bad inputs to `apply`: each exits non-zero naming the problem, writing no output.
#[test]
fn apply_rejects_bad_inputs() {
    let Some(ctx) = common::gpu() else { return };
    drop(ctx);
    let tmp = tempfile::tempdir().unwrap();
    let (dir, expected, state) = fit_state("mlp_tanh_ce_mean_type2_sep", tmp.path());
    let p = expected["num_params"].as_u64().unwrap() as usize;
    let vectors = tmp.path().join("v.safetensors");
    write_f64(&vectors, &[("V", vec![p, 2], &vec![1.0; 2 * p])]);
    let short = tmp.path().join("short.safetensors");
    write_f64(&short, &[("V", vec![p - 1, 2], &vec![1.0; 2 * (p - 1)])]);
    let out_path = tmp.path().join("out.safetensors");
    let run_apply =
        |state: &Path, vectors: &Path, extra: &[&str]| apply(state, vectors, &out_path, extra);

    let out = run_apply(&state, &vectors, &["--key", "nope"]);
    assert_fails(&out, "nope", &[&out_path]);

    let out = run_apply(&state, &short, &[]);
    assert_fails(&out, &format!("{} rows", p - 1), &[&out_path]);
    assert!(
        stderr(&out).contains(&format!("{p} parameters")),
        "{}",
        stderr(&out)
    );

    let mut nan_v = vec![1.0; 2 * p];
    nan_v[5] = f64::NAN;
    let nan = tmp.path().join("nan.safetensors");
    write_f64(&nan, &[("V", vec![p, 2], &nan_v)]);
    let out = run_apply(&state, &nan, &[]);
    assert_fails(&out, "\"V\": V[2, 1] is NaN", &[&out_path]);

    let weights = dir.join("weights.safetensors");
    let out = run_apply(&weights, &vectors, &[]);
    assert_fails(&out, "not an ekfac state file", &[&out_path]);

    let missing = tmp.path().join("no_such_state.safetensors");
    let out = run_apply(&missing, &vectors, &[]);
    assert_fails(&out, "no_such_state.safetensors", &[&out_path]);

    let out = run_apply(&state, &vectors, &["--inverse", "--damping-mode", "bar"]);
    assert_fails(&out, "bar", &[&out_path]);

    let out = run_apply(&state, &vectors, &["--inverse", "--damping=-1"]);
    assert_fails(&out, "damping", &[&out_path]);

    // Plain and heuristic damping are KFAC-only.
    let out = run_apply(&state, &vectors, &["--inverse", "--damping-mode", "plain"]);
    assert_fails(&out, "exact", &[&out_path]);
}

/// `--check-deterministic` fits twice and requires bitwise-equal results (no float
/// atomics anywhere, so this must pass), and `--init-state` warm-starts from an
/// earlier state; both write a state that loads.
#[test]
fn fit_checks_determinism_and_warm_starts() {
    let dir = fixture("cnn_c_mse_mean_type2_expand_sep");
    let expected = expected_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first.safetensors");
    let out = ekfac(&with(
        fit_args(&dir, &expected),
        &["--check-deterministic", "--out", s(&first)],
    ));
    assert_success(&out, "fit --check-deterministic");
    let second = tmp.path().join("second.safetensors");
    let out = ekfac(&with(
        fit_args(&dir, &expected),
        &["--init-state", s(&first), "--out", s(&second)],
    ));
    assert_success(&out, "fit --init-state");
    assert!(ekfac::curvature::state::CurvatureState::load(&second).is_ok());
    let missing = tmp.path().join("nope.safetensors");
    let third = tmp.path().join("third.safetensors");
    let out = ekfac(&with(
        fit_args(&dir, &expected),
        &["--init-state", s(&missing), "--out", s(&third)],
    ));
    assert_fails(&out, "nope.safetensors", &[&third]);
}

/// `ekfac info` describes the adapter and says how large a Kronecker factor the
/// eigendecomposition takes there and what the memory budget is.
#[test]
fn info_describes_the_adapter_and_its_limits() {
    let Some(ctx) = common::gpu() else { return };
    let out = ekfac(&["info"]);
    assert_success(&out, "ekfac info");
    let text = String::from_utf8_lossy(&out.stdout);
    let n = ekfac::ops::jacobi::max_dimension(&ctx);
    for line in [
        format!("adapter:      {}", ctx.info.name),
        format!("largest Kronecker factor: {n} × {n}"),
        format!("memory budget: {} bytes", ctx.memory_budget()),
    ] {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }
}
