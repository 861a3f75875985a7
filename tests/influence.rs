//! Influence scores against an f64 computation: explicit per-example gradients of the
//! f64 reference network (batches of one, `∂ℓ_n/∂f_n` from `ekfac::loss`) and the f64
//! reference's EKFAC/KFAC fitted on the same data, its damped inverse applied densely.
//! On an MLP (cross-entropy and MSE), a CNN with weight sharing (conv positions) and a
//! CNN with grouped convolutions.
//!
//! Tolerance: relative Frobenius error 1e-3 over the whole `[Q, N]` score matrix, the
//! damped inverse products' tolerance of the curvature fixtures (the GPU fit's f32
//! eigenbases against the f64 fit's), which bounds the error of `gᵀ (F + δI)⁻¹ g'`.

mod common;

use ekfac::curvature::fit::fit;
use ekfac::curvature::influence::{InfluenceOptions, influence, top_k};
use ekfac::curvature::operator::Approximation;
use ekfac::curvature::options::{DampingMode, FisherType, Options, Reduction};
use ekfac::graph::Model;
use ekfac::loss::{Targets, backprop_vectors};
use ekfac::model::Dataset;
use ekfac::progress::Silent;
use ekfac::reference::curvature::{CpuCurvature, Dataset as Data64, Network64};

const TOL: f64 = 1e-3;

/// The f64 targets of `data`.
enum Owned {
    Classes(Vec<usize>),
    Dense(Vec<f64>),
}

impl Owned {
    fn of(data: &Dataset) -> Self {
        match &data.y {
            ekfac::model::Targets::Classes(y) => {
                Owned::Classes(y.iter().map(|&c| c as usize).collect())
            }
            ekfac::model::Targets::Values { data, .. } => {
                Owned::Dense(data.iter().map(|&v| f64::from(v)).collect())
            }
        }
    }

    fn slice(&self, start: usize, len: usize, outputs: usize) -> Targets<'_> {
        match self {
            Owned::Classes(y) => Targets::Classes(&y[start..start + len]),
            Owned::Dense(y) => Targets::Dense(&y[start * outputs..(start + len) * outputs]),
        }
    }
}

/// `∇ℓ_n` of every example, `[N, P]` in f64, model order, from batches of one.
fn gradients64(model: &Model, options: &Options, data: &Dataset) -> Vec<Vec<f64>> {
    let layout = ekfac::curvature::layout::ParamLayout::from_options(model, options).unwrap();
    let grads = Options {
        fisher: FisherType::Empirical,
        reduction: Reduction::Sum,
        mc_samples: 1,
        ..options.clone()
    };
    let x: Vec<f64> = data.x.iter().map(|&v| f64::from(v)).collect();
    let targets = Owned::of(data);
    let e = data.example_len();
    let c = model.num_outputs();
    let curvature = model.curvature_layers();
    (0..data.len)
        .map(|n| {
            let trace = ekfac::reference::nn::forward(model, &x[n * e..(n + 1) * e], 1);
            let logits = &trace.activations[model.graph.output + 1];
            assert_eq!(logits.len(), c);
            let v =
                backprop_vectors(&grads, logits, c, targets.slice(n, 1, c), n, data.len).unwrap();
            let back = ekfac::reference::nn::backward(model, &trace, &v.values, 1);
            let mut g = vec![0.0; layout.num_params];
            for p in &layout.params {
                let i = curvature.iter().position(|&l| l == p.layer).unwrap();
                let src = match p.kind {
                    ekfac::curvature::layout::ParamKind::Weight => &back.weight_grads[i],
                    ekfac::curvature::layout::ParamKind::Bias => {
                        back.bias_grads[i].as_ref().unwrap()
                    }
                };
                g[p.offset..p.offset + p.len()].copy_from_slice(src);
            }
            g
        })
        .collect()
}

/// `score[q, n] = g_qᵀ (F + δI)⁻¹ g_n` in f64 with the reference's fit of `options`.
fn scores64(
    model: &Model,
    options: &Options,
    train: &Dataset,
    query: &Dataset,
    damping: f64,
    which: Approximation,
) -> (Vec<f64>, Vec<f64>) {
    let net = Network64::new(model);
    let x: Vec<f64> = train.x.iter().map(|&v| f64::from(v)).collect();
    let targets = Owned::of(train);
    let data = Data64 {
        x: &x,
        targets: targets.slice(0, train.len, model.num_outputs()),
        num_data: train.len,
    };
    let cpu = CpuCurvature::fit(&net, &data, options, which == Approximation::Ekfac).unwrap();
    let g_train = gradients64(model, options, train);
    let g_query = gradients64(model, options, query);
    let p = g_query[0].len();
    let q = g_query.len();
    // [P, Q] columns.
    let mut cols = vec![0.0; p * q];
    for (j, g) in g_query.iter().enumerate() {
        for i in 0..p {
            cols[i * q + j] = g[i];
        }
    }
    let w = cpu
        .inverse_matmat(which, &cols, q, damping, DampingMode::Exact)
        .unwrap();
    let n = g_train.len();
    let mut scores = vec![0.0; q * n];
    for (t, g) in g_train.iter().enumerate() {
        for j in 0..q {
            scores[j * n + t] = (0..p).map(|i| g[i] * w[i * q + j]).sum();
        }
    }
    // Self-influence of every training example.
    let mut cols = vec![0.0; p * n];
    for (t, g) in g_train.iter().enumerate() {
        for i in 0..p {
            cols[i * n + t] = g[i];
        }
    }
    let w = cpu
        .inverse_matmat(which, &cols, n, damping, DampingMode::Exact)
        .unwrap();
    let diag = g_train
        .iter()
        .enumerate()
        .map(|(t, g)| (0..p).map(|i| g[i] * w[i * n + t]).sum())
        .collect();
    (scores, diag)
}

/// Examples `start..start + len` of `data`.
fn subset(data: &Dataset, start: usize, len: usize) -> Dataset {
    let e = data.example_len();
    let y = match &data.y {
        ekfac::model::Targets::Classes(y) => {
            ekfac::model::Targets::Classes(y[start..start + len].to_vec())
        }
        ekfac::model::Targets::Values { data, cols } => ekfac::model::Targets::Values {
            data: data[start * cols..(start + len) * cols].to_vec(),
            cols: *cols,
        },
    };
    Dataset::new(
        data.x[start * e..(start + len) * e].to_vec(),
        data.example_shape.clone(),
        y,
    )
    .unwrap()
}

/// Scores of `case` (queries: its first 4 examples, training set: all) against f64,
/// for batch sizes 1, 7 and all, with self-influence, EKFAC and KFAC.
fn check_case(name: &str) {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture(name);
    let damping = case.damping.max(1e-2);
    let fitted = fit(&ctx, &case.model, &case.data, &case.options, Some(damping)).unwrap();
    let query = subset(&case.data, 0, 4);
    let n = case.data.len;
    for which in [Approximation::Ekfac, Approximation::Kfac] {
        let (want, want_diag) = scores64(
            &case.model,
            &case.options,
            &case.data,
            &query,
            damping,
            which,
        );
        let mut first: Option<Vec<f32>> = None;
        for batch_size in [1, 7, n] {
            let options = InfluenceOptions {
                approx: which,
                batch_size,
                self_influence: true,
                ..Default::default()
            };
            let got = influence(
                &ctx,
                &case.model,
                &fitted.state,
                [&case.data, &query],
                &options,
                &Silent,
            )
            .unwrap();
            assert_eq!(got.damping, damping);
            let err = common::rel_err(&got.scores, &want);
            assert!(
                err < TOL,
                "{name} {which:?} batch {batch_size}: scores relative error {err:.2e}"
            );
            let diag = got.self_influence.as_ref().unwrap();
            let err = common::rel_err(diag, &want_diag);
            assert!(
                err < TOL,
                "{name} {which:?} batch {batch_size}: self-influence relative error {err:.2e}"
            );
            // The queries are training examples 0..4: their own scores are their
            // self-influence.
            for (q, &b) in diag.iter().enumerate().take(4) {
                let a = got.scores[q * n + q];
                assert!(
                    (a - b).abs() <= 1e-3 * b.abs().max(1e-6),
                    "{name}: score[{q}, {q}] = {a} but self-influence {b}"
                );
            }
            // Streaming does not change the scores beyond f32 summation order.
            match &first {
                None => first = Some(got.scores.clone()),
                Some(f) => {
                    let want: Vec<f64> = f.iter().map(|&v| f64::from(v)).collect();
                    let err = common::rel_err(&got.scores, &want);
                    assert!(
                        err < 1e-5,
                        "{name}: batch {batch_size} differs by {err:.2e}"
                    );
                }
            }
        }
    }
}

#[test]
fn mlp_scores_match_f64() {
    check_case("mlp_tanh_ce_mean_type2_sep");
}

#[test]
fn mlp_mse_scores_match_f64() {
    check_case("mlp_relu_mse_mean_type2_sep");
}

#[test]
fn cnn_scores_match_f64() {
    check_case("cnn_a_ce_mean_type2_expand_sep");
}

/// Grouped convolutions (`cnn_b`: groups 2) with a joint bias: the gradient reads each
/// group's own input channels, not the group average the factors use.
#[test]
fn grouped_cnn_scores_match_f64() {
    check_case("cnn_b_ce_sum_type2_expand_joint");
}

#[test]
fn top_k_agrees_with_a_full_sort() {
    let scores = [0.5f32, -1.0, 2.0, 0.5, -3.0, 1.0, 1.0, -1.0, 0.0, 4.0];
    let [helpful, harmful] = top_k(&scores, 5, 3);
    assert_eq!(helpful.0, [2, 0, 3, 4, 0, 1]);
    assert_eq!(helpful.1, [2.0, 0.5, 0.5, 4.0, 1.0, 1.0]);
    assert_eq!(harmful.0, [4, 1, 0, 2, 3, 0]);
    assert_eq!(harmful.1, [-3.0, -1.0, 0.5, -1.0, 0.0, 1.0]);
    // Against a full sort of random rows.
    let mut rng = common::TestRng::new(3);
    let (rows, cols, k) = (4, 37, 6);
    let m = rng.vec(rows * cols);
    let [helpful, harmful] = top_k(&m, cols, k);
    for r in 0..rows {
        let mut row: Vec<f32> = m[r * cols..(r + 1) * cols].to_vec();
        row.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(&helpful.1[r * k..(r + 1) * k], &row[..k]);
        for (i, &v) in helpful.0[r * k..(r + 1) * k].iter().zip(&row[..k]) {
            assert_eq!(m[r * cols + *i as usize], v);
        }
        row.reverse();
        assert_eq!(&harmful.1[r * k..(r + 1) * k], &row[..k]);
    }
}

#[test]
fn a_state_for_another_model_is_refused() {
    let Some(ctx) = common::gpu() else { return };
    let case = common::fixture("mlp_tanh_ce_mean_type2_sep");
    let other = common::fixture("mlp_relu_ce_mean_type2_joint");
    let fitted = fit(&ctx, &other.model, &other.data, &other.options, Some(0.1)).unwrap();
    let err = influence(
        &ctx,
        &case.model,
        &fitted.state,
        [&case.data, &case.data],
        &InfluenceOptions::default(),
        &Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("another model"), "{err}");
}

/// `ekfac` with `args`, headless.
fn ekfac<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ekfac"))
        .args(args)
        .output()
        .expect("running the ekfac binary")
}

fn fixture_file(case: &str, file: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/curvature")
        .join(case)
        .join(file)
        .to_string_lossy()
        .into_owned()
}

/// A state of `case` fitted by the command line into `dir`.
fn fit_state(case: &str, dir: &std::path::Path) -> String {
    let state = dir.join(format!("{case}.safetensors"));
    let out = ekfac(&[
        "fit",
        "--quiet",
        "--model",
        &fixture_file(case, "model.json"),
        "--weights",
        &fixture_file(case, "weights.safetensors"),
        "--data",
        &fixture_file(case, "data.safetensors"),
        "--loss",
        "cross_entropy",
        "--fisher",
        "type-2",
        "--out",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    state.to_string_lossy().into_owned()
}

const CLI_CASE: &str = "cnn_a_ce_mean_type2_expand_sep";

/// `influence` arguments with the fixture model and weights of `case` and the state
/// `state`, scoring the examples of `query` against those of `train` (data files or
/// shard directories) into `out`.
fn influence_args(case: &str, state: &str, train: &str, query: &str, out: &str) -> Vec<String> {
    [
        "influence",
        "--state",
        state,
        "--model",
        &fixture_file(case, "model.json"),
        "--weights",
        &fixture_file(case, "weights.safetensors"),
        "--train",
        train,
        "--query",
        query,
        "--out",
        out,
    ]
    .map(String::from)
    .to_vec()
}

/// [`influence_args`] on [`CLI_CASE`] with its data as both training and query set.
fn cli_case_args(state: &str, out: &str) -> Vec<String> {
    let data = fixture_file(CLI_CASE, "data.safetensors");
    influence_args(CLI_CASE, state, &data, &data, out)
}

#[test]
fn the_command_line_writes_scores_top_k_self_influence_and_a_report() {
    let Some(ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = fit_state(CLI_CASE, dir.path());
    let out = dir.path().join("scores.safetensors");
    let report = dir.path().join("report");
    let mut args = cli_case_args(&state, out.to_str().unwrap());
    args.extend(
        [
            "--top-k",
            "4",
            "--self-influence",
            "--batch-size",
            "5",
            "--report",
            report.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let result = ekfac(&args);
    assert!(result.status.success(), "{result:?}");
    let file = ekfac::model::TensorFile::load(&out).unwrap();
    let case = common::fixture(CLI_CASE);
    let n = case.data.len;
    let scores = file.require("scores", "").unwrap();
    assert_eq!(scores.shape, [n, n]);
    let scores = scores.to_f32().unwrap();
    // The same scores as the library on the same state.
    let loaded =
        ekfac::curvature::state::CurvatureState::load(std::path::Path::new(&state)).unwrap();
    let want = influence(
        &ctx,
        &case.model,
        &loaded,
        [&case.data, &case.data],
        &InfluenceOptions::default(),
        &Silent,
    )
    .unwrap();
    let want64: Vec<f64> = want.scores.iter().map(|&v| f64::from(v)).collect();
    assert!(common::rel_err(&scores, &want64) < 1e-5);
    let diag = file.require("self_influence", "").unwrap();
    assert_eq!(diag.shape, [n]);
    // Top-k against a full sort of each row.
    let helpful = file.require("top_helpful_indices", "").unwrap();
    assert_eq!(helpful.shape, [n, 4]);
    let helpful = helpful.to_i64().unwrap();
    let helpful_scores = file
        .require("top_helpful_scores", "")
        .unwrap()
        .to_f32()
        .unwrap();
    let harmful = file
        .require("top_harmful_indices", "")
        .unwrap()
        .to_i64()
        .unwrap();
    for q in 0..n {
        let row = &scores[q * n..(q + 1) * n];
        let mut sorted: Vec<usize> = (0..n).collect();
        sorted.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
        for r in 0..4 {
            assert_eq!(row[helpful[q * 4 + r] as usize], row[sorted[r]]);
            assert_eq!(helpful_scores[q * 4 + r], row[sorted[r]]);
            assert_eq!(row[harmful[q * 4 + r] as usize], row[sorted[n - 1 - r]]);
        }
    }
    let md = std::fs::read_to_string(report.join("README.md")).unwrap();
    assert!(
        md.contains("## Query 0") && md.contains("self-influence"),
        "{md}"
    );
}

#[test]
fn the_command_line_refuses_bad_inputs() {
    let Some(_ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = fit_state(CLI_CASE, dir.path());
    let out = dir.path().join("scores.safetensors");
    let out_s = out.to_str().unwrap();
    let fails = |args: Vec<String>, needle: &str| {
        let result = ekfac(&args);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{needle:?} not in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{out:?} was written despite the error");
    };
    // A query file whose examples do not have the model's input shape.
    let data = fixture_file(CLI_CASE, "data.safetensors");
    let other_data = fixture_file("mlp_tanh_ce_mean_type2_sep", "data.safetensors");
    let args = influence_args(CLI_CASE, &state, &data, &other_data, out_s);
    fails(args, "mlp_tanh_ce_mean_type2_sep");
    // A state fitted for another model.
    let other = fit_state("mlp_tanh_ce_mean_type2_sep", dir.path());
    fails(cli_case_args(&other, out_s), "another model");
    // --top-k 0, and more than the training examples.
    let mut args = cli_case_args(&state, out_s);
    args.extend(["--top-k", "0"].map(String::from));
    fails(args, "--top-k");
    let mut args = cli_case_args(&state, out_s);
    args.extend(["--top-k", "13"].map(String::from));
    fails(args, "--top-k 13");
    // A report directory that cannot be created (below a regular file).
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let mut args = cli_case_args(&state, out_s);
    args.extend(["--report", blocker.join("report").to_str().unwrap()].map(String::from));
    fails(args, "report directory");
}

/// Image inputs (`[3, 8, 8]`) get a PNG grid per query in the report; grouped
/// convolutions are refused by node name.
#[test]
fn the_report_draws_image_grids_and_grouped_convolutions_score() {
    let Some(_ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let case = "cnn_large_ce_mean_type2_expand_sep";
    let state = fit_state(case, dir.path());
    let out = dir.path().join("scores.safetensors");
    let report = dir.path().join("report");
    let data = fixture_file(case, "data.safetensors");
    let mut args = influence_args(case, &state, &data, &data, out.to_str().unwrap());
    args.extend(["--top-k", "2", "--report", report.to_str().unwrap()].map(String::from));
    let result = ekfac(&args);
    assert!(result.status.success(), "{result:?}");
    let n = ekfac::model::Dataset::load(&data).unwrap().len;
    for q in [0, n - 1] {
        let bytes = std::fs::read(report.join(format!("query_{q}.png"))).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut rgb).unwrap();
        // The query and 2 + 2 training images, 120 pixels each, one row.
        assert_eq!((info.width, info.height), (600, 168));
        let inked = rgb.chunks(3).filter(|p| p.iter().any(|&c| c < 200)).count();
        assert!(inked * 10 > rgb.len() / 3, "query_{q}.png is nearly blank");
    }
    let md = std::fs::read_to_string(report.join("README.md")).unwrap();
    assert!(md.contains("(query_0.png)"), "{md}");

    let grouped = "cnn_b_ce_sum_type2_expand_joint";
    let state = fit_state(grouped, dir.path());
    let out = dir.path().join("grouped.safetensors");
    let data = fixture_file(grouped, "data.safetensors");
    let result = ekfac(&influence_args(
        grouped,
        &state,
        &data,
        &data,
        out.to_str().unwrap(),
    ));
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{err}");
    let n = ekfac::model::Dataset::load(&data).unwrap().len;
    let scores = ekfac::model::TensorFile::load(&out).unwrap();
    let scores = scores.get("scores").unwrap();
    assert_eq!(scores.shape, &[n, n]);
}

/// Writes examples `range` of the classification data `data` as a safetensors shard.
fn write_shard(path: &std::path::Path, data: &Dataset, range: std::ops::Range<usize>) {
    use safetensors::{Dtype, tensor::TensorView};
    let ekfac::model::Targets::Classes(y) = &data.y else {
        panic!("class targets expected")
    };
    let e = data.example_len();
    let mut shape = vec![range.len()];
    shape.extend(&data.example_shape);
    let x = bytemuck::cast_slice(&data.x[range.start * e..range.end * e]);
    let y = bytemuck::cast_slice(&y[range.clone()]);
    let views = [
        ("x", TensorView::new(Dtype::F32, shape, x).unwrap()),
        (
            "y",
            TensorView::new(Dtype::I64, vec![range.len()], y).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// `--train` and `--query` given as shard directories (uneven shards, batches of 4
/// across the shard boundaries) give bitwise the scores and self-influence of the
/// single file they split.
#[test]
fn shard_directories_score_as_the_single_file() {
    let Some(_ctx) = common::gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let state = fit_state(CLI_CASE, dir.path());
    let data = Dataset::load(fixture_file(CLI_CASE, "data.safetensors")).unwrap();
    assert_eq!(data.len, 12);
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for (name, range) in [("a", 0..5), ("b", 5..9), ("c", 9..12)] {
        write_shard(&shards.join(format!("{name}.safetensors")), &data, range);
    }
    let scores = |out: &std::path::Path, data: &std::path::Path| {
        let data = data.to_str().unwrap();
        let mut args = influence_args(CLI_CASE, &state, data, data, out.to_str().unwrap());
        args.extend(["--batch-size", "4", "--self-influence"].map(String::from));
        let result = ekfac(&args);
        assert!(result.status.success(), "{result:?}");
        let file = ekfac::model::TensorFile::load(out).unwrap();
        ["scores", "self_influence"].map(|key| {
            let values = file.require(key, "").unwrap().to_f32().unwrap();
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        })
    };
    let file = std::path::PathBuf::from(fixture_file(CLI_CASE, "data.safetensors"));
    let want = scores(&dir.path().join("file.safetensors"), &file);
    let got = scores(&dir.path().join("shards.safetensors"), &shards);
    assert_eq!(want[0].len(), 144);
    assert_eq!(got, want);
}
