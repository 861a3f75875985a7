//! GEMM microbenchmark: GFLOP/s of `ops::gemm` for a few shapes on the chosen adapter.
//!
//! `cargo run --release --example gemm_bench [-- --quick] [--runs N]`
//!
//! Each shape runs once to compile its pipeline, then `runs` times (default 5); each
//! run is timed on the host around record + submit + wait, and the median is
//! reported. `--quick` divides every dimension by 4 (for the software driver).
//! The adapter is chosen as by the crate (`WGPU_BACKEND`, `EKFAC_ADAPTER`).

use std::time::Instant;

use ekfac::gpu::GpuContext;
use ekfac::ops::gemm::{Gemm, gemm};

struct Case {
    label: &'static str,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    batch: usize,
}

const CASES: &[Case] = &[
    Case {
        label: "A·B",
        m: 512,
        n: 512,
        k: 512,
        trans_a: false,
        trans_b: false,
        batch: 1,
    },
    Case {
        label: "A·B",
        m: 1024,
        n: 1024,
        k: 1024,
        trans_a: false,
        trans_b: false,
        batch: 1,
    },
    Case {
        label: "Aᵀ·B (covariance)",
        m: 512,
        n: 784,
        k: 8192,
        trans_a: true,
        trans_b: false,
        batch: 1,
    },
    Case {
        label: "A·Bᵀ",
        m: 1024,
        n: 1024,
        k: 1024,
        trans_a: false,
        trans_b: true,
        batch: 1,
    },
    Case {
        label: "A·B, odd sizes",
        m: 1001,
        n: 999,
        k: 1003,
        trans_a: false,
        trans_b: false,
        batch: 1,
    },
    Case {
        label: "batched A·B",
        m: 256,
        n: 256,
        k: 256,
        trans_a: false,
        trans_b: false,
        batch: 16,
    },
    Case {
        label: "1×n (sum over rows)",
        m: 1,
        n: 512,
        k: 65536,
        trans_a: false,
        trans_b: false,
        batch: 1,
    },
];

fn main() -> ekfac::Result<()> {
    let mut quick = false;
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&r| r > 0)
                    .ok_or_else(|| {
                        ekfac::Error::Options("--runs needs a positive integer".into())
                    })?;
            }
            other => {
                return Err(ekfac::Error::Options(format!(
                    "unknown argument {other:?} (expected --quick or --runs N)"
                )));
            }
        }
    }
    let ctx = GpuContext::new()?;
    let a = ctx.adapter_summary();
    println!(
        "adapter: {} ({}, {}, {})",
        a.name, a.backend, a.driver, a.device_type
    );
    println!(
        "{:<22} {:>6} {:>6} {:>6} {:>5} {:>10} {:>9}",
        "case", "m", "n", "k", "batch", "median ms", "GFLOP/s"
    );
    let shrink = if quick { 4 } else { 1 };
    for case in CASES {
        let [m, n, k] = [case.m, case.n, case.k].map(|d| (d / shrink).max(1));
        let g = Gemm::new(m, n, k, case.trans_a, case.trans_b).batched(case.batch);
        let fill = |len: usize| {
            (0..len)
                .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
                .collect::<Vec<_>>()
        };
        let ta = ctx.upload(&fill(case.batch * m * k), &[case.batch * m * k])?;
        let tb = ctx.upload(&fill(case.batch * k * n), &[case.batch * k * n])?;
        let tc = ctx.zeros(&[case.batch * m * n])?;
        let mut times = Vec::with_capacity(runs);
        for run in 0..=runs {
            let start = Instant::now();
            let mut rec = ctx.recorder();
            gemm(&mut rec, &g, &ta, &tb, &tc)?;
            rec.submit()?;
            ctx.wait("gemm benchmark")?;
            if run > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>5} {:>10.3} {:>9.1}",
            case.label,
            m,
            n,
            k,
            case.batch,
            median * 1e3,
            g.flops() / median / 1e9
        );
    }
    Ok(())
}
