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
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .expect("an adapter exists: the shared device was created");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).unwrap();
    let ctx = ekfac::gpu::GpuContext::from_device(device, queue, adapter.get_info());
    let x = ctx.upload(&[-3.0, 1.5], &[2]).unwrap();
    let y = ekfac::ops::activation::relu(&ctx, &x).unwrap();
    assert_eq!(ctx.read(&y).unwrap(), vec![0.0, 1.5]);
    assert!(ctx.check_errors("adopted device").is_ok());
}
