//! Natural-gradient training with KFAC and EKFAC preconditioning, against plain SGD, on
//! the bundled digits.
//!
//! `cargo run --release --example natural_gradient`
//!
//! The bundled classifier's architecture `Linear(64,32) - Tanh - Linear(32,10)` from a
//! fresh PyTorch-style random initialisation (weights and biases uniform in
//! `±1/√fan_in`, fixed seed), trained on examples `0..768` of the bundled 1024 digits in
//! minibatches of 128 taken in order (six per epoch); examples `768..1024` are held out.
//! Every method takes the same [`STEPS`] steps on the same minibatches from the same
//! initial weights `θ₀`:
//!
//! - **SGD**: `θ ← θ − η g`, with `g` the gradient of the minibatch's mean cross-entropy
//!   (the empirical-Fisher loss vectors `(p_n − e_{y_n})/B` of `reduction = mean`,
//!   one backward pass with parameter gradients, flattened in model order).
//! - **KFAC / EKFAC natural gradient**: each step fits the curvature of the current
//!   weights on the minibatch (type-2 Fisher, cross-entropy with mean reduction, so `F`
//!   is the Fisher of the same mean loss as `g`; warm-started from the previous step's
//!   eigenbases with `fit_from`) and steps along `(F + δI)⁻¹ g` (one `Operator::apply`
//!   with the exact damped inverse): `θ ← θ − η (F + δI)⁻¹ g`. No running averages of
//!   the factors, no momentum, no step-size control: the bare preconditioner.
//!
//! Each method's learning rate `η` is the best, by final training loss, of a small grid
//! ([`SGD_RATES`], [`NG_RATES`]) that the example runs and prints; `δ` is fixed to
//! [`DAMPING`]. The table shows, after every step, the mean loss over all 768 training
//! examples and the accuracy on the 256 held-out ones. The outcome is whatever it is
//! (no claim either way); wall-clock time is not compared.

use ekfac::curvature::fit::fit_from;
use ekfac::curvature::layout::{ParamKind, ParamLayout};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::state::CurvatureState;
use ekfac::curvature::{DampingMode, FisherType, Options, Reduction};
use ekfac::demo::{digits_labels, digits_options, digits_problem, digits_subset};
use ekfac::gpu::GpuContext;
use ekfac::graph::Model;
use ekfac::graph::Network;
use ekfac::loss::gpu::{GpuTargets, record_backprop_vectors};
use ekfac::model::data::Dataset;
use ekfac::{Error, Result};

/// Training examples (`0..TRAIN`); the rest of the bundled 1024 are held out.
const TRAIN: usize = 768;
/// Examples per minibatch.
const BATCH: usize = 128;
/// Steps of every method.
const STEPS: usize = 30;
/// `δ` of `(F + δI)⁻¹`.
const DAMPING: f64 = 1e-3;
/// Learning rates tried for SGD.
const SGD_RATES: [f64; 4] = [0.5, 1.0, 2.0, 4.0];
/// Learning rates tried for the natural-gradient methods.
const NG_RATES: [f64; 3] = [0.03, 0.1, 0.2];
/// Training loss the summary counts the steps to.
const TARGET_LOSS: f64 = 0.5;
/// Seed of the initial weights.
const SEED: u64 = 7;

/// A small deterministic generator (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f64) -> f32 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * unit - 1.0) * bound) as f32
    }
}

/// How the gradient is turned into a step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    Sgd,
    NaturalGradient(Approximation),
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Sgd => "SGD",
            Method::NaturalGradient(Approximation::Kfac) => "KFAC-NG",
            Method::NaturalGradient(Approximation::Ekfac) => "EKFAC-NG",
        }
    }
}

/// Mean loss over the training set and accuracy on the held-out set, after a step.
#[derive(Clone, Copy, Debug)]
struct Progress {
    train_loss: f64,
    test_accuracy: f64,
}

/// `model`'s architecture with PyTorch's default initialisation from `seed`.
fn fresh_model(model: &Model, seed: u64) -> Model {
    let mut rng = SplitMix64(seed);
    let mut fresh = model.clone();
    for (layer, params) in model.chain().unwrap().layers.iter().zip(&mut fresh.params) {
        let (Some(p), Some(shape)) = (params.as_mut(), layer.weight_shape()) else {
            continue;
        };
        let bound = 1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt();
        for (_, values) in &mut p.tensors {
            values.iter_mut().for_each(|w| *w = rng.uniform(bound));
        }
    }
    fresh
}

/// `model` with the parameters of the model-order vector `theta` (`[P]`).
fn with_params(model: &Model, layout: &ParamLayout, theta: &[f32]) -> Model {
    let mut out = model.clone();
    for p in &layout.params {
        let values = &theta[p.offset..p.offset + p.len()];
        let suffix = match p.kind {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
        };
        if let Some(t) = out.params[p.layer]
            .as_mut()
            .and_then(|params| params.get_mut(suffix))
        {
            t.copy_from_slice(values);
        }
    }
    out
}

/// The gradient of the mean cross-entropy of `batch` w.r.t. all parameters, flattened
/// in model order (`[P]`).
fn minibatch_gradient(
    ctx: &GpuContext,
    net: &Network,
    layout: &ParamLayout,
    batch: &Dataset,
) -> Result<Vec<f32>> {
    let b = batch.len;
    let x = ctx.upload(&batch.x, &[b, batch.example_len()])?;
    let y: Vec<u32> = digits_labels(batch).iter().map(|&c| c as u32).collect();
    let y = ctx.upload_u32(&y, &[b])?;
    let forward = net.forward(ctx, x)?;
    let vectors = ctx.zeros(&[1, b, net.num_outputs()])?;
    let options = Options {
        fisher: FisherType::Empirical,
        reduction: Reduction::Mean,
        ..digits_options()
    };
    let mut rec = ctx.recorder();
    record_backprop_vectors(
        &mut rec,
        &options,
        forward.output(),
        GpuTargets::Classes(&y),
        0,
        b,
        &vectors,
    )?;
    rec.submit()?;
    let backward = net.backward(ctx, &forward, &vectors, 1, true)?;
    let mut grad = Vec::with_capacity(layout.num_params);
    for p in &layout.params {
        let (weight, bias) = backward
            .param_grads(p.layer)
            .ok_or_else(|| Error::model(&p.name, "no parameter gradient"))?;
        let t = match p.kind {
            ParamKind::Weight => weight,
            ParamKind::Bias => bias.ok_or_else(|| Error::model(&p.name, "no bias gradient"))?,
        };
        grad.extend(ctx.read(t)?);
    }
    Ok(grad)
}

/// Mean cross-entropy over `data` and the fraction classified correctly.
fn evaluate(ctx: &GpuContext, net: &Network, data: &Dataset) -> Result<(f64, f64)> {
    let logits = ctx.read(
        net.forward(ctx, ctx.upload(&data.x, &[data.len, data.example_len()])?)?
            .output(),
    )?;
    let c = net.num_outputs();
    let (mut loss, mut correct) = (0.0, 0);
    for (f, &y) in logits.chunks_exact(c).zip(digits_labels(data)) {
        let max = f.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max)
            + f.iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln();
        loss += lse - f64::from(f[y as usize]);
        let predicted = (0..c).max_by(|&i, &j| f[i].total_cmp(&f[j])).unwrap_or(0);
        correct += usize::from(predicted == y as usize);
    }
    Ok((loss / data.len as f64, correct as f64 / data.len as f64))
}

/// [`STEPS`] steps of `method` with learning rate `lr` from `init`; the progress after
/// every step (entry 0: before the first).
fn train(
    ctx: &GpuContext,
    init: &Model,
    train: &Dataset,
    test: &Dataset,
    method: Method,
    lr: f64,
) -> Result<Vec<Progress>> {
    let options = digits_options();
    let layout = ParamLayout::from_options(init, &options)?;
    let mut theta = layout.flatten_params(init);
    let mut previous: Option<CurvatureState> = None;
    let mut history = Vec::with_capacity(STEPS + 1);
    for step in 0..=STEPS {
        let model = with_params(init, &layout, &theta);
        let net = Network::new(ctx, &model)?;
        let (train_loss, _) = evaluate(ctx, &net, train)?;
        let (_, test_accuracy) = evaluate(ctx, &net, test)?;
        history.push(Progress {
            train_loss,
            test_accuracy,
        });
        if step == STEPS || !train_loss.is_finite() {
            break;
        }
        let batch = digits_subset(train, (step * BATCH) % train.len, BATCH)?;
        let grad = minibatch_gradient(ctx, &net, &layout, &batch)?;
        let direction = match method {
            Method::Sgd => grad,
            Method::NaturalGradient(approx) => {
                let fitted = fit_from(
                    ctx,
                    &model,
                    &batch,
                    &options,
                    Some(DAMPING),
                    previous.as_ref(),
                )?;
                let direction = Operator::new(ctx, &fitted.state)?.apply(
                    &grad,
                    1,
                    approx,
                    Transform::Inverse {
                        damping: DAMPING,
                        mode: DampingMode::Exact,
                    },
                )?;
                previous = Some(fitted.state);
                direction
            }
        };
        for (t, d) in theta.iter_mut().zip(&direction) {
            *t -= (lr * f64::from(*d)) as f32;
        }
    }
    Ok(history)
}

fn main() -> Result<()> {
    // SAFETY: the first statement of main: no other thread exists.
    unsafe { ekfac::progress::quiet_headless_vulkan() };
    let (bundled, data) = digits_problem()?;
    let ctx = GpuContext::new()?;
    let init = fresh_model(&bundled, SEED);
    let train_set = digits_subset(&data, 0, TRAIN)?;
    let test_set = digits_subset(&data, TRAIN, data.len - TRAIN)?;
    println!(
        "Natural gradient vs SGD: Linear(64,32)-Tanh-Linear(32,10) from a fresh random \
         init (seed {SEED}), {STEPS} steps on minibatches of {BATCH} of {TRAIN} training \
         digits, {} held out; natural gradient: type-2 Fisher refitted on each minibatch, \
         exact damping δ = {DAMPING:e}\n",
        test_set.len
    );

    let mut best = Vec::new();
    for method in [
        Method::Sgd,
        Method::NaturalGradient(Approximation::Kfac),
        Method::NaturalGradient(Approximation::Ekfac),
    ] {
        let rates: &[f64] = match method {
            Method::Sgd => &SGD_RATES,
            Method::NaturalGradient(_) => &NG_RATES,
        };
        let mut line = format!("{:<9} final training loss by learning rate:", method.name());
        let mut chosen: Option<(f64, Vec<Progress>)> = None;
        for &lr in rates {
            let history = train(&ctx, &init, &train_set, &test_set, method, lr)?;
            let last = history.last().map_or(f64::NAN, |p| p.train_loss);
            line += &format!("  η={lr}: {last:.4}");
            let better = chosen.as_ref().is_none_or(|(_, h)| {
                let current = h.last().map_or(f64::NAN, |p| p.train_loss);
                last < current || !current.is_finite()
            });
            if history.len() == STEPS + 1 && last.is_finite() && better {
                chosen = Some((lr, history));
            }
        }
        println!("{line}");
        let (lr, history) = chosen.ok_or_else(|| {
            Error::Options(format!("{} diverged at every learning rate", method.name()))
        })?;
        best.push((method, lr, history));
    }

    println!("\nafter step: mean training loss / held-out accuracy, best η of each method");
    let mut header = format!("{:>4}", "step");
    for (method, lr, _) in &best {
        header += &format!("  {:>20}", format!("{} η={lr}", method.name()));
    }
    println!("{header}");
    for step in 0..=STEPS {
        let mut row = format!("{step:>4}");
        for (_, _, history) in &best {
            let p = history[step];
            row += &format!(
                "  {:>11.4} / {:>5.1}%",
                p.train_loss,
                100.0 * p.test_accuracy
            );
        }
        println!("{row}");
    }
    println!();
    for (method, lr, history) in &best {
        let reached = history
            .iter()
            .position(|p| p.train_loss < TARGET_LOSS)
            .map_or(format!("not within {STEPS} steps"), |s| {
                format!("after {s} steps")
            });
        let (at, top) = history
            .iter()
            .enumerate()
            .map(|(s, p)| (s, p.test_accuracy))
            .fold((0, 0.0), |b, x| if x.1 > b.1 { x } else { b });
        println!(
            "{:<9} η={lr}: training loss below {TARGET_LOSS} {reached}; best held-out \
             accuracy {:.1}% (step {at}), final {:.1}%",
            method.name(),
            100.0 * top,
            100.0 * history[STEPS].test_accuracy
        );
    }
    println!(
        "(per step, not per second: a natural-gradient step also fits KFAC/EKFAC on its \
         minibatch, two passes and four eigendecompositions, where an SGD step is one \
         forward and backward pass)"
    );
    // The curves as a picture: training loss (log scale) and held-out accuracy.
    let series = |value: fn(&Progress) -> f64| -> Vec<ekfac::plot::Series> {
        best.iter()
            .enumerate()
            .map(|(i, (method, lr, history))| ekfac::plot::Series {
                label: format!("{} η={lr}", method.name()),
                color: ekfac::plot::PALETTE[i % ekfac::plot::PALETTE.len()],
                points: history
                    .iter()
                    .enumerate()
                    .map(|(s, p)| (s as f64, value(p)))
                    .collect(),
            })
            .collect()
    };
    let picture = ekfac::plot::curves(&[
        (
            "mean training loss by step".into(),
            series(|p| p.train_loss),
            true,
        ),
        (
            "held-out accuracy by step".into(),
            series(|p| p.test_accuracy),
            false,
        ),
    ]);
    let path = std::env::temp_dir().join("ekfac-natural-gradient.png");
    ekfac::io::write_atomic(&path, &picture.encode(ekfac::plot::Format::Png, &path)?)?;
    println!(
        "wrote the curves to {} ({} × {} pixels)",
        path.display(),
        picture.width,
        picture.height
    );
    Ok(())
}
