//! The graph engine (`ekfac::graph`): every chain fixture read as a format-2 graph fits
//! bitwise like the chain; the parameter vector follows the file's `parameters` order;
//! bad graphs are errors naming the node and the field.

mod common;

use ekfac::curvature::fit::fit;
use ekfac::curvature::layout::ParamLayout;
use ekfac::curvature::state::CurvatureState;
use ekfac::graph::json::from_json_str;
use ekfac::graph::{Graph, Model};

/// The model's graph written as format-2 JSON and read back (no chain attached).
fn as_graph_file(model: &Model) -> Model {
    let mut graph = model.graph.clone();
    graph.chain = None;
    let text = graph.to_json();
    assert!(text.contains("\"format\":\"ekfac-graph\""), "{text}");
    let graph = from_json_str(&text, "graph.json").unwrap();
    assert!(graph.chain.is_none());
    Model {
        graph,
        params: model.params.clone(),
    }
}

#[test]
fn every_chain_fixture_fits_identically_as_a_graph() {
    let Some(ctx) = common::gpu() else { return };
    for name in common::fixture_names() {
        let case = common::fixture(&name);
        let graph_model = as_graph_file(&case.model);
        assert_eq!(
            graph_model.graph.shapes(),
            case.model.graph.shapes(),
            "{name}"
        );
        let chain = fit(&ctx, &case.model, &case.data, &case.options, None).unwrap();
        let graph = fit(&ctx, &graph_model, &case.data, &case.options, None).unwrap();
        let (a, b) = (&chain.state, &graph.state);
        assert_eq!(a.layout, b.layout, "{name}: layout");
        assert_eq!(a.layers, b.layers, "{name}: eigenbases (bitwise)");
        assert_eq!(
            a.corrected, b.corrected,
            "{name}: corrected eigenvalues (bitwise)"
        );
    }
}

/// Two linear layers whose `parameters` list names the second layer first (as
/// `named_parameters` does when the head module is registered before the body).
const SWAPPED: &str = r#"{
  "format": "ekfac-graph", "version": 2,
  "inputs": [{"name": "x", "shape": [3], "dtype": "f32"}],
  "nodes": [
    {"name": "body", "op": "linear", "inputs": ["x"],
     "attrs": {"in_features": 3, "out_features": 4, "bias": true}},
    {"name": "act", "op": "tanh", "inputs": ["body"]},
    {"name": "head", "op": "linear", "inputs": ["act"],
     "attrs": {"in_features": 4, "out_features": 2}}
  ],
  "output": "head",
  "parameters": ["head.weight", "head.bias", "body.weight", "body.bias"]
}"#;

#[test]
fn parameter_vector_follows_the_files_parameter_order() {
    let graph = from_json_str(SWAPPED, "swapped.json").unwrap();
    let names = |layout: ParamLayout| layout.param_names();
    assert_eq!(
        names(ParamLayout::new(&graph, None, false).unwrap()),
        ["head.weight", "head.bias", "body.weight", "body.bias"]
    );
    let selected = ParamLayout::new(
        &graph,
        Some(&["body.bias".to_string(), "head.weight".to_string()]),
        true,
    )
    .unwrap();
    assert_eq!(selected.param_names(), ["head.weight", "body.bias"]);
    assert_eq!(
        selected.params.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [0, 8]
    );
    // Without `parameters`, node order (weight before bias).
    let mut plain = graph.clone();
    plain.parameters = None;
    assert_eq!(
        names(ParamLayout::new(&plain, None, false).unwrap()),
        ["body.weight", "body.bias", "head.weight", "head.bias"]
    );
}

#[test]
fn a_graph_state_round_trips_through_its_file() {
    let Some(ctx) = common::gpu() else { return };
    let graph = from_json_str(SWAPPED, "swapped.json").unwrap();
    let mut rng = common::TestRng::new(7);
    let mut tensors = std::collections::HashMap::new();
    for (key, shape) in [
        ("body.weight", vec![4, 3]),
        ("body.bias", vec![4]),
        ("head.weight", vec![2, 4]),
        ("head.bias", vec![2]),
    ] {
        let n = shape.iter().product();
        tensors.insert(key.to_string(), (shape, rng.vec(n)));
    }
    let model = Model::new(graph, tensors).unwrap();
    let data = common::random_classification(&mut rng, 9, &[3], 2);
    let options = ekfac::curvature::Options {
        fisher: ekfac::curvature::FisherType::Type2,
        batch_size: 4,
        ..Default::default()
    };
    let fitted = fit(&ctx, &model, &data, &options, Some(0.1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    fitted.state.save(&path).unwrap();
    let loaded = CurvatureState::load(&path).unwrap();
    assert_eq!(loaded.layout, fitted.state.layout);
    assert_eq!(loaded.layout.param_names()[0], "head.weight");
    assert_eq!(loaded.layers, fitted.state.layers);
}

/// The error of reading `nodes` (a JSON list) as the nodes of a graph on `[2, 4, 4]`
/// inputs whose output is `output`.
fn graph_error(nodes: &str, output: &str) -> String {
    let text = format!(
        r#"{{"format": "ekfac-graph", "version": 2,
            "inputs": [{{"name": "x", "shape": [2, 4, 4], "dtype": "f32"}}],
            "nodes": {nodes}, "output": "{output}"}}"#
    );
    match from_json_str(&text, "g.json") {
        Ok(g) => panic!("expected an error, got {} nodes", g.nodes.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(msg.contains(f), "{msg:?} does not mention {f:?}");
    }
}

const FLAT: &str = r#"{"name": "flat", "op": "flatten", "inputs": ["x"]}"#;
const FC: &str = r#"{"name": "fc", "op": "linear", "inputs": ["flat"],
    "attrs": {"in_features": 32, "out_features": 3}}"#;

#[test]
fn bad_graphs_are_errors_naming_the_node() {
    // A cycle.
    let msg = graph_error(
        r#"[{"name": "a", "op": "relu", "inputs": ["b"]},
            {"name": "b", "op": "relu", "inputs": ["a"]}]"#,
        "b",
    );
    assert_mentions(&msg, &["node \"a\"", "cycle"]);
    // An unknown input.
    let msg = graph_error(
        &format!(
            r#"[{FLAT}, {{"name": "fc", "op": "linear", "inputs": ["flatt"], "attrs": {{"in_features": 32, "out_features": 3}}}}]"#
        ),
        "fc",
    );
    assert_mentions(&msg, &["node \"fc\"", "\"flatt\""]);
    // Two nodes with one name.
    let msg = graph_error(&format!("[{FLAT}, {FLAT}, {FC}]"), "fc");
    assert_mentions(&msg, &["node \"flat\"", "earlier"]);
    // An unknown op and an unknown attribute.
    let msg = graph_error(r#"[{"name": "n", "op": "selu", "inputs": ["x"]}]"#, "n");
    assert_mentions(&msg, &["node \"n\" (selu)", "unknown op", "relu"]);
    let msg = graph_error(
        &format!(
            r#"[{FLAT}, {{"name": "fc", "op": "linear", "inputs": ["flat"],
                 "attrs": {{"in_features": 32, "out_features": 3, "bais": false}}}}]"#
        ),
        "fc",
    );
    assert_mentions(
        &msg,
        &["node \"fc\" (linear)", "unknown attribute \"bais\""],
    );
    // Shapes that do not fit.
    let msg = graph_error(
        r#"[{"name": "fc", "op": "linear", "inputs": ["x"],
             "attrs": {"in_features": 32, "out_features": 3}}]"#,
        "fc",
    );
    assert_mentions(&msg, &["node \"fc\"", "[B, 2, 4, 4]", "flatten"]);
    // Geometry that overflows instead of wrapping: padding 2^63 + 1.
    let msg = graph_error(
        r#"[{"name": "conv", "op": "conv2d", "inputs": ["x"],
             "attrs": {"in_channels": 2, "out_channels": 2, "kernel_size": 3,
                       "padding": 9223372036854775809}}]"#,
        "conv",
    );
    assert_mentions(&msg, &["node \"conv\" (conv2d)", "padding", "overflows"]);
    // A module used by two nodes (tied weights).
    let msg = graph_error(
        &format!(
            r#"[{FLAT}, {FC}, {{"name": "fc_again", "op": "linear", "inputs": ["flat"],
                 "module": "fc", "attrs": {{"in_features": 32, "out_features": 3}}}}]"#
        ),
        "fc",
    );
    assert_mentions(&msg, &["node \"fc_again\"", "module \"fc\"", "tied"]);
    // One learned tensor added twice (tied through add_parameter).
    let msg = graph_error(
        &format!(
            r#"[{{"name": "p1", "op": "add_parameter", "inputs": ["x"],
                  "attrs": {{"parameter": "pos", "shape": [2, 4, 4]}}}},
                {{"name": "p2", "op": "add_parameter", "inputs": ["p1"],
                  "attrs": {{"parameter": "pos", "shape": [2, 4, 4]}}}},
                {{"name": "flat", "op": "flatten", "inputs": ["p2"]}}, {FC}]"#
        ),
        "fc",
    );
    assert_mentions(
        &msg,
        &["node \"p2\"", "parameter \"pos\"", "node \"p1\"", "tied"],
    );
    // An output that is no node, and a 4-D output.
    assert_mentions(
        &graph_error(&format!("[{FLAT}, {FC}]"), "x"),
        &["output", "\"x\""],
    );
    assert_mentions(
        &graph_error(r#"[{"name": "r", "op": "relu", "inputs": ["x"]}]"#, "r"),
        &["node \"r\"", "2-D"],
    );
    // The file's own keys.
    let msg = from_json_str(
        r#"{"format": "ekfac-graph", "version": 3, "inputs": [], "nodes": [], "output": ""}"#,
        "g.json",
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&msg, &["g.json", "\"version\"", "3"]);
    let msg = from_json_str(
        r#"{"format": "ekfac-graph", "version": 2,
            "inputs": [{"name": "x", "shape": [4], "dtype": "f32"}],
            "nodes": [{"name": "fc", "op": "linear", "inputs": "x"}], "output": "fc"}"#,
        "g.json",
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&msg, &["g.json", "nodes[0] \"fc\"", "\"inputs\""]);
}

#[test]
fn a_chain_is_read_as_the_graph_of_its_layers() {
    let case = common::fixture("cnn_a_ce_mean_type2_reduce_sep");
    let graph: &Graph = &case.model.graph;
    let names: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["0", "1", "2", "3", "4"]);
    let ops: Vec<&str> = graph.nodes.iter().map(|n| n.op.as_str()).collect();
    assert_eq!(ops, ["conv2d", "relu", "max_pool2d", "flatten", "linear"]);
    assert_eq!(graph.node_inputs(0), [0]);
    assert_eq!(graph.node_inputs(4), [4]);
    assert_eq!(graph.curvature_layers(), [0, 4]);
    assert_eq!(graph.label(2), "layers[2] (max_pool2d)");
}
