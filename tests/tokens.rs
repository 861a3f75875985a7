//! Token inputs (issue 11): a graph input of dtype `i64`, data `x` as I64/I32 token
//! ids uploaded as u32 words, `embedding` and `add_parameter` against PyTorch autograd
//! fixtures, a small token classifier fitted on the GPU against the f64 reference, and
//! the errors: ids outside the table (naming the example), dtype mismatches, ops other
//! than `embedding` reading ids.

mod common;
mod op_fixtures;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ekfac::curvature::fit::fit;
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::options::{FisherType, KfacApprox, Options};
use ekfac::graph::Model;
use ekfac::graph::json::from_json_str;
use ekfac::layers::{BackwardArgs, ForwardArgs, Pass};
use ekfac::loss::Targets as LossTargets;
use ekfac::model::{Dataset, Targets};
use ekfac::reference::curvature::{CpuCurvature, Dataset as CpuDataset, Network64};
use op_fixtures::{OpFixture, REFERENCE_TOL, Tolerances, rel_err64};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

use common::TestRng;

/// `fixture`'s layer, built through the registry on the shape of its input `x`.
fn fixture_layer(f: &OpFixture) -> Box<dyn ekfac::layers::Layer> {
    let (_, shape) = f.get("x");
    let attrs = f.attrs.as_object().cloned().unwrap_or_default();
    let node = ekfac::graph::Node::new(&f.name, &f.op, vec!["x".into()], attrs);
    ekfac::layers::build(&node, &[&shape[1..]]).unwrap()
}

/// The fixture's `grad_<key>` `[V, *shape]` summed over the `V` vectors.
fn summed_over_vectors(f: &OpFixture, key: &str) -> Vec<f64> {
    let (g, shape) = f.get(key);
    let n: usize = shape[1..].iter().product();
    (0..n)
        .map(|i| (0..f.vectors).map(|v| g[v * n + i]).sum())
        .collect()
}

/// Runs `layer` forward and backward (with parameter gradients) on the GPU: the
/// output and the parameter gradients.
fn gpu_with_param_grads(
    ctx: &ekfac::gpu::GpuContext,
    layer: &dyn ekfac::layers::Layer,
    batch: usize,
    stack: usize,
    x: &ekfac::gpu::GpuTensor,
    params: &[ekfac::gpu::GpuTensor],
    grad_out: &ekfac::gpu::GpuTensor,
) -> (Vec<f32>, Vec<f32>) {
    let mut pass = Pass::new(ctx);
    let inputs = [x];
    let y = layer
        .forward(
            &mut pass,
            &ForwardArgs {
                batch,
                inputs: &inputs,
                params,
            },
        )
        .unwrap();
    let grads = layer
        .backward(
            &mut pass,
            &BackwardArgs {
                stack,
                batch,
                grad_out,
                inputs: &inputs,
                output: &y,
                params,
                input_grads: &[false],
                param_grads: true,
            },
        )
        .unwrap();
    pass.submit().unwrap();
    let p = grads.params.expect("parameter gradients");
    (ctx.read(&y).unwrap(), ctx.read(&p[0]).unwrap())
}

/// The embedding against PyTorch: the lookup exactly, the table gradient (ids
/// repeated, a stack of 3 vectors) to 1e-6 (f32 sums of at most 9 terms).
#[test]
fn embedding_matches_pytorch() {
    let f = OpFixture::load("embedding");
    let layer = fixture_layer(&f);
    let (ids, shape) = f.get("x");
    let batch = shape[0];
    let table = f.values("weight");
    let output = f.values("output");
    let grad_out = f.values("grad_output");
    let want_grad = summed_over_vectors(&f, "grad_weight");
    let y = layer.reference_forward(&ForwardArgs {
        batch,
        inputs: &[&ids],
        params: std::slice::from_ref(&table),
    });
    assert_eq!(y, output, "reference lookup");
    let g = layer.reference_backward(&BackwardArgs {
        stack: f.vectors,
        batch,
        grad_out: &grad_out,
        inputs: &[&ids],
        output: &y,
        params: std::slice::from_ref(&table),
        input_grads: &[false],
        param_grads: true,
    });
    assert!(g.inputs[0].is_none(), "ids get no gradient");
    let e = rel_err64(&g.params.unwrap()[0], &want_grad);
    assert!(e < REFERENCE_TOL, "reference table gradient: {e:e}");

    let Some(ctx) = common::gpu() else { return };
    let words: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let x = ctx.upload_u32(&words, &shape).unwrap();
    let w = ctx.upload(&f.f32("weight"), &[11, 4]).unwrap();
    let go = ctx
        .upload(&f.f32("grad_output"), &f.stacked(&f.get("output").1))
        .unwrap();
    let (y, grad) = gpu_with_param_grads(&ctx, layer.as_ref(), batch, f.vectors, &x, &[w], &go);
    let y: Vec<f64> = y.into_iter().map(f64::from).collect();
    assert_eq!(y, output, "GPU lookup");
    let grad: Vec<f64> = grad.into_iter().map(f64::from).collect();
    let e = rel_err64(&grad, &want_grad);
    assert!(e < 1e-6, "GPU table gradient: {e:e}");
}

/// `add_parameter` and `cat_parameter` against PyTorch (float64): forward to 1e-7
/// (one f32 rounding of each sum; a concatenation copies exactly), the input gradient
/// exactly (a copy), the parameter's gradient (f32 sums over the broadcast dims) to 1e-6.
#[test]
fn add_parameter_and_cat_parameter_match_pytorch() {
    for name in [
        "add_parameter_positions",
        "add_parameter_broadcast",
        "cat_parameter_cls",
        "cat_parameter_after",
    ] {
        let f = OpFixture::load(name);
        let tol = Tolerances {
            forward: 1e-7,
            backward: 0.0,
        };
        // check_layer reads the parameter under the layer's suffix, "parameter".
        op_fixtures::check_layer(&f, tol);
        let layer = fixture_layer(&f);
        let (x, shape) = f.get("x");
        let (p, p_shape) = f.get("parameter");
        let want = summed_over_vectors(&f, "grad_parameter");
        let grad_out = f.values("grad_output");
        let g = layer.reference_backward(&BackwardArgs {
            stack: f.vectors,
            batch: shape[0],
            grad_out: &grad_out,
            inputs: &[&x],
            output: &[],
            params: std::slice::from_ref(&p),
            input_grads: &[false],
            param_grads: true,
        });
        let e = rel_err64(&g.params.unwrap()[0], &want);
        assert!(
            e < REFERENCE_TOL,
            "{name}: reference parameter gradient {e:e}"
        );

        let Some(ctx) = common::gpu() else { continue };
        let xg = ctx.upload(&f.f32("x"), &shape).unwrap();
        let pg = ctx.upload(&f.f32("parameter"), &p_shape).unwrap();
        let out_shape = f.get("output").1;
        let go = ctx
            .upload(&f.f32("grad_output"), &f.stacked(&out_shape))
            .unwrap();
        let (_, grad) =
            gpu_with_param_grads(&ctx, layer.as_ref(), shape[0], f.vectors, &xg, &[pg], &go);
        let grad: Vec<f64> = grad.into_iter().map(f64::from).collect();
        let e = rel_err64(&grad, &want);
        assert!(e < 1e-6, "{name}: GPU parameter gradient {e:e}");
    }
}

/// Token ids `[T] = [6]` over a vocabulary of 13 → embedding (dim 4) + learned
/// positions → linear over the tokens → GELU → mean pooling → head.
const TOKENS: &str = r#"{
  "format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [6], "dtype": "i64"}],
  "nodes": [
    {"name": "tok", "op": "embedding", "inputs": ["x"],
     "attrs": {"num_embeddings": 13, "embedding_dim": 4, "padding_idx": null}},
    {"name": "pos", "op": "add_parameter", "inputs": ["tok"],
     "attrs": {"parameter": "pos_embedding", "shape": [1, 6, 4]}},
    {"name": "mlp", "op": "linear", "inputs": ["pos"],
     "attrs": {"in_features": 4, "out_features": 5}},
    {"name": "act", "op": "gelu", "inputs": ["mlp"]},
    {"name": "pool", "op": "mean", "inputs": ["act"], "attrs": {"dim": 1}},
    {"name": "head", "op": "linear", "inputs": ["pool"],
     "attrs": {"in_features": 5, "out_features": 3}}
  ],
  "output": "head",
  "parameters": ["pos_embedding", "tok.weight", "mlp.weight", "mlp.bias", "head.weight",
                 "head.bias"]
}"#;

fn token_model(rng: &mut TestRng) -> Model {
    let graph = from_json_str(TOKENS, "tokens.json").unwrap();
    let mut tensors = HashMap::new();
    for (key, shape) in [
        ("tok.weight", vec![13, 4]),
        ("pos_embedding", vec![1, 6, 4]),
        ("mlp.weight", vec![5, 4]),
        ("mlp.bias", vec![5]),
        ("head.weight", vec![3, 5]),
        ("head.bias", vec![3]),
    ] {
        let n = shape.iter().product();
        tensors.insert(key.to_string(), (shape, rng.vec(n)));
    }
    Model::new(graph, tensors).unwrap()
}

/// Ids `[n, 6]` in `0..13` and class labels in `0..3`.
fn token_data(rng: &mut TestRng, n: usize) -> (Vec<u32>, Vec<i64>) {
    let ids = (0..n * 6).map(|_| (rng.next_u64() % 13) as u32).collect();
    let y = (0..n).map(|_| (rng.next_u64() % 3) as i64).collect();
    (ids, y)
}

#[test]
fn a_token_classifier_matches_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(21);
    let model = token_model(&mut rng);
    assert_eq!(model.graph.shapes()[2], [6, 4]);
    let (ids, y) = token_data(&mut rng, 11);
    let data = Dataset::tokens(ids.clone(), vec![6], Targets::Classes(y.clone())).unwrap();
    let x64: Vec<f64> = ids.iter().map(|&i| f64::from(i)).collect();
    let classes: Vec<usize> = y.iter().map(|&c| c as usize).collect();
    let cpu_data = CpuDataset {
        x: &x64,
        targets: LossTargets::Classes(&classes),
        num_data: 11,
    };
    let net = Network64::new(&model);
    const K: usize = 2;
    for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
        let options = Options {
            fisher: FisherType::Type2,
            approx,
            batch_size: 4,
            ..Options::default()
        };
        let fitted = fit(&ctx, &model, &data, &options, None).unwrap();
        // Only the linear layers are curvature parameters; the table and the
        // positions shape the inputs.
        assert_eq!(
            fitted.state.layout.param_names(),
            ["mlp.weight", "mlp.bias", "head.weight", "head.bias"]
        );
        let reference = CpuCurvature::fit(&net, &cpu_data, &options, true).unwrap();
        let v = rng.vec(fitted.state.layout.num_params * K);
        let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        let operator = Operator::new(&ctx, &fitted.state).unwrap();
        for approx_kind in [Approximation::Kfac, Approximation::Ekfac] {
            let got = operator
                .apply(&v, K, approx_kind, Transform::Forward)
                .unwrap();
            let want = reference.matmat(approx_kind, &v64, K).unwrap();
            // As against curvlinops: products 1e-4.
            let e = common::rel_err(&got, &want);
            assert!(e < 1e-4, "{approx:?} {approx_kind:?}: {e:e}");
        }
    }
}

#[test]
fn token_errors_name_the_node_or_the_example() {
    let mut rng = TestRng::new(22);
    let model = token_model(&mut rng);
    // An id outside the table, naming the example and the embedding.
    let (mut ids, y) = token_data(&mut rng, 5);
    ids[3 * 6 + 2] = 13;
    let data = Dataset::tokens(ids, vec![6], Targets::Classes(y.clone())).unwrap();
    let msg = data.check(&model.graph, true).unwrap_err().to_string();
    for f in [
        "example 3",
        "id 13",
        "position 2",
        "[0, 13)",
        "node \"tok\"",
    ] {
        assert!(msg.contains(f), "{msg:?} does not mention {f:?}");
    }
    // Float data for a token model, and token data for a float model.
    let floats = Dataset::new(vec![0.0; 30], vec![6], Targets::Classes(y.clone())).unwrap();
    let msg = floats.check(&model.graph, true).unwrap_err().to_string();
    assert!(msg.contains("token ids") && msg.contains("F32"), "{msg}");
    // Ops other than an embedding may not read ids; an embedding reads only ids.
    let swap = |from: &str, to: &str| {
        assert!(TOKENS.contains(from));
        from_json_str(&TOKENS.replacen(from, to, 1), "t.json")
            .unwrap_err()
            .to_string()
    };
    let msg = swap(
        r#""name": "tok", "op": "embedding""#,
        r#""name": "tok", "op": "relu""#,
    );
    assert!(
        msg.contains("node \"tok\" (relu)") && msg.contains("token ids"),
        "{msg}"
    );
    let msg = swap(r#""dtype": "i64""#, r#""dtype": "f32""#);
    assert!(
        msg.contains("node \"tok\" (embedding)") && msg.contains("i64"),
        "{msg}"
    );
    let msg = swap(r#""dtype": "i64""#, r#""dtype": "u8""#);
    assert!(msg.contains("\"dtype\"") && msg.contains("u8"), "{msg}");
    // A parameter that does not broadcast.
    let msg = swap(r#""shape": [1, 6, 4]"#, r#""shape": [2, 6, 4]"#);
    assert!(
        msg.contains("node \"pos\"") && msg.contains("broadcast"),
        "{msg}"
    );
    // The weights file: the positions under their full name.
    let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    tensors.insert("tok.weight".into(), (vec![13, 4], vec![0.0; 52]));
    let msg = Model::new(model.graph.clone(), tensors)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("pos_embedding"), "{msg}");
}

/// A safetensors file of `(key, dtype, shape, little-endian bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            (
                k.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `ekfac fit` on the token model: data `x` as I64 ids fits; an id outside the table
/// is refused naming the file, the example and the embedding, and writes nothing.
#[test]
fn cli_fits_token_data_and_refuses_an_id_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("model.json");
    std::fs::write(&model_path, TOKENS).unwrap();
    let mut rng = TestRng::new(23);
    let model = token_model(&mut rng);
    let weights = dir.path().join("weights.safetensors");
    let entries: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, p.as_ref()?)))
        .flat_map(|(i, p)| {
            let layer = model.graph.layer(i);
            let module = model.graph.nodes[i].module().to_string();
            layer
                .params()
                .into_iter()
                .zip(&p.tensors)
                .map(|(spec, (_, values))| {
                    (
                        layer.param_key(&module, spec.suffix),
                        spec.shape,
                        f32_bytes(values),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = entries
        .iter()
        .map(|(k, s, b)| (k.as_str(), Dtype::F32, s.clone(), b.clone()))
        .collect();
    write_safetensors(&weights, &refs);
    let (ids, y) = token_data(&mut rng, 7);
    let run = |name: &str, ids: &[u32]| -> (std::process::Output, PathBuf) {
        let data = dir.path().join(format!("{name}.safetensors"));
        let x: Vec<u8> = ids
            .iter()
            .flat_map(|&i| i64::from(i).to_le_bytes())
            .collect();
        let yb: Vec<u8> = y.iter().flat_map(|c| c.to_le_bytes()).collect();
        write_safetensors(
            &data,
            &[
                ("x", Dtype::I64, vec![7, 6], x),
                ("y", Dtype::I64, vec![7], yb),
            ],
        );
        let out = dir.path().join(format!("{name}.state.safetensors"));
        let output = Command::new(env!("CARGO_BIN_EXE_ekfac"))
            .arg("fit")
            .arg("--model")
            .arg(&model_path)
            .arg("--weights")
            .arg(&weights)
            .arg("--data")
            .arg(&data)
            .args(["--loss", "cross_entropy", "--batch-size", "3", "--quiet"])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        (output, out)
    };
    let (ok, state) = run("good", &ids);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(state.exists());
    let mut bad = ids.clone();
    bad[4 * 6 + 5] = 40;
    let (refused, state) = run("bad", &bad);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for f in ["bad.safetensors", "example 4", "id 40", "node \"tok\""] {
        assert!(err.contains(f), "stderr does not mention {f:?}: {err}");
    }
    assert!(!state.exists());
}

/// Influence on token data: the library's scores (queries and training examples read
/// as ids) against explicit f64 per-example gradients of the reference network and the
/// reference EKFAC's damped inverse, relative Frobenius 1e-3 as in tests/influence.rs.
#[test]
fn influence_on_token_data_matches_f64() {
    use ekfac::curvature::influence::{InfluenceOptions, influence};
    use ekfac::curvature::layout::{ParamKind, ParamLayout};
    use ekfac::curvature::options::Reduction;
    use ekfac::loss::backprop_vectors;
    use ekfac::reference::nn;

    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(24);
    let model = token_model(&mut rng);
    let (ids, y) = token_data(&mut rng, 9);
    let train = Dataset::tokens(ids.clone(), vec![6], Targets::Classes(y.clone())).unwrap();
    let query = Dataset::tokens(
        ids[..12].to_vec(),
        vec![6],
        Targets::Classes(y[..2].to_vec()),
    )
    .unwrap();
    let options = Options {
        fisher: FisherType::Type2,
        batch_size: 4,
        ..Options::default()
    };
    let damping = 1e-2;
    let fitted = fit(&ctx, &model, &train, &options, Some(damping)).unwrap();
    let got = influence(
        &ctx,
        &model,
        &fitted.state,
        [&train, &query],
        &InfluenceOptions {
            batch_size: 4,
            ..Default::default()
        },
        &ekfac::progress::Silent,
    )
    .unwrap();

    // f64: ∇ℓ_n (sum reduction, true labels) by batches of one, in model order.
    let layout = ParamLayout::from_options(&model, &options).unwrap();
    let empirical = Options {
        fisher: FisherType::Empirical,
        reduction: Reduction::Sum,
        ..options.clone()
    };
    let curvature = model.curvature_layers();
    let x64: Vec<f64> = ids.iter().map(|&i| f64::from(i)).collect();
    let classes: Vec<usize> = y.iter().map(|&c| c as usize).collect();
    let grad = |n: usize| -> Vec<f64> {
        let trace = nn::forward(&model, &x64[n * 6..(n + 1) * 6], 1);
        let logits = &trace.activations[model.graph.output + 1];
        let t = LossTargets::Classes(&classes[n..n + 1]);
        let v = backprop_vectors(&empirical, logits, 3, t, n, 9).unwrap();
        let back = nn::backward(&model, &trace, &v.values, 1);
        let mut g = vec![0.0; layout.num_params];
        for p in &layout.params {
            let i = curvature.iter().position(|&l| l == p.layer).unwrap();
            let src = match p.kind {
                ParamKind::Weight => &back.weight_grads[i],
                ParamKind::Bias => back.bias_grads[i].as_ref().unwrap(),
            };
            g[p.offset..p.offset + p.len()].copy_from_slice(src);
        }
        g
    };
    let g: Vec<Vec<f64>> = (0..9).map(grad).collect();
    let p = layout.num_params;
    let net = Network64::new(&model);
    let cpu_data = CpuDataset {
        x: &x64,
        targets: LossTargets::Classes(&classes),
        num_data: 9,
    };
    let reference = CpuCurvature::fit(&net, &cpu_data, &options, true).unwrap();
    let mut cols = vec![0.0; p * 2];
    for (q, gq) in g.iter().take(2).enumerate() {
        for i in 0..p {
            cols[i * 2 + q] = gq[i];
        }
    }
    let w = reference
        .inverse_matmat(
            Approximation::Ekfac,
            &cols,
            2,
            damping,
            ekfac::curvature::options::DampingMode::Exact,
        )
        .unwrap();
    let want: Vec<f64> = (0..2)
        .flat_map(|q| {
            let w = &w;
            g.iter()
                .map(move |gn| (0..p).map(|i| gn[i] * w[i * 2 + q]).sum::<f64>())
        })
        .collect();
    let e = common::rel_err(&got.scores, &want);
    assert!(e < 1e-3, "token influence scores: relative error {e:.2e}");
}

/// The graph input's dtype survives writing the graph back to JSON.
#[test]
fn token_graphs_round_trip_through_json() {
    let graph = from_json_str(TOKENS, "tokens.json").unwrap();
    let text = graph.to_json();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["inputs"][0]["dtype"], "i64");
    assert_eq!(from_json_str(&text, "again.json").unwrap(), graph);
}

/// `mul_parameter` (a layer scale `γ ⊙ x`: ConvNeXt's `[C, 1, 1]`, a `[D]` over tokens)
/// against PyTorch autograd, the parameter's gradient included: one rounding per
/// product, the parameter's gradient a sum of at most 45 of them: 1e-6.
#[test]
fn mul_parameter_matches_pytorch() {
    for name in ["mul_parameter_channels", "mul_parameter_tokens"] {
        let f = op_fixtures::OpFixture::load(name);
        assert_eq!(f.op, "mul_parameter");
        op_fixtures::check_layer(
            &f,
            op_fixtures::Tolerances {
                forward: 1e-6,
                backward: 1e-6,
            },
        );
    }
}
