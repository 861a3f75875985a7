//! BatchNorm (eval mode) and LayerNorm: the f64 reference against PyTorch autograd
//! fixtures, then the GPU kernels against both, for a stack of backpropagated vectors.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::GpuContext;
use ekfac::ops::norm;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, Tolerances, rel_err64};
use serde_json::json;

/// BatchNorm in eval mode on the GPU: `(x − mean)·rsqrt(var + eps)·weight + bias` in
/// f32, about six roundings (WGSL's `inverseSqrt` is within 2 ulp), relative to the
/// magnitudes of `x − mean` and of the result, which are alike on these inputs:
/// 1e-6 (observed ≤ 8e-8). Backward is a product of three factors: 5e-7.
const BN_FORWARD_TOL: f64 = 1e-6;
const BN_BACKWARD_TOL: f64 = 5e-7;

/// LayerNorm on the GPU: the row mean and variance are f32 tree sums of ≤ 600 terms
/// (relative error ≲ log₂(600)·2⁻²⁴ ≈ 6e-7); `x − mean` loses a further factor
/// `|mean|/σ` of the row (≤ 3 here: rows offset by 3 with unit spread), and the
/// backward's two extra row reductions and `x̂·mean(g·x̂)` add as much again: 2e-6 for
/// both (observed ≤ 1.6e-7). Rows whose spread σ is tiny against their values lose
/// accuracy in proportion, in PyTorch's f32 kernel as well; the tests avoid them.
const LN_FORWARD_TOL: f64 = 2e-6;
const LN_BACKWARD_TOL: f64 = 2e-6;

fn read64(ctx: &GpuContext, t: &ekfac::gpu::GpuTensor) -> Vec<f64> {
    ctx.read(t).unwrap().into_iter().map(f64::from).collect()
}

/// GPU BatchNorm of `x` (shape `shape`) and its backward for `grad` (a stack of
/// `grad.len()/x.len()` gradients), against `want` (output, input gradient) or the f64
/// reference.
#[allow(clippy::too_many_arguments)]
fn check_batch_norm(
    ctx: &GpuContext,
    what: &str,
    x: &[f32],
    shape: &[usize],
    (mean, var): (&[f32], &[f32]),
    affine: Option<(&[f32], &[f32])>,
    eps: f64,
    grad: &[f32],
    want: Option<(&[f64], &[f64])>,
) {
    let c = shape[1];
    let to64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(a)).collect() };
    let mut stacked = shape.to_vec();
    stacked[0] *= grad.len() / x.len();
    let affine64 = affine.map(|(w, b)| (to64(w), to64(b)));
    let (want_y, want_dx) = match want {
        Some((y, dx)) => (y.to_vec(), dx.to_vec()),
        None => (
            reference::batch_norm_eval_forward(
                &to64(x),
                shape,
                &to64(mean),
                &to64(var),
                affine64.as_ref().map(|(w, b)| (&w[..], &b[..])),
                eps,
            ),
            reference::batch_norm_eval_backward(
                &to64(grad),
                &stacked,
                &to64(var),
                affine64.as_ref().map(|(w, _)| &w[..]),
                eps,
            ),
        ),
    };
    let up = |v: &[f32], s: &[usize]| ctx.upload(v, s).unwrap();
    let (mean, var) = (up(mean, &[c]), up(var, &[c]));
    let affine = affine.map(|(w, b)| (up(w, &[c]), up(b, &[c])));
    let params = norm::BatchNormParams {
        running_mean: &mean,
        running_var: &var,
        affine: affine.as_ref().map(|(w, b)| (w, b)),
        eps: eps as f32,
    };
    let (xg, gg) = (up(x, shape), up(grad, &stacked));
    let yg = ctx.zeros(shape).unwrap();
    let dxg = ctx.zeros(&stacked).unwrap();
    let mut rec = ctx.recorder();
    norm::batch_norm_forward(&mut rec, &xg, &params, &yg).unwrap();
    norm::batch_norm_backward(&mut rec, &gg, &params, &dxg).unwrap();
    rec.submit().unwrap();
    let e = rel_err64(&read64(ctx, &yg), &want_y);
    assert!(e < BN_FORWARD_TOL, "{what}: forward error {e:e}");
    let e = rel_err64(&read64(ctx, &dxg), &want_dx);
    assert!(e < BN_BACKWARD_TOL, "{what}: backward error {e:e}");
}

/// The batch_norm2d and batch_norm1d layers (`[B, C]` and `[B, C, L]`), built from the
/// fixtures' `model.json` attributes, against PyTorch: eval mode with and without affine
/// weights.
#[test]
fn batch_norm_layer_matches_pytorch() {
    for name in [
        "batch_norm2d_affine",
        "batch_norm2d_plain",
        "batch_norm1d_features",
        "batch_norm1d_sequence",
    ] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, &name[..12]);
        let tol = Tolerances {
            forward: BN_FORWARD_TOL,
            backward: BN_BACKWARD_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// GPU LayerNorm of `x` (shape `shape`) and its backward for `grad` (a stack of
/// `grad.len()/x.len()` gradients), against the f64 reference.
#[allow(clippy::too_many_arguments)]
fn check_layer_norm(
    ctx: &GpuContext,
    what: &str,
    x: &[f32],
    shape: &[usize],
    affine: Option<(&[f32], &[f32])>,
    eps: f64,
    grad: &[f32],
    want: Option<(&[f64], &[f64])>,
) {
    let d = *shape.last().unwrap();
    let to64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(a)).collect() };
    let (x64, g64) = (to64(x), to64(grad));
    let affine64 = affine.map(|(w, b)| (to64(w), to64(b)));
    let (want_y, want_dx) = match want {
        Some((y, dx)) => (y.to_vec(), dx.to_vec()),
        None => (
            reference::layer_norm_forward(
                &x64,
                d,
                affine64.as_ref().map(|(w, b)| (&w[..], &b[..])),
                eps,
            ),
            reference::layer_norm_backward(
                &x64,
                d,
                affine64.as_ref().map(|(w, _)| &w[..]),
                eps,
                &g64,
            ),
        ),
    };
    let mut stacked = shape.to_vec();
    stacked[0] *= grad.len() / x.len();
    let xg = ctx.upload(x, shape).unwrap();
    let yg = ctx.zeros(shape).unwrap();
    let gg = ctx.upload(grad, &stacked).unwrap();
    let dxg = ctx.zeros(&stacked).unwrap();
    let params = affine.map(|(w, b)| (ctx.upload(w, &[d]).unwrap(), ctx.upload(b, &[d]).unwrap()));
    let mut rec = ctx.recorder();
    let pair = params.as_ref().map(|(w, b)| (w, b));
    norm::layer_norm_forward(&mut rec, &xg, pair, eps as f32, &yg).unwrap();
    norm::layer_norm_backward(&mut rec, &xg, pair.map(|(w, _)| w), eps as f32, &gg, &dxg).unwrap();
    rec.submit().unwrap();
    let e = rel_err64(&read64(ctx, &yg), &want_y);
    assert!(e < LN_FORWARD_TOL, "{what}: forward error {e:e}");
    let e = rel_err64(&read64(ctx, &dxg), &want_dx);
    assert!(e < LN_BACKWARD_TOL, "{what}: backward error {e:e}");
}

/// The layer_norm layer against PyTorch: a sequence axis, no affine weights, and rows
/// longer than a workgroup offset far from zero.
#[test]
fn layer_norm_layer_matches_pytorch() {
    for name in ["layer_norm_affine", "layer_norm_plain", "layer_norm_wide"] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "layer_norm");
        let tol = Tolerances {
            forward: LN_FORWARD_TOL,
            backward: LN_BACKWARD_TOL,
        };
        op_fixtures::check_layer(&f, tol);
    }
}

/// Attributes and input shapes the layers cannot take are errors naming the node.
#[test]
fn bad_layers_are_refused_by_name() {
    let cases = [
        (
            "batch_norm2d",
            json!({"num_features": 4}),
            vec![3, 5, 5],
            "num_features = 4",
        ),
        (
            "batch_norm2d",
            json!({"num_features": 3}),
            vec![3, 5],
            "4-D input",
        ),
        (
            "batch_norm2d",
            json!({"num_features": 3, "track_running_stats": false}),
            vec![3, 5, 5],
            "track_running_stats",
        ),
        (
            "batch_norm2d",
            json!({"num_features": 3, "eps": "x"}),
            vec![3, 5, 5],
            "\"eps\"",
        ),
        (
            "layer_norm",
            json!({"normalized_shape": [4]}),
            vec![2, 5],
            "trailing dimensions",
        ),
        (
            "layer_norm",
            json!({"normalized_shape": [5], "bias": false}),
            vec![2, 5],
            "bias",
        ),
        ("layer_norm", json!({}), vec![2, 5], "normalized_shape"),
    ];
    for (op, attrs, shape, message) in cases {
        let err = common::build_error("block.norm", op, &attrs, &shape);
        assert!(
            err.contains("node \"block.norm\"") && err.contains(message),
            "{op} {attrs}: {err}"
        );
    }
}

/// Row sizes around the workgroup's 256 (1, 255, 256, 257, 600), many short rows,
/// stacks of one to four vectors, with and without affine weights.
#[test]
fn layer_norm_gpu_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(3);
    for (shape, stack, affine) in [
        (vec![5, 1], 2, true),
        (vec![3, 255], 1, false),
        (vec![2, 2, 256], 4, true),
        (vec![3, 257], 3, true),
        (vec![2, 600], 2, false),
        (vec![70, 8], 4, true),
    ] {
        let d = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let x = rng.vec(n);
        let grad = rng.vec(n * stack);
        let (w, b) = (rng.vec(d), rng.vec(d));
        check_layer_norm(
            &ctx,
            &format!("{shape:?} stack {stack}"),
            &x,
            &shape,
            affine.then_some((&w[..], &b[..])),
            1e-5,
            &grad,
            None,
        );
    }
}

/// BatchNorm on `[N, C]` (no spatial axes) and on images with more elements than one
/// workgroup, with and without affine parameters, for stacks of 1 to 3 gradients,
/// against the f64 reference.
#[test]
fn batch_norm_gpu_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(4);
    for (shape, stack, affine) in [
        (vec![7, 5], 3, true),
        (vec![4, 6], 1, false),
        (vec![2, 3, 9, 11], 2, true),
    ] {
        let c = shape[1];
        let x = rng.vec(shape.iter().product());
        let grad = rng.vec(x.len() * stack);
        let mean = rng.vec(c);
        let var: Vec<f32> = rng.vec(c).iter().map(|v| v.abs() + 0.1).collect();
        let (w, b) = (rng.vec(c), rng.vec(c));
        check_batch_norm(
            &ctx,
            &format!("{shape:?} stack {stack}"),
            &x,
            &shape,
            (&mean, &var),
            affine.then_some((&w[..], &b[..])),
            1e-5,
            &grad,
            None,
        );
    }
}

/// Mismatched shapes and a bad eps are errors that name what is wrong, not panics.
#[test]
fn bad_arguments_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let x = ctx.zeros(&[2, 3, 4]).unwrap();
    let (c3, c4) = (ctx.zeros(&[3]).unwrap(), ctx.zeros(&[4]).unwrap());
    let y = ctx.zeros(&[2, 3, 4]).unwrap();
    let mut rec = ctx.recorder();
    let params = |mean, var, affine| norm::BatchNormParams {
        running_mean: mean,
        running_var: var,
        affine,
        eps: 1e-5,
    };
    let err = norm::batch_norm_forward(&mut rec, &x, &params(&c4, &c4, None), &y).unwrap_err();
    assert!(err.to_string().contains("[N, 4, ...]"), "{err}");
    let err = norm::batch_norm_forward(&mut rec, &x, &params(&c3, &c4, None), &y).unwrap_err();
    assert!(
        err.to_string().contains("running_var must have 3 elements"),
        "{err}"
    );
    let affine = Some((&c3, &c4));
    let err = norm::batch_norm_backward(&mut rec, &x, &params(&c3, &c3, affine), &y).unwrap_err();
    assert!(
        err.to_string().contains("bias must have 3 elements"),
        "{err}"
    );
    let w3 = ctx.zeros(&[3]).unwrap();
    let err = norm::layer_norm_forward(&mut rec, &x, Some((&w3, &w3)), 1e-5, &y).unwrap_err();
    assert!(
        err.to_string().contains("weight must have 4 elements"),
        "{err}"
    );
    let g = ctx.zeros(&[5, 4]).unwrap();
    let err = norm::layer_norm_backward(&mut rec, &x, None, 1e-5, &g, &g).unwrap_err();
    assert!(err.to_string().contains("stack of gradients"), "{err}");
    let err = norm::layer_norm_forward(&mut rec, &x, None, f32::NAN, &y).unwrap_err();
    assert!(err.to_string().contains("eps"), "{err}");
    assert!(rec.is_empty());
}

/// An exported ResNet's weights hold every BatchNorm's `num_batches_tracked` (I64,
/// shape `[]`): accepted and ignored. A missing running statistic is an error naming
/// the key and the node; any other unknown key is still refused.
#[test]
fn batch_norm_weights_from_a_state_dict() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let resnet = root.join("curvature_graph/resnet_bn_ce_mean_type2_expand_sep");
    let model = ekfac::graph::Model::load(
        resnet.join("model.json"),
        resnet.join("weights.safetensors"),
    )
    .unwrap();
    let bn = model
        .graph
        .nodes
        .iter()
        .position(|n| n.name == "bn1")
        .unwrap();
    let suffixes: Vec<&str> = model
        .layer_params(bn)
        .unwrap()
        .tensors
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(suffixes, ["weight", "bias", "running_mean", "running_var"]);

    let refused = root.join("graph_refused/missing_batch_norm_buffer");
    let err = ekfac::graph::Model::load(
        refused.join("model.json"),
        refused.join("weights.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing key \"layer1.0.bn2.running_var\"")
            && err.contains("\"layer1.0.bn2\""),
        "{err}"
    );

    let graph = ekfac::graph::json::load(resnet.join("model.json")).unwrap();
    let file = ekfac::model::TensorFile::load(resnet.join("weights.safetensors")).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for key in file
        .keys()
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
    {
        let t = file.get(&key).unwrap();
        tensors.insert(key.clone(), (t.shape.to_vec(), t.to_f32().unwrap()));
    }
    tensors.insert("bn1.momentum".into(), (vec![1], vec![0.1]));
    let err = ekfac::graph::Model::new(graph, tensors)
        .unwrap_err()
        .to_string();
    assert!(err.contains("unexpected key \"bn1.momentum\""), "{err}");
}

/// batch_norm2d takes `[C, H, W]` and batch_norm1d `[C]` or `[C, L]` per example;
/// anything else is an error naming the node and the shape.
#[test]
fn batch_norm_input_ranks() {
    let build = |op: &str, shape: &[usize]| {
        let node = ekfac::graph::Node::new(
            "bn",
            op,
            vec!["x".into()],
            serde_json::json!({"num_features": 4})
                .as_object()
                .cloned()
                .unwrap(),
        );
        ekfac::layers::build(&node, &[shape]).map(|l| l.output_shape().to_vec())
    };
    assert_eq!(build("batch_norm1d", &[4]).unwrap(), [4]);
    assert_eq!(build("batch_norm1d", &[4, 7]).unwrap(), [4, 7]);
    assert_eq!(build("batch_norm2d", &[4, 2, 3]).unwrap(), [4, 2, 3]);
    for (op, shape, want) in [
        ("batch_norm1d", &[4, 2, 3][..], "[B, C] or [B, C, L]"),
        ("batch_norm2d", &[4, 7][..], "[B, C, H, W]"),
        ("batch_norm1d", &[5][..], "num_features = 4"),
    ] {
        let err = build(op, shape).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("bn"),
            "{op} {shape:?}: {err}"
        );
    }
}

/// group_norm (also InstanceNorm2d as one channel per group) against PyTorch: LayerNorm's
/// row statistics over a group's `(C/G)·spatial` elements (up to 30 here) and an exact
/// per-channel affine map (`inverseSqrt(1)` within 2 ulp): the LayerNorm bounds.
#[test]
fn group_norm_layer_matches_pytorch() {
    for name in [
        "group_norm_pairs",
        "group_norm_one_group",
        "group_norm_instance",
    ] {
        let f = OpFixture::load(name);
        assert_eq!(f.op, "group_norm");
        op_fixtures::check_layer(
            &f,
            Tolerances {
                forward: 1e-6,
                backward: 1e-5,
            },
        );
    }
}

#[test]
fn group_norm_refusals() {
    let build = |attrs: serde_json::Value, shape: &[usize]| {
        let node = ekfac::graph::Node::new(
            "gn",
            "group_norm",
            vec!["x".into()],
            attrs.as_object().cloned().unwrap(),
        );
        ekfac::layers::build(&node, &[shape]).map(|_| ())
    };
    for (attrs, shape, want) in [
        (
            serde_json::json!({"num_groups": 3, "num_channels": 4}),
            &[4, 2][..],
            "divide num_channels",
        ),
        (
            serde_json::json!({"num_groups": 2, "num_channels": 4}),
            &[6, 2][..],
            "[B, 4, *]",
        ),
        (
            serde_json::json!({"num_groups": 2, "num_channels": 4, "eps": -1.0}),
            &[4, 2][..],
            "eps",
        ),
    ] {
        let err = build(attrs.clone(), shape).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("gn"), "{attrs}: {err}");
    }
}
