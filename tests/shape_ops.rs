//! The shape ops of transformers (issue 11): `reshape`, `transpose`, `permute`, `mean`,
//! `mul_constant`, `div_constant` and `slice`, forward and backward against PyTorch autograd
//! fixtures (f64 reference to 1e-12, GPU as stated), and their attribute errors.

mod common;
mod op_fixtures;

use op_fixtures::{OpFixture, Tolerances};
use serde_json::json;

/// Copies are exact.
const EXACT: Tolerances = Tolerances {
    forward: 0.0,
    backward: 0.0,
};

#[test]
fn reshape_transpose_and_permute_match_pytorch_exactly() {
    for name in [
        "reshape",
        "transpose_last",
        "transpose_tokens",
        "permute_heads",
        "permute_cycle",
    ] {
        op_fixtures::check_layer(&OpFixture::load(name), EXACT);
    }
}

/// Means of at most 20 f32 values (summed in f32, divided once): a few ulp, 1e-6;
/// the backward divides each gradient once (correctly rounded or within WGSL's 2.5
/// ulp), 1e-6.
#[test]
fn mean_matches_pytorch() {
    for name in [
        "mean_tokens",
        "mean_last_keepdim",
        "mean_adjacent",
        "mean_apart",
    ] {
        let tol = Tolerances {
            forward: 1e-6,
            backward: 1e-6,
        };
        op_fixtures::check_layer(&OpFixture::load(name), tol);
    }
}

/// The constant is rounded to f32 (8^±½ by 3e-8 relative) and each product or quotient
/// once more: 1e-6.
#[test]
fn constant_scaling_matches_pytorch() {
    for name in ["mul_constant", "div_constant"] {
        let tol = Tolerances {
            forward: 1e-6,
            backward: 1e-6,
        };
        op_fixtures::check_layer(&OpFixture::load(name), tol);
    }
}

/// Slices are copies: exact, forward and backward (zeros outside the range).
#[test]
fn slice_matches_pytorch_exactly() {
    for name in ["slice_tokens", "slice_last_one"] {
        op_fixtures::check_layer(&OpFixture::load(name), EXACT);
    }
}

fn build_error(op: &str, attrs: serde_json::Value, shape: &[usize]) -> String {
    let attrs = attrs.as_object().cloned().unwrap_or_default();
    let node = ekfac::graph::Node::new("blk.op", op, vec!["x".into()], attrs);
    match ekfac::layers::build(&node, &[shape]) {
        Ok(layer) => panic!("{op}: expected an error, built {layer:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(msg.contains(f), "{msg:?} does not mention {f:?}");
    }
}

#[test]
fn bad_shape_op_attributes_are_errors_naming_the_node() {
    let shape = [3, 4, 5];
    let node = "node \"blk.op\"";
    // The batch axis may not move, be reduced or be out of range.
    let msg = build_error("transpose", json!({"dim0": 0, "dim1": 1}), &shape);
    assert_mentions(&msg, &[node, "dim0 = 0", "batch axis"]);
    let msg = build_error("transpose", json!({"dim0": 1, "dim1": 4}), &shape);
    assert_mentions(&msg, &[node, "dim1 = 4", "[B, 3, 4, 5]"]);
    let msg = build_error("permute", json!({"dims": [1, 0, 2, 3]}), &shape);
    assert_mentions(&msg, &[node, "dims[0] must be 0"]);
    let msg = build_error("permute", json!({"dims": [0, 1, 1, 3]}), &shape);
    assert_mentions(&msg, &[node, "not a permutation"]);
    let msg = build_error("permute", json!({"dims": [0, 2, 1]}), &shape);
    assert_mentions(&msg, &[node, "not a permutation"]);
    let msg = build_error("mean", json!({"dim": -4}), &shape);
    assert_mentions(&msg, &[node, "dim = -4", "batch axis"]);
    let msg = build_error("mean", json!({"dim": [1, 2, 3]}), &shape);
    assert_mentions(&msg, &[node, "scalar per example"]);
    let msg = build_error("mean", json!({"dim": [1, -3]}), &shape);
    assert_mentions(&msg, &[node, "twice"]);
    // Reshape: per-example sizes, equal counts.
    let msg = build_error("reshape", json!({"shape": [4, -1]}), &shape);
    assert_mentions(&msg, &[node, "no -1"]);
    let msg = build_error("reshape", json!({"shape": [7, 8]}), &shape);
    assert_mentions(&msg, &[node, "[B, 3, 4, 5]", "[B, 7, 8]"]);
    // Constants: finite, nonzero divisor.
    let msg = build_error("div_constant", json!({"value": 0.0}), &shape);
    assert_mentions(&msg, &[node, "division by zero"]);
    let msg = build_error("mul_constant", json!({"value": "inf"}), &shape);
    assert_mentions(&msg, &[node, "finite number"]);
    let msg = build_error("mul_constant", json!({"value": 1e300}), &shape);
    assert_mentions(&msg, &[node, "finite number"]);
    // Slices: a per-example dim, a non-empty range inside it.
    let msg = build_error("slice", json!({"dim": 0, "start": 0, "end": 1}), &shape);
    assert_mentions(&msg, &[node, "dim = 0", "batch axis"]);
    let msg = build_error("slice", json!({"dim": 2, "start": 2, "end": 5}), &shape);
    assert_mentions(&msg, &[node, "start = 2, end = 5", "<= 4", "[B, 3, 4, 5]"]);
    let msg = build_error("slice", json!({"dim": -1, "start": 3, "end": 3}), &shape);
    assert_mentions(&msg, &[node, "start < end"]);
    let msg = build_error("slice", json!({"dim": 1, "end": 2}), &shape);
    assert_mentions(&msg, &[node, "missing attribute \"start\""]);
    // cat_parameter: a per-example dim, index 0 or 1, a parameter that broadcasts
    // against its part.
    let cls = |dim: i64, index: i64, p: &[usize]| json!({"parameter": "cls", "shape": p, "dim": dim, "index": index});
    let msg = build_error("cat_parameter", cls(0, 0, &[1, 1, 5]), &shape);
    assert_mentions(&msg, &[node, "dim = 0", "batch axis"]);
    let msg = build_error("cat_parameter", cls(1, 2, &[1, 1, 5]), &shape);
    assert_mentions(&msg, &[node, "\"index\" = 2"]);
    let msg = build_error("cat_parameter", cls(1, 0, &[1, 3, 5]), &shape);
    assert_mentions(
        &msg,
        &[node, "[1, 3, 5]", "does not broadcast", "[B, 1, 4, 5]"],
    );
    let msg = build_error(
        "cat_parameter",
        json!({"parameter": "cls", "shape": [1, 5], "dim": 1}),
        &shape,
    );
    assert_mentions(&msg, &[node, "missing attribute \"index\""]);
    // Too many dims for the gather kernel.
    let msg = build_error(
        "transpose",
        json!({"dim0": 1, "dim1": 2}),
        &[2, 2, 2, 2, 2, 2],
    );
    assert_mentions(&msg, &[node, "6 dimensions"]);
}

/// `add_constant` (`x + c`; `x - c` and `c - x` export through it) against PyTorch
/// autograd: one rounding per element forward, the gradient passed on exactly.
#[test]
fn add_constant_matches_pytorch() {
    let f = op_fixtures::OpFixture::load("add_constant");
    assert_eq!(f.op, "add_constant");
    op_fixtures::check_layer(
        &f,
        op_fixtures::Tolerances {
            forward: 1e-7,
            backward: 1e-12,
        },
    );
}
