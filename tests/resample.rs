//! Nearest upsampling and adaptive average pooling: the f64 reference against PyTorch
//! autograd fixtures, then the GPU kernels against both, for stacks of gradients.

mod common;
mod op_fixtures;

use common::TestRng;
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::ops::resample;
use ekfac::reference::graph_ops as reference;
use op_fixtures::{OpFixture, rel_err64};

/// The reference reproduces PyTorch's float64 autograd up to float64 rounding.
const REFERENCE_TOL: f64 = 1e-12;

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

fn nchw(shape: &[usize]) -> [usize; 4] {
    shape.try_into().unwrap()
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

fn fixture_resize(f: &OpFixture) -> Resize {
    let pair = |v: &serde_json::Value| -> [usize; 2] {
        match v.as_u64() {
            Some(k) => [k as usize; 2],
            None => {
                let a = v.as_array().unwrap();
                [
                    a[0].as_u64().unwrap() as usize,
                    a[1].as_u64().unwrap() as usize,
                ]
            }
        }
    };
    match f.op.as_str() {
        "upsample_nearest2d" => Resize::Upsample(pair(&f.attrs["scale_factor"])),
        "adaptive_avg_pool2d" => Resize::AdaptivePool(pair(&f.attrs["output_size"])),
        other => panic!("{}: unexpected op {other}", f.name),
    }
}

#[test]
fn resampling_matches_pytorch() {
    for name in [
        "upsample_nearest2d_2",
        "upsample_nearest2d_2x3",
        "adaptive_avg_pool2d_1x1",
        "adaptive_avg_pool2d_3x2",
        "adaptive_avg_pool2d_5x4",
    ] {
        let f = OpFixture::load(name);
        let resize = fixture_resize(&f);
        let (x, shape) = f.get("x");
        let shape = nchw(&shape);
        let (want_y, want_dx) = (f.values("output"), f.values("grad_x"));
        let (y, dx) = resize.reference(&x, shape, &f.values("grad_output"));
        assert!(rel_err64(&y, &want_y) < REFERENCE_TOL, "{name} forward");
        assert!(rel_err64(&dx, &want_dx) < REFERENCE_TOL, "{name} backward");

        let Some(ctx) = common::gpu() else { return };
        let (y, dx) = resize.gpu(&ctx, &f.f32("x"), shape, &f.f32("grad_output"));
        let e = rel_err64(&y, &want_y);
        assert!(e < GPU_TOL, "{name}: forward error {e:e}");
        let e = rel_err64(&dx, &want_dx);
        assert!(e < GPU_TOL, "{name}: backward error {e:e}");
        if let Resize::Upsample(_) = resize {
            assert_eq!(y, want_y, "{name}: upsampling copies");
        }
    }
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
