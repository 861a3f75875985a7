//! add, gradient accumulation and cat: the f64 reference against PyTorch autograd
//! fixtures, then the GPU kernels against both.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::ops::combine;
use ekfac::reference::graph_ops as reference;
use op_fixtures::OpFixture;

fn read64(ctx: &GpuContext, t: &GpuTensor) -> Vec<f64> {
    ctx.read(t).unwrap().into_iter().map(f64::from).collect()
}

/// `a + b` of two f32 values is their exact sum rounded once: every element within
/// 2⁻²⁴ relative of PyTorch's float64 sum. The backward of `add` is the identity,
/// which PyTorch's gradients confirm exactly.
#[test]
fn add_matches_pytorch() {
    let f = OpFixture::load("add");
    assert_eq!(f.op, "add");
    let (a, shape) = f.get("x0");
    let b = f.values("x1");
    let want = f.values("output");
    assert_eq!(reference::add_forward(&a, &b), want);
    assert_eq!(f.values("grad_x0"), f.values("grad_output"));
    assert_eq!(f.values("grad_x1"), f.values("grad_output"));

    let Some(ctx) = common::gpu() else { return };
    let ag = ctx.upload(&f.f32("x0"), &shape).unwrap();
    let bg = ctx.upload(&f.f32("x1"), &shape).unwrap();
    let y = ctx.zeros(&shape).unwrap();
    let mut rec = ctx.recorder();
    combine::add(&mut rec, &ag, &bg, &y).unwrap();
    rec.submit().unwrap();
    for (g, w) in read64(&ctx, &y).iter().zip(&want) {
        assert!(
            (g - w).abs() <= w.abs() * f64::from(f32::EPSILON) / 2.0,
            "{g} vs {w}"
        );
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

#[test]
fn cat_matches_pytorch() {
    let f = OpFixture::load("cat_channels");
    assert_eq!(f.op, "cat");
    let axis = f.attrs["dim"].as_u64().unwrap() as usize;
    let names = ["x0", "x1", "x2"];
    let inputs: Vec<(Vec<f64>, Vec<usize>)> = names.iter().map(|n| f.get(n)).collect();
    let views: Vec<(&[f64], &[usize])> = inputs.iter().map(|(v, s)| (&v[..], &s[..])).collect();
    let (y, shape) = reference::cat_forward(&views, axis);
    assert_eq!(y, f.values("output"));
    let sizes: Vec<usize> = inputs.iter().map(|(_, s)| s[axis]).collect();
    let grads = reference::cat_backward(&f.values("grad_output"), &f.stacked(&shape), axis, &sizes);
    for (name, g) in names.iter().zip(&grads) {
        assert_eq!(g, &f.values(&format!("grad_{name}")), "grad_{name}");
    }

    let Some(ctx) = common::gpu() else { return };
    let inputs32: Vec<(Vec<f32>, Vec<usize>)> = names
        .iter()
        .zip(&inputs)
        .map(|(n, (_, s))| (f.f32(n), s.clone()))
        .collect();
    let y = check_cat(&ctx, &inputs32, axis, &f.f32("grad_output"), f.vectors);
    let y: Vec<f64> = y.into_iter().map(f64::from).collect();
    assert_eq!(y, f.values("output"));
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
