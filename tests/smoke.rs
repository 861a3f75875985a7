mod common;

#[test]
fn relu_runs_on_the_device() {
    let Some(ctx) = common::gpu() else { return };
    let x = ctx.upload(&[-1.0, 0.0, 2.5, -0.0], &[4]).unwrap();
    let y = ekfac::ops::activation::relu(&ctx, &x).unwrap();
    assert_eq!(ctx.read(&y).unwrap(), vec![0.0, 0.0, 2.5, 0.0]);
}

/// The crate runs on a device and queue that the host application created and owns.
#[test]
fn adopts_a_device_the_host_application_created() {
    let Some(_shared) = common::gpu() else { return };
    let ctx = common::host_device(wgpu::Limits::default())
        .expect("an adapter exists: the shared device was created");
    let x = ctx.upload(&[-3.0, 1.5], &[2]).unwrap();
    let y = ekfac::ops::activation::relu(&ctx, &x).unwrap();
    assert_eq!(ctx.read(&y).unwrap(), vec![0.0, 1.5]);
    assert!(ctx.check_errors("adopted device").is_ok());
}
