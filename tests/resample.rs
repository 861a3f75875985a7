//! Nearest upsampling and adaptive average pooling: the f64 reference against PyTorch
//! autograd fixtures, then the GPU kernels against both, for stacks of gradients.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::ops::resample;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, Tolerances, rel_err64};
use serde_json::json;

/// GPU sums of at most `k` f32 terms (upsampling's `SH·SW` block, a pooling window) in
/// the reference's order, and one division: at most `k·2⁻²⁴` relative to the sum of
/// the terms' magnitudes. The largest window here holds 323 elements (17×19 pooled to
/// 1×1), where random signs make the sum about √323 times smaller than the sum of
/// magnitudes, but rounding errors of random sign also grow like √k rather than k:
/// about 323·6e-8 ≈ 2e-5 per such element in the worst case, 1e-5 in norm over all
/// outputs (observed ≤ 6.2e-7).
const GPU_TOL: f64 = 1e-5;

fn read64(ctx: &GpuContext, t: &GpuTensor) -> Vec<f64> {
    ctx.read(t).unwrap().into_iter().map(f64::from).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

/// How one op resizes planes: upsampling by a factor or adaptive pooling to a size.
#[derive(Clone, Copy, Debug)]
enum Resize {
    Upsample([usize; 2]),
    AdaptivePool([usize; 2]),
}

impl Resize {
    fn out_shape(self, [n, c, h, w]: [usize; 4]) -> [usize; 4] {
        match self {
            Resize::Upsample([sh, sw]) => [n, c, h * sh, w * sw],
            Resize::AdaptivePool([oh, ow]) => [n, c, oh, ow],
        }
    }

    fn reference(self, x: &[f64], shape: [usize; 4], grad: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let stacked = [
            shape[0] * grad.len() / self.out_shape(shape).iter().product::<usize>(),
            shape[1],
            shape[2],
            shape[3],
        ];
        match self {
            Resize::Upsample(f) => (
                reference::upsample_nearest2d_forward(x, shape, f),
                reference::upsample_nearest2d_backward(grad, stacked, f),
            ),
            Resize::AdaptivePool(s) => (
                reference::adaptive_avg_pool2d_forward(x, shape, s),
                reference::adaptive_avg_pool2d_backward(grad, stacked, s),
            ),
        }
    }

    /// The op on the GPU: its forward output and its backward for `grad` (a stack).
    fn gpu(
        self,
        ctx: &GpuContext,
        x: &[f32],
        shape: [usize; 4],
        grad: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        let out = self.out_shape(shape);
        let stack = grad.len() / out.iter().product::<usize>();
        let (mut out_stacked, mut in_stacked) = (out, shape);
        out_stacked[0] *= stack;
        in_stacked[0] *= stack;
        let xg = ctx.upload(x, &shape).unwrap();
        let y = ctx.zeros(&out).unwrap();
        let g = ctx.upload(grad, &out_stacked).unwrap();
        let dx = ctx.zeros(&in_stacked).unwrap();
        let mut rec = ctx.recorder();
        match self {
            Resize::Upsample(f) => {
                resample::upsample_nearest2d_forward(&mut rec, &xg, f, &y).unwrap();
                resample::upsample_nearest2d_backward(&mut rec, &g, f, &dx).unwrap();
            }
            Resize::AdaptivePool(_) => {
                resample::adaptive_avg_pool2d_forward(&mut rec, &xg, &y).unwrap();
                resample::adaptive_avg_pool2d_backward(&mut rec, &g, &dx).unwrap();
            }
        }
        rec.submit().unwrap();
        (read64(ctx, &y), read64(ctx, &dx))
    }
}

/// The upsample_nearest2d and adaptive_avg_pool2d layers, built from the fixtures'
/// `model.json` attributes, against PyTorch; upsampling copies exactly.
#[test]
fn resampling_layers_match_pytorch() {
    for name in [
        "upsample_nearest2d_2",
        "upsample_nearest2d_2x3",
        "adaptive_avg_pool2d_1x1",
        "adaptive_avg_pool2d_3x2",
        "adaptive_avg_pool2d_5x4",
    ] {
        let f = OpFixture::load(name);
        let tol = Tolerances {
            forward: GPU_TOL,
            backward: GPU_TOL,
        };
        let Some((y, _)) = op_fixtures::check_layer(&f, tol) else {
            return;
        };
        if f.op == "upsample_nearest2d" {
            assert_eq!(y, f.values("output"), "{name}: upsampling copies");
        }
    }
}

/// Attributes and input shapes the layers cannot take are errors naming the node.
#[test]
fn bad_layers_are_refused_by_name() {
    let cases = [
        (
            "upsample_nearest2d",
            json!({"scale_factor": 1.5}),
            vec![3, 4, 4],
            "positive integer",
        ),
        (
            "upsample_nearest2d",
            json!({"scale_factor": [2, 0]}),
            vec![3, 4, 4],
            "positive integer",
        ),
        (
            "upsample_nearest2d",
            json!({"scale_factor": 2, "mode": "bilinear"}),
            vec![3, 4, 4],
            "mode",
        ),
        (
            "upsample_nearest2d",
            json!({"scale_factor": 2}),
            vec![3, 4],
            "4-D input",
        ),
        (
            "upsample_nearest2d",
            json!({}),
            vec![3, 4, 4],
            "scale_factor",
        ),
        (
            "adaptive_avg_pool2d",
            json!({"output_size": 0}),
            vec![3, 4, 4],
            "positive integer",
        ),
        (
            "adaptive_avg_pool2d",
            json!({"output_size": [2, 2, 2]}),
            vec![3, 4, 4],
            "list of 2",
        ),
        (
            "adaptive_avg_pool2d",
            json!({"output_size": 1}),
            vec![48],
            "4-D input",
        ),
    ];
    for (op, attrs, shape, message) in cases {
        let err = common::build_error("resize", op, &attrs, &shape);
        assert!(
            err.contains("node \"resize\"") && err.contains(message),
            "{op} {attrs}: {err}"
        );
    }
    // Integral floats (PyTorch writes scale_factor=2.0) and null sizes (keep the input's)
    // are accepted.
    let build = |op: &str, attrs: serde_json::Value| {
        let node = ekfac::graph::Node::new(
            "r",
            op,
            vec!["x".into()],
            attrs.as_object().unwrap().clone(),
        );
        ekfac::layers::build(&node, &[&[3, 4, 5]])
            .unwrap()
            .output_shape()
            .to_vec()
    };
    assert_eq!(
        build("upsample_nearest2d", json!({"scale_factor": [2.0, 3]})),
        [3, 8, 15]
    );
    assert_eq!(
        build("adaptive_avg_pool2d", json!({"output_size": [null, 2]})),
        [3, 4, 2]
    );
}

/// Factors 1, unequal and large; pooled sizes 1×1, equal to the input, larger than
/// the input, coprime with it; planes larger than a workgroup; stacks of 1 to 3.
#[test]
fn resampling_gpu_matches_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = TestRng::new(9);
    for (shape, resize, stack) in [
        ([2, 3, 5, 4], Resize::Upsample([1, 1]), 2),
        ([1, 2, 3, 5], Resize::Upsample([3, 2]), 3),
        ([2, 1, 9, 11], Resize::Upsample([4, 4]), 1),
        ([2, 3, 17, 19], Resize::AdaptivePool([1, 1]), 2),
        ([1, 2, 6, 6], Resize::AdaptivePool([6, 6]), 2),
        ([2, 2, 4, 3], Resize::AdaptivePool([7, 5]), 3),
        ([1, 3, 10, 13], Resize::AdaptivePool([3, 4]), 1),
    ] {
        let x = rng.vec(shape.iter().product());
        let out: usize = resize.out_shape(shape).iter().product();
        let grad = rng.vec(out * stack);
        let (want_y, want_dx) = resize.reference(&to64(&x), shape, &to64(&grad));
        let (y, dx) = resize.gpu(&ctx, &x, shape, &grad);
        let e = rel_err64(&y, &want_y);
        assert!(e < GPU_TOL, "{resize:?} {shape:?}: forward error {e:e}");
        let e = rel_err64(&dx, &want_dx);
        assert!(e < GPU_TOL, "{resize:?} {shape:?}: backward error {e:e}");
    }
}

/// Shapes that do not fit are errors that say why, not panics.
#[test]
fn bad_arguments_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let x = ctx.zeros(&[2, 3, 4, 4]).unwrap();
    let y = ctx.zeros(&[2, 3, 8, 12]).unwrap();
    let flat = ctx.zeros(&[2, 48]).unwrap();
    let other = ctx.zeros(&[2, 4, 2, 2]).unwrap();
    let mut rec = ctx.recorder();
    let err = resample::upsample_nearest2d_forward(&mut rec, &x, [2, 2], &y).unwrap_err();
    assert!(
        err.to_string().contains("upsampled by [2, 2] is [8, 8]"),
        "{err}"
    );
    let err = resample::upsample_nearest2d_backward(&mut rec, &y, [0, 3], &x).unwrap_err();
    assert!(err.to_string().contains("factors ≥ 1"), "{err}");
    let err = resample::adaptive_avg_pool2d_forward(&mut rec, &flat, &x).unwrap_err();
    assert!(err.to_string().contains("x must be [N, C, H, W]"), "{err}");
    let err = resample::adaptive_avg_pool2d_backward(&mut rec, &other, &x).unwrap_err();
    assert!(err.to_string().contains("share N and C"), "{err}");
    assert!(rec.is_empty());
}
