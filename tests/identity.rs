//! The identity op (eval-mode Dropout, `nn.Identity`) in a graph: the same numbers as
//! the graph without it, bit for bit, also where its value fans out to an `add` that
//! reads it twice; an identity with attributes or two inputs is refused by name.

mod common;

use std::collections::HashMap;

use ekfac::graph::{Model, Network};

/// `fc1 → [drop →] add(v, v) → relu → fc2`, with or without the identity `drop`.
fn model(with_identity: bool) -> Model {
    let hidden = if with_identity { "drop" } else { "fc1" };
    let mut nodes = vec![
        serde_json::json!({"name": "fc1", "op": "linear", "inputs": ["x"],
        "attrs": {"in_features": 3, "out_features": 4, "bias": true}}),
    ];
    if with_identity {
        nodes.push(serde_json::json!({"name": "drop", "op": "identity", "inputs": ["fc1"]}));
    }
    nodes.extend([
        serde_json::json!({"name": "twice", "op": "add", "inputs": [hidden, hidden]}),
        serde_json::json!({"name": "relu", "op": "relu", "inputs": ["twice"]}),
        serde_json::json!({"name": "fc2", "op": "linear", "inputs": ["relu"],
            "attrs": {"in_features": 4, "out_features": 2, "bias": true}}),
    ]);
    let json = serde_json::json!({"format": "ekfac-graph", "version": 2,
        "inputs": [{"name": "x", "shape": [3], "dtype": "f32"}],
        "nodes": nodes, "output": "fc2"});
    let graph = ekfac::graph::json::from_json_str(&json.to_string(), "test graph").unwrap();
    let mut rng = common::TestRng::new(21);
    let mut tensors = HashMap::new();
    for (name, shape) in [("fc1", [4, 3]), ("fc2", [2, 4])] {
        let n = shape[0] * shape[1];
        tensors.insert(format!("{name}.weight"), (shape.to_vec(), rng.vec(n)));
        tensors.insert(format!("{name}.bias"), (vec![shape[0]], rng.vec(shape[0])));
    }
    Model::new(graph, tensors).unwrap()
}

#[test]
fn identity_changes_nothing() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = common::TestRng::new(22);
    let (batch, stack) = (5, 3);
    let x = rng.vec(batch * 3);
    let grad = rng.vec(stack * batch * 2);
    let mut results = Vec::new();
    for with_identity in [false, true] {
        let model = model(with_identity);
        let net = Network::new(&ctx, &model).unwrap();
        let fwd = net
            .forward(&ctx, ctx.upload(&x, &[batch * 3]).unwrap())
            .unwrap();
        let g = ctx.upload(&grad, &[stack, batch, 2]).unwrap();
        let bwd = net.backward(&ctx, &fwd, &g, stack, true).unwrap();
        let nodes = &net.graph().nodes;
        let fc1 = nodes.iter().position(|n| n.name == "fc1").unwrap();
        let fc2 = nodes.iter().position(|n| n.name == "fc2").unwrap();
        let mut r = vec![ctx.read(fwd.output()).unwrap()];
        for layer in [fc1, fc2] {
            let (w, b) = bwd.param_grads(layer).unwrap();
            r.push(ctx.read(w).unwrap());
            r.push(ctx.read(b.unwrap()).unwrap());
            r.push(ctx.read(bwd.output_grad(layer)).unwrap());
        }
        results.push(r);
    }
    assert_eq!(results[0], results[1]);
    // Gradients reach fc1's output through both of the add's inputs.
    assert!(results[1][6].iter().any(|&v| v != 0.0));
}

#[test]
fn bad_identity_is_refused_by_name() {
    let node = |inputs: Vec<String>, attrs: serde_json::Value| {
        ekfac::graph::Node::new(
            "drop",
            "identity",
            inputs,
            attrs.as_object().unwrap().clone(),
        )
    };
    let err = ekfac::layers::build(
        &node(vec!["x".into()], serde_json::json!({"p": 0.1})),
        &[&[3]],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("node \"drop\"") && err.contains("\"p\""),
        "{err}"
    );
    let err = ekfac::layers::build(
        &node(vec!["x".into(), "y".into()], serde_json::json!({})),
        &[&[3], &[3]],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("node \"drop\"") && err.contains("one input"),
        "{err}"
    );
}
