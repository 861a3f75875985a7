//! The GPU loss kernel against the f64 reference `ekfac::loss` and the Philox bits
//! against `ekfac::rng`.
//!
//! Tolerance: logits are f32 and the CPU sees their exact f64 copies, so differences
//! come from f32 arithmetic only: softmax/sigmoid (exp to a few ulp), square roots and,
//! for MSE MC, Box–Muller from exact range reductions and series (≈1e-7 relative). Every
//! entry must agree to 2e-6 × the largest |V| of the configuration (≈ 30 f32 ulps, of
//! which the arithmetic above uses a handful). MC draws are bit-identical uniforms
//! compared against f32 vs f64 probabilities, so a categorical or Bernoulli draw may
//! differ only when the uniform lies within 1e-5 of a boundary; such rows are
//! accepted only if the f64 computation confirms that.

mod common;

use ekfac::curvature::{FisherType, LossKind, Options, Reduction};
use ekfac::loss::gpu::{GpuTargets, backprop_vectors};
use ekfac::loss::{self, Targets, sigmoid, softmax};
use ekfac::ops::loss::philox_blocks;
use ekfac::rng::{Philox, philox4x32_10};

#[test]
fn philox_bits_match_the_cpu() {
    let Some(ctx) = common::gpu() else { return };
    for seed in [0u64, 2147483647, 0xDEAD_BEEF_0123_4567] {
        let (start, batch, samples, outputs) = (4_000_000_000usize, 7, 3, 5);
        let got = philox_blocks(&ctx, seed, start, batch, samples, outputs).unwrap();
        let key = ekfac::rng::key(seed);
        let mut i = 0;
        for n in 0..batch {
            for m in 0..samples {
                for c in 0..outputs {
                    let want = philox4x32_10([(start + n) as u32, m as u32, c as u32, 0], key);
                    assert_eq!(
                        &got[i..i + 4],
                        &want,
                        "seed {seed:x} counter ({n}, {m}, {c})"
                    );
                    i += 4;
                }
            }
        }
    }
}

#[test]
fn vectors_match_the_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let mut rng = common::TestRng::new(11);
    let (batch, outputs, start, num_data) = (37, 4, 1000, 2000);
    // Logits with a spread of magnitudes, f32-representable.
    let logits32: Vec<f32> = rng.vec(batch * outputs).iter().map(|v| v * 3.0).collect();
    let logits: Vec<f64> = logits32.iter().map(|&v| f64::from(v)).collect();
    let classes: Vec<usize> = (0..batch).map(|n| (n * 7 + 3) % outputs).collect();
    let binary: Vec<f64> = (0..batch * outputs)
        .map(|i| ((i * 5 + 1) % 3 == 0) as u8 as f64)
        .collect();
    let soft: Vec<f64> = rng
        .vec(batch * outputs)
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let gpu_logits = ctx.upload(&logits32, &[batch, outputs]).unwrap();
    let gpu_classes = ctx
        .upload_u32(
            &classes.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            &[batch],
        )
        .unwrap();

    for loss in [
        LossKind::Mse,
        LossKind::CrossEntropy,
        LossKind::BceWithLogits,
    ] {
        let dense = if loss == LossKind::Mse {
            &soft
        } else {
            &binary
        };
        let dense32: Vec<f32> = dense.iter().map(|&v| v as f32).collect();
        let gpu_dense = ctx.upload(&dense32, &[batch, outputs]).unwrap();
        let (cpu_targets, gpu_targets) = match loss {
            LossKind::CrossEntropy => (
                Targets::Classes(&classes),
                GpuTargets::Classes(&gpu_classes),
            ),
            _ => (Targets::Dense(dense), GpuTargets::Dense(&gpu_dense)),
        };
        for reduction in [Reduction::Mean, Reduction::Sum] {
            for (fisher, mc_samples) in [
                (FisherType::Type2, 1),
                (FisherType::Empirical, 1),
                (FisherType::Mc, 3),
            ] {
                let opts = Options {
                    loss,
                    reduction,
                    fisher,
                    mc_samples,
                    seed: 12345,
                    ..Options::default()
                };
                let what = format!("{loss} {reduction} {fisher}");
                let want =
                    loss::backprop_vectors(&opts, &logits, outputs, cpu_targets, start, num_data)
                        .unwrap();
                let (v, kappa) =
                    backprop_vectors(&ctx, &opts, &gpu_logits, gpu_targets, start, num_data)
                        .unwrap();
                assert_eq!(kappa, want.kappa, "{what}: kappa");
                assert_eq!(
                    v.shape(),
                    &[want.num_vectors, batch, outputs],
                    "{what}: shape"
                );
                let got = ctx.read(&v).unwrap();
                let max = want.values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let tol = 2e-6 * max;
                let rng = Philox::new(opts.seed);
                let mut boundary_rows = 0;
                let worst = got
                    .iter()
                    .zip(&want.values)
                    .map(|(&g, &w)| (f64::from(g) - w).abs() / max)
                    .fold(0.0, f64::max);
                eprintln!("{what}: max |GPU − CPU| / max|V| = {worst:.1e}");
                for (row, (g, w)) in got
                    .chunks(outputs)
                    .zip(want.values.chunks(outputs))
                    .enumerate()
                {
                    let ok = g
                        .iter()
                        .zip(w)
                        .all(|(&g, &w)| (f64::from(g) - w).abs() <= tol);
                    if ok {
                        continue;
                    }
                    // Only an MC draw at a probability boundary may differ.
                    let (m, n) = (row / batch, row % batch);
                    let f = &logits[n * outputs..(n + 1) * outputs];
                    let near = match (fisher, loss) {
                        (FisherType::Mc, LossKind::CrossEntropy) => {
                            let u = rng.uniform((start + n) as u32, m as u32, 0);
                            let mut cdf = 0.0;
                            softmax(f).iter().any(|p| {
                                cdf += p;
                                (u - cdf).abs() < 1e-5
                            })
                        }
                        (FisherType::Mc, LossKind::BceWithLogits) => (0..outputs).any(|c| {
                            let u = rng.uniform((start + n) as u32, m as u32, c as u32);
                            (u - sigmoid(f[c])).abs() < 1e-5
                        }),
                        _ => false,
                    };
                    assert!(
                        near,
                        "{what}: row {row}: GPU {g:?} vs CPU {w:?} (tolerance {tol:e})"
                    );
                    boundary_rows += 1;
                }
                assert!(
                    boundary_rows <= 1,
                    "{what}: {boundary_rows} rows at draw boundaries"
                );
            }
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let Some(ctx) = common::gpu() else { return };
    let logits = ctx.upload(&[0.0; 6], &[2, 3]).unwrap();
    let classes = ctx.upload_u32(&[0, 1], &[2]).unwrap();
    let opts = Options {
        loss: LossKind::Mse,
        fisher: FisherType::Type2,
        ..Options::default()
    };
    let err =
        backprop_vectors(&ctx, &opts, &logits, GpuTargets::Classes(&classes), 0, 2).unwrap_err();
    assert!(err.to_string().contains("dense"), "{err}");
    let opts = Options {
        fisher: FisherType::ForwardOnly,
        ..Options::default()
    };
    let err =
        backprop_vectors(&ctx, &opts, &logits, GpuTargets::Classes(&classes), 0, 2).unwrap_err();
    assert!(err.to_string().contains("forward-only"), "{err}");
    let short = ctx.upload_u32(&[0], &[1]).unwrap();
    let err = backprop_vectors(
        &ctx,
        &Options {
            fisher: FisherType::Type2,
            ..Options::default()
        },
        &logits,
        GpuTargets::Classes(&short),
        0,
        2,
    )
    .unwrap_err();
    assert!(err.to_string().contains("class indices"), "{err}");
}
