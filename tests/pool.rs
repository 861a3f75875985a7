//! max_pool2d / avg_pool2d: the CPU reference on hand-worked windows, then the GPU
//! kernels against the CPU reference.

mod common;

use ekfac::cpu::ops;
use ekfac::geometry::Pool2dGeometry;

fn pool(
    batch: usize,
    channels: usize,
    in_size: [usize; 2],
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Pool2dGeometry {
    let geo = Pool2dGeometry {
        batch,
        channels,
        in_size,
        kernel_size,
        stride,
        padding,
    };
    geo.validate("test").expect("valid test geometry");
    geo
}

/// Ties go to the first maximum in row-major window order; padding is −∞, so an
/// all-negative window next to the border keeps its negative maximum; avg pooling
/// divides by KH·KW including padded zeros. Values worked by hand.
#[test]
fn cpu_pooling_on_hand_worked_windows() {
    // x = [[1, 3, 3], [3, 0, 2]], 2×2 windows, stride 1: both windows hold 3 first at (0, 1).
    let geo = pool(1, 1, [2, 3], [2, 2], [1, 1], [0, 0]);
    let x = [1.0, 3.0, 3.0, 3.0, 0.0, 2.0];
    let (y, argmax) = ops::max_pool2d_forward(&x, &geo);
    assert_eq!(y, [3.0, 3.0]);
    assert_eq!(argmax, [1, 1]);
    assert_eq!(
        ops::max_pool2d_backward(&[1.0, 10.0], &argmax, &geo),
        [0.0, 11.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(ops::avg_pool2d_forward(&x, &geo), [7.0 / 4.0, 8.0 / 4.0]);

    // Padding 1, 2×2 windows, stride 2 on x = −[[5, 1, 2], [3, 4, 6]]: windows
    // {(0,0)}, {(0,1),(0,2)}, {(1,0)}, {(1,1),(1,2)}.
    let geo = pool(1, 1, [2, 3], [2, 2], [2, 2], [1, 1]);
    let x = [-5.0, -1.0, -2.0, -3.0, -4.0, -6.0];
    let (y, argmax) = ops::max_pool2d_forward(&x, &geo);
    assert_eq!(y, [-5.0, -1.0, -3.0, -4.0]);
    assert_eq!(argmax, [0, 1, 3, 4]);
    assert_eq!(
        ops::avg_pool2d_forward(&x, &geo),
        [-5.0 / 4.0, -3.0 / 4.0, -3.0 / 4.0, -10.0 / 4.0]
    );
    assert_eq!(
        ops::avg_pool2d_backward(&[4.0, 8.0, 12.0, 16.0], &geo),
        [1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    );
}
