mod common;

#[test]
fn relu_runs_on_the_device() {
    let Some(ctx) = common::gpu() else { return };
    let x = ctx.upload(&[-1.0, 0.0, 2.5, -0.0], &[4]).unwrap();
    let y = ekfac::ops::activation::relu(&ctx, &x).unwrap();
    assert_eq!(ctx.read(&y).unwrap(), vec![0.0, 0.0, 2.5, 0.0]);
}
