//! add, gradient accumulation and cat: the f64 reference against PyTorch autograd
//! fixtures, then the GPU kernels against both.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::ops::combine;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, Tolerances};
use serde_json::json;

fn read64(ctx: &GpuContext, t: &GpuTensor) -> Vec<f64> {
    ctx.read(t).unwrap().into_iter().map(f64::from).collect()
}

/// The add layer against PyTorch: `a + b` of two f32 values is their exact sum rounded
/// once, within 2⁻²⁴ relative of PyTorch's float64 sum element by element; the backward
/// passes the gradient to both inputs exactly.
#[test]
fn add_layer_matches_pytorch() {
    let f = OpFixture::load("add");
    assert_eq!(f.op, "add");
    let tol = Tolerances {
        forward: 1e-7,
        backward: 0.0,
    };
    let Some((y, grads)) = op_fixtures::check_layer(&f, tol) else {
        return;
    };
    for (g, w) in y.iter().zip(&f.values("output")) {
        assert!(
            (g - w).abs() <= w.abs() * f64::from(f32::EPSILON) / 2.0,
            "{g} vs {w}"
        );
    }
    for g in grads {
        assert_eq!(g, f.values("grad_output"));
    }
}

/// GPU cat of `inputs` (values and shapes) along `axis`, and its backward for a stack of
/// `stack` gradients: copies, so both must equal the reference exactly. Returns the
/// forward output.
fn check_cat(
    ctx: &GpuContext,
    inputs: &[(Vec<f32>, Vec<usize>)],
    axis: usize,
    grad: &[f32],
    stack: usize,
) -> Vec<f32> {
    let to64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(a)).collect() };
    let inputs64: Vec<(Vec<f64>, Vec<usize>)> =
        inputs.iter().map(|(v, s)| (to64(v), s.clone())).collect();
    let views: Vec<(&[f64], &[usize])> = inputs64.iter().map(|(v, s)| (&v[..], &s[..])).collect();
    let (want_y, shape) = reference::cat_forward(&views, axis);
    let mut stacked = shape.clone();
    stacked[0] *= stack;
    let sizes: Vec<usize> = inputs.iter().map(|(_, s)| s[axis]).collect();
    let want_dx = reference::cat_backward(&to64(grad), &stacked, axis, &sizes);

    let xs: Vec<GpuTensor> = inputs
        .iter()
        .map(|(v, s)| ctx.upload(v, s).unwrap())
        .collect();
    let y = ctx.zeros(&shape).unwrap();
    let g = ctx.upload(grad, &stacked).unwrap();
    let dxs: Vec<GpuTensor> = inputs
        .iter()
        .map(|(_, s)| {
            let mut s = s.clone();
            s[0] *= stack;
            ctx.zeros(&s).unwrap()
        })
        .collect();
    let mut rec = ctx.recorder();
    combine::cat_forward(&mut rec, &xs.iter().collect::<Vec<_>>(), axis, &y).unwrap();
    combine::cat_backward(&mut rec, &g, axis, &dxs.iter().collect::<Vec<_>>()).unwrap();
    rec.submit().unwrap();
    assert_eq!(read64(ctx, &y), want_y, "cat forward along {axis}");
    for (dx, want) in dxs.iter().zip(&want_dx) {
        assert_eq!(&read64(ctx, dx), want, "cat backward along {axis}");
    }
    ctx.read(&y).unwrap()
}

/// The cat layer against PyTorch: copies, exact both ways.
#[test]
fn cat_layer_matches_pytorch() {
    let f = OpFixture::load("cat_channels");
    assert_eq!(f.op, "cat");
    let tol = Tolerances {
        forward: 0.0,
        backward: 0.0,
    };
    op_fixtures::check_layer(&f, tol);
}

/// Gradients of an add whose two inputs are the same value, and of an add fed by a
/// value that also feeds a second node: the executor sums each value's gradients in
/// place, so the add must not hand out two views of one buffer.
#[test]
fn add_gradients_do_not_share_buffers() {
    use ekfac::layers::{BackwardArgs, Pass};
    let Some(ctx) = common::gpu() else { return };
    let node = ekfac::graph::Node::new(
        "add",
        "add",
        vec!["x".into(), "x".into()],
        Default::default(),
    );
    let layer = ekfac::layers::build(&node, &[&[3], &[3]]).unwrap();
    let x = ctx.upload(&[1.0, 2.0, 3.0], &[1, 3]).unwrap();
    let g = ctx
        .upload(&[1.0, -1.0, 0.5, 2.0, 4.0, 8.0], &[2, 3])
        .unwrap();
    let mut pass = Pass::new(&ctx);
    let grads = layer
        .backward(
            &mut pass,
            &BackwardArgs {
                stack: 2,
                batch: 1,
                grad_out: &g,
                inputs: &[&x, &x],
                output: &x,
                params: &[],
                input_grads: &[true, true],
                param_grads: false,
            },
        )
        .unwrap();
    let [Some(a), Some(b)] = &grads.inputs[..] else {
        panic!("both inputs need gradients")
    };
    // What the executor does where a value fans out: add one gradient into the other.
    ekfac::ops::reduce::axpy(&mut pass.rec, 1.0, b, 1.0, a).unwrap();
    pass.submit().unwrap();
    assert_eq!(ctx.read(a).unwrap(), [2.0, -2.0, 1.0, 4.0, 8.0, 16.0]);
    assert_eq!(ctx.read(b).unwrap(), [1.0, -1.0, 0.5, 2.0, 4.0, 8.0]);
}

/// Shapes and attributes the layers cannot take are errors naming the node.
#[test]
fn bad_layers_are_refused_by_name() {
    let cases: [(&str, serde_json::Value, Vec<Vec<usize>>, &str); 6] = [
        ("add", json!({}), vec![vec![3, 4], vec![3, 5]], "same shape"),
        ("add", json!({}), vec![vec![3, 4]], "two inputs"),
        (
            "add",
            json!({"alpha": 2}),
            vec![vec![3], vec![3]],
            "unknown attribute",
        ),
        (
            "cat",
            json!({"dim": 0}),
            vec![vec![3, 4], vec![2, 4]],
            "dim 0, cannot",
        ),
        (
            "cat",
            json!({"dim": 1}),
            vec![vec![3, 4], vec![2, 5]],
            "every dimension but dim 1",
        ),
        ("cat", json!({}), vec![vec![3]], "missing attribute \"dim\""),
    ];
    for (op, attrs, shapes, message) in cases {
        let inputs: Vec<String> = (0..shapes.len()).map(|i| format!("v{i}")).collect();
        let node = ekfac::graph::Node::new("merge", op, inputs, attrs.as_object().unwrap().clone());
        let shapes: Vec<&[usize]> = shapes.iter().map(|s| &s[..]).collect();
        let err = ekfac::layers::build(&node, &shapes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node \"merge\"") && err.contains(message),
            "{op} {attrs}: {err}"
        );
    }
}

/// Every axis of a 4-D tensor (the batch axis too), parts of size 1, two parts and
/// four, a stack of gradients, and more elements than one workgroup.
#[test]
fn cat_gpu_matches_reference_on_every_axis() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(6);
    let base = [2, 3, 4, 5];
    for (axis, sizes, stack) in [
        (0, vec![1, 2], 1),
        (1, vec![3, 1, 2, 7], 2),
        (2, vec![4, 4], 3),
        (3, vec![1, 5, 2], 2),
    ] {
        let inputs: Vec<(Vec<f32>, Vec<usize>)> = sizes
            .iter()
            .map(|&k| {
                let mut s = base.to_vec();
                s[axis] = k;
                (rng.vec(s.iter().product()), s)
            })
            .collect();
        let total: usize = inputs.iter().map(|(v, _)| v.len()).sum();
        let grad = rng.vec(total * stack);
        check_cat(&ctx, &inputs, axis, &grad, stack);
    }
}

/// Shapes that do not concatenate are errors that say why, not panics.
#[test]
fn bad_arguments_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let a = ctx.zeros(&[2, 3, 4, 4]).unwrap();
    let b = ctx.zeros(&[2, 2, 4, 5]).unwrap();
    let y = ctx.zeros(&[2, 5, 4, 4]).unwrap();
    let mut rec = ctx.recorder();
    let err = combine::cat_forward(&mut rec, &[&a, &b], 1, &y).unwrap_err();
    assert!(err.to_string().contains("part 1 [2, 2, 4, 5]"), "{err}");
    let err = combine::cat_forward(&mut rec, &[&a, &a], 1, &y).unwrap_err();
    assert!(err.to_string().contains("do not add up"), "{err}");
    let err = combine::cat_backward(&mut rec, &y, 4, &[&a]).unwrap_err();
    assert!(err.to_string().contains("axis 4"), "{err}");
    let err = combine::add(&mut rec, &a, &b, &y).unwrap_err();
    assert!(err.to_string().contains("b must have 96 elements"), "{err}");
    assert!(rec.is_empty());
}
