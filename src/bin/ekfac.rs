fn main() {
    match ekfac::gpu::GpuContext::new() {
        Ok(ctx) => println!("{}", ctx.describe()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
