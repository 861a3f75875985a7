//! Linear layers over sequences (issue 11): a `linear` on `[B, T, F]` inputs is a
//! curvature layer sharing its weight over the `S = T` positions (SPEC §2.1–§2.3,
//! §3.4, §4.3). GPU fits of small sequence graphs against the crate's f64 reference,
//! KFAC and EKFAC, expand and reduce, separate and joint bias.

mod common;

use std::collections::HashMap;

use ekfac::curvature::fit::fit;
use ekfac::curvature::options::{FisherType, KfacApprox, LossKind, Options, Reduction};
use ekfac::graph::Model;
use ekfac::graph::json::from_json_str;
use ekfac::model::{Dataset, Targets};

use common::TestRng;
use common::reference::{compare_fit, random_weights};

/// `[T, F] = [5, 3] → linear(3→4) → relu → linear(4→4) over [5, 4] → tanh → flatten →
/// linear(20→3)`: two shared linear layers (S = 5) and a plain head.
const SEQ_FLATTEN: &str = r#"{
  "format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [5, 3], "dtype": "f32"}],
  "nodes": [
    {"name": "proj", "op": "linear", "inputs": ["x"],
     "attrs": {"in_features": 3, "out_features": 4, "bias": true}},
    {"name": "act", "op": "relu", "inputs": ["proj"]},
    {"name": "mix", "op": "linear", "inputs": ["act"],
     "attrs": {"in_features": 4, "out_features": 4, "bias": true}},
    {"name": "act2", "op": "tanh", "inputs": ["mix"]},
    {"name": "flat", "op": "flatten", "inputs": ["act2"], "attrs": {"start_dim": 1}},
    {"name": "head", "op": "linear", "inputs": ["flat"],
     "attrs": {"in_features": 20, "out_features": 3}}
  ],
  "output": "head"
}"#;

/// `[T, F] = [6, 3] → linear(3→5) → relu → mean over tokens → linear(5→3)`.
const SEQ_MEAN: &str = r#"{
  "format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [6, 3], "dtype": "f32"}],
  "nodes": [
    {"name": "proj", "op": "linear", "inputs": ["x"],
     "attrs": {"in_features": 3, "out_features": 5}},
    {"name": "act", "op": "relu", "inputs": ["proj"]},
    {"name": "pool", "op": "mean", "inputs": ["act"], "attrs": {"dim": 1}},
    {"name": "head", "op": "linear", "inputs": ["pool"],
     "attrs": {"in_features": 5, "out_features": 3}}
  ],
  "output": "head"
}"#;

/// A ViT in miniature: a strided conv patch embedding `[2, 6, 6] → [4, 3, 3]`, then
/// `flatten(2).transpose(1, 2)` into 9 tokens of 4 features, a token-wise linear with
/// a GELU, a scaled residual, mean pooling and a head.
const VIT: &str = r#"{
  "format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [2, 6, 6], "dtype": "f32"}],
  "nodes": [
    {"name": "patch", "op": "conv2d", "inputs": ["x"],
     "attrs": {"in_channels": 2, "out_channels": 4, "kernel_size": 2, "stride": 2}},
    {"name": "flat", "op": "flatten", "inputs": ["patch"], "attrs": {"start_dim": 2}},
    {"name": "tokens", "op": "transpose", "inputs": ["flat"], "attrs": {"dim0": 1, "dim1": 2}},
    {"name": "mlp", "op": "linear", "inputs": ["tokens"],
     "attrs": {"in_features": 4, "out_features": 4}},
    {"name": "gelu", "op": "gelu", "inputs": ["mlp"]},
    {"name": "half", "op": "mul_constant", "inputs": ["gelu"], "attrs": {"value": 0.5}},
    {"name": "res", "op": "add", "inputs": ["tokens", "half"]},
    {"name": "pool", "op": "mean", "inputs": ["res"], "attrs": {"dim": 1}},
    {"name": "head", "op": "linear", "inputs": ["pool"],
     "attrs": {"in_features": 4, "out_features": 3}}
  ],
  "output": "head"
}"#;

/// Random weights for every parameter of `graph_json` ([`random_weights`]).
fn random_model(graph_json: &str, rng: &mut TestRng) -> Model {
    let graph = from_json_str(graph_json, "sequence.json").unwrap();
    let tensors = random_weights(&graph, rng);
    Model::new(graph, tensors).unwrap()
}

/// [`compare_fit`] on the test binary's device; `shared` is the number of leading
/// parameters that belong to shared layers.
fn compare(model: &Model, data: &Dataset, options: &Options, shared: usize, what: &str) {
    let Some(ctx) = common::gpu() else { return };
    compare_fit(&ctx, model, data, options, Some(shared), what);
}

#[test]
fn linear_over_a_sequence_matches_the_reference() {
    let mut rng = TestRng::new(11);
    let model = random_model(SEQ_FLATTEN, &mut rng);
    let graph = &model.graph;
    assert_eq!(graph.shapes()[1], [5, 4]);
    for &i in &graph.curvature_layers()[..2] {
        assert_eq!(graph.layer(i).curvature().unwrap().positions(), 5);
    }
    let data = common::random_classification(&mut rng, 7, &[5, 3], 3);
    // proj.weight, proj.bias, mix.weight, mix.bias.
    let shared = 12 + 4 + 16 + 4;
    for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
        for (joint_bias, fisher) in [(false, FisherType::Type2), (true, FisherType::Empirical)] {
            let options = Options {
                fisher,
                approx,
                joint_bias,
                batch_size: 4,
                ..Options::default()
            };
            let what = format!("{approx:?} joint_bias={joint_bias} {fisher:?}");
            compare(&model, &data, &options, shared, &what);
        }
    }
}

/// SPEC E6/E7 through a linear layer on a sequence: `Linear(2→1, no bias)` on
/// `x = [[1,0],[0,1],[1,1]]` (`B = 1`, `S = 3`), the output `[3, 1]` flattened to
/// `C = 3`, MSE type-2. A expand = (1/3)[[2,1],[1,2]], A reduce = (4/9)·ones (E6).
/// Hessian column `c` gives `g_s = √(2 c_C)·δ_{sc}`, so G = Σ_c Σ_s g_s² = 6 (sum) and
/// 2 (mean, `c_C = 1/3`) in both modes: reduce's position sum `(Σ_s g_s)²` has one
/// nonzero term per column (E7's reduce values need `R = 3` loss terms per example,
/// which 2-D outputs do not have).
#[test]
fn spec_e6_e7_on_the_gpu() {
    let Some(ctx) = common::gpu() else { return };
    let graph = from_json_str(
        r#"{"format": "ekfac-graph", "version": 2,
            "inputs": [{"name": "x", "shape": [3, 2], "dtype": "f32"}],
            "nodes": [
              {"name": "fc", "op": "linear", "inputs": ["x"],
               "attrs": {"in_features": 2, "out_features": 1, "bias": false}},
              {"name": "flat", "op": "flatten", "inputs": ["fc"]}],
            "output": "flat"}"#,
        "e6.json",
    )
    .unwrap();
    let tensors = HashMap::from([("fc.weight".to_string(), (vec![1, 2], vec![0.3, -0.7]))]);
    let model = Model::new(graph, tensors).unwrap();
    let data = Dataset::new(
        vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        vec![3, 2],
        Targets::Values {
            data: vec![0.0; 3],
            cols: 3,
        },
    )
    .unwrap();
    for (approx, a_want) in [
        (
            KfacApprox::Expand,
            [2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0],
        ),
        (KfacApprox::Reduce, [4.0 / 9.0; 4]),
    ] {
        for (reduction, g_want) in [(Reduction::Sum, 6.0), (Reduction::Mean, 2.0)] {
            let options = Options {
                loss: LossKind::Mse,
                reduction,
                fisher: FisherType::Type2,
                approx,
                ..Options::default()
            };
            let fitted = fit(&ctx, &model, &data, &options, None).unwrap();
            let layer = &fitted.state.layers[0];
            let a = dense(layer.input.as_ref().unwrap());
            for (got, want) in a.iter().zip(a_want) {
                assert!((got - want).abs() < 1e-6, "{approx:?}: A = {a:?}");
            }
            let g = dense(&layer.gradient);
            // Reduce sums the three positions' gradients: one Hessian column per
            // output position, so the sum of squares is the same as expand's.
            assert!(
                (g[0] - g_want).abs() < 1e-5,
                "{approx:?} {reduction:?}: G = {g:?}"
            );
        }
    }
}

/// `Q diag(λ) Qᵀ`, row-major, from a factor's eigendecomposition (column `j` of the
/// row-major `Q` is eigenvector `j`).
fn dense(e: &ekfac::curvature::state::FactorEigen) -> Vec<f64> {
    let n = e.values.len();
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

#[test]
fn mean_pooled_sequence_matches_the_reference() {
    let mut rng = TestRng::new(12);
    let model = random_model(SEQ_MEAN, &mut rng);
    let data = common::random_classification(&mut rng, 9, &[6, 3], 3);
    // proj.weight, proj.bias.
    let shared = 15 + 5;
    for approx in [KfacApprox::Expand, KfacApprox::Reduce] {
        let options = Options {
            fisher: FisherType::Type2,
            approx,
            batch_size: 4,
            ..Options::default()
        };
        compare(&model, &data, &options, shared, &format!("{approx:?}"));
    }
}

#[test]
fn a_vit_patch_embedding_matches_the_reference() {
    let mut rng = TestRng::new(13);
    let model = random_model(VIT, &mut rng);
    let graph = &model.graph;
    assert_eq!(graph.shapes()[3], [9, 4], "tokens");
    let positions: Vec<usize> = graph
        .curvature_layers()
        .iter()
        .map(|&i| graph.layer(i).curvature().unwrap().positions())
        .collect();
    assert_eq!(positions, [9, 9, 1]);
    // 14 examples: reduce's A of the patch embedding (9 × 9 with the bias) has full
    // rank, so EKFAC does not depend on a basis chosen inside a null space.
    let data = common::random_classification(&mut rng, 14, &[2, 6, 6], 3);
    // patch.weight, patch.bias, mlp.weight, mlp.bias.
    let shared = 32 + 4 + 16 + 4;
    for (approx, joint_bias) in [(KfacApprox::Expand, false), (KfacApprox::Reduce, true)] {
        let options = Options {
            fisher: FisherType::Type2,
            approx,
            joint_bias,
            batch_size: 4,
            ..Options::default()
        };
        compare(
            &model,
            &data,
            &options,
            shared,
            &format!("{approx:?} joint={joint_bias}"),
        );
    }
}

/// A model whose output keeps the token axis (`[B, T, C]`, per-token logits) is
/// refused when the graph is built, naming the output node: KFAC and EKFAC take a 2-D
/// output, as curvlinops 3.0.1's EKFAC.
#[test]
fn a_per_token_output_is_refused_naming_the_output_node() {
    let text = SEQ_MEAN
        .replace(r#""inputs": ["pool"]"#, r#""inputs": ["act"]"#)
        .replace(
            r#"{"name": "pool", "op": "mean", "inputs": ["act"], "attrs": {"dim": 1}},"#,
            "",
        );
    let msg = from_json_str(&text, "per_token.json")
        .unwrap_err()
        .to_string();
    for f in [
        "node \"head\" (linear)",
        "2-D [B, C]",
        "[B, 6, 3]",
        "per-token",
    ] {
        assert!(msg.contains(f), "{msg:?} does not mention {f:?}");
    }
}
