//! Data attribution with influence functions (Kronfluence style) on the bundled digits:
//! which training images made the model's answer on a test image more (or less) likely?
//!
//! `cargo run --release --example influence`
//!
//! Setup: the bundled classifier `Linear(64,32) - Tanh - Linear(32,10)` (trained with
//! Adam on all 1797 scikit-learn digits, see `assets/digits/README.md`) and the bundled
//! 1024 images; examples `0..1000` are the **training set** to attribute to, examples
//! `1000..1024` the **test queries**. (The model saw all of them while training; the
//! split only says which examples are scored and which are queries.)
//!
//! 1. Fit EKFAC (type-2 Fisher, cross-entropy with mean reduction) on the 1000 training
//!    examples: `F ≈ (1/N) Σ_n J_nᵀ H_n J_n`, the curvature of the mean training loss.
//! 2. For each test query `t`, its loss gradient `g_t = ∇_θ ℓ(f(x_t), y_t)` (a batch-of-one
//!    backward pass with parameter gradients), flattened in model order (`[P]`), and all
//!    `K` of them preconditioned at once: `w_t = (F + δI)⁻¹ g_t` with `δ = 1e-3` (one
//!    `Operator::apply` on the `[P, K]` matrix).
//! 3. The influence score of training example `n` on query `t` is
//!    `s(n, t) = ∇_θ ℓ_nᵀ w_t`, with `∇_θ ℓ_n` the gradient of that example's own loss
//!    (not divided by `N`). Adding `ε·ℓ_n` to the mean training loss moves its minimum
//!    by about `−ε (F + δI)⁻¹ ∇ℓ_n` (`F` standing in for the Hessian) and so changes the
//!    query's loss by about `−ε·s(n, t)`: a **positive** score is a *helpful* example (a
//!    proponent: more weight on it lowers the query's loss), a **negative** score a
//!    *harmful* one (an opponent).
//!
//! Step 3 never forms per-example gradients. For a linear layer the gradient of `ℓ_n`
//! with respect to the weight is `g_n a_nᵀ` and with respect to the bias `g_n`, where
//! `a_n` is the layer input and `g_n` the gradient of `ℓ_n` with respect to the layer
//! output, so with `W_t`, `b_t` the layer's slices of `w_t`,
//! `s(n, t) = Σ_layers g_nᵀ (W_t a_n + b_t)`. Per batch of training examples: one
//! forward pass (keeps `a_n`), the empirical-Fisher loss vectors of `reduction = sum`
//! (`p_n − e_{y_n}`, exactly `∂ℓ_n/∂f_n`), one backward pass (gives `g_n`), then per
//! layer a batched GEMM `U[t] = A W_tᵀ + 1 b_tᵀ` (`[K, B, d_out]`) and a batched
//! matrix-vector product `s(n, :) += U[:, n, :] g_n`, all on the GPU.
//!
//! The example checks the GEMM scores against explicit batch-of-one gradients for a few
//! training examples, reports how often the top proponents share the query's label, and
//! compares the rankings of KFAC and EKFAC scores (Spearman's rank correlation).

use ekfac::curvature::fit::fit;
use ekfac::curvature::layout::{ParamKind, ParamLayout};
use ekfac::curvature::operator::{Approximation, Operator, Transform};
use ekfac::curvature::{DampingMode, FisherType, Options, Reduction};
use ekfac::demo::{digits_options, digits_problem};
use ekfac::gpu::{GpuContext, GpuTensor};
use ekfac::graph::Network;
use ekfac::loss::gpu::{GpuTargets, record_backprop_vectors};
use ekfac::model::data::{Dataset, Targets};
use ekfac::ops::gemm::{Gemm, gemm};
use ekfac::{Error, Result};

/// Examples `0..TRAIN` are the training set, `TRAIN..` the test queries.
const TRAIN: usize = 1000;
/// `δ` of the damped inverse `(F + δI)⁻¹`.
const DAMPING: f64 = 1e-3;
/// Training examples per scoring batch.
const SCORE_BATCH: usize = 250;
/// Proponents and opponents listed per query.
const TOP: usize = 5;
/// Training examples whose GEMM scores are checked against explicit gradients.
const CHECKED: [usize; 3] = [0, 417, 999];

/// Examples `start .. start + len` of `data` as a data set of their own.
fn subset(data: &Dataset, start: usize, len: usize) -> Result<Dataset> {
    let e = data.example_len();
    let Targets::Classes(y) = &data.y else {
        return Err(Error::Options("the digits have class labels".into()));
    };
    Dataset::new(
        data.x[start * e..(start + len) * e].to_vec(),
        data.example_shape.clone(),
        Targets::Classes(y[start..start + len].to_vec()),
    )
}

fn labels(data: &Dataset) -> &[i64] {
    match &data.y {
        Targets::Classes(y) => y,
        Targets::Values { .. } => &[],
    }
}

/// Options of the loss gradients: the empirical Fisher's vector with `reduction = sum`
/// is `∂ℓ_n/∂f_n = p_n − e_{y_n}` for every example of a batch, unscaled.
fn gradient_options() -> Options {
    Options {
        fisher: FisherType::Empirical,
        reduction: Reduction::Sum,
        ..digits_options()
    }
}

/// The forward pass of examples `start .. start + len` and the loss vectors
/// `∂ℓ_n/∂f_n` (`[1, len, C]`) of their own labels.
fn forward_with_loss_vectors(
    ctx: &GpuContext,
    net: &Network,
    data: &Dataset,
    start: usize,
    len: usize,
) -> Result<(ekfac::graph::Forward, GpuTensor)> {
    let e = data.example_len();
    let x = ctx.upload(&data.x[start * e..(start + len) * e], &[len, e])?;
    let y: Vec<u32> = labels(data)[start..start + len]
        .iter()
        .map(|&c| c as u32)
        .collect();
    let y = ctx.upload_u32(&y, &[len])?;
    let forward = net.forward(ctx, x)?;
    let vectors = ctx.zeros(&[1, len, net.num_outputs()])?;
    let mut rec = ctx.recorder();
    record_backprop_vectors(
        &mut rec,
        &gradient_options(),
        forward.output(),
        GpuTargets::Classes(&y),
        start,
        data.len,
        &vectors,
    )?;
    rec.submit()?;
    Ok((forward, vectors))
}

/// `∇_θ ℓ(f(x_n), y_n)` flattened in model order (`[P]`): a batch-of-one backward pass
/// with parameter gradients.
fn example_gradient(
    ctx: &GpuContext,
    net: &Network,
    layout: &ParamLayout,
    data: &Dataset,
    n: usize,
) -> Result<Vec<f32>> {
    let (forward, vectors) = forward_with_loss_vectors(ctx, net, data, n, 1)?;
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

/// Scores `s(n, t) = ∇ℓ_nᵀ w_t` of every example of `data` against the `K` rows of
/// `w` (`[K, P]` on the GPU, model order), as row-major `[N, K]`.
fn influence_scores(
    ctx: &GpuContext,
    net: &Network,
    layout: &ParamLayout,
    data: &Dataset,
    w: &GpuTensor,
    k: usize,
) -> Result<Vec<f32>> {
    let p_all = layout.num_params;
    let mut scores = Vec::with_capacity(data.len * k);
    for start in (0..data.len).step_by(SCORE_BATCH) {
        let b = SCORE_BATCH.min(data.len - start);
        let (forward, vectors) = forward_with_loss_vectors(ctx, net, data, start, b)?;
        let backward = net.backward(ctx, &forward, &vectors, 1, false)?;
        let ones = ctx.upload(&vec![1.0; b], &[b, 1])?;
        let s = ctx.zeros(&[b, k])?;
        let mut temporaries = Vec::new();
        let mut rec = ctx.recorder();
        for layer in &layout.layers {
            let (d_in, d_out) = (layer.d_in, layer.d_out);
            let a = forward.layer_input(layer.layer);
            let g = backward.output_grad(layer.layer);
            // U[t] = A W_tᵀ + 1 b_tᵀ, [K, B, d_out].
            let u = ctx.zeros(&[k, b, d_out])?;
            for p in layout.params.iter().filter(|p| p.layer == layer.layer) {
                let mut step = match p.kind {
                    ParamKind::Weight => Gemm::new(b, d_out, d_in, false, true),
                    ParamKind::Bias => Gemm::new(b, d_out, 1, false, false),
                }
                .batched(k);
                step.stride_a = 0;
                step.offset_b = p.offset;
                step.stride_b = p_all;
                step.beta = 1.0;
                let a_operand = match p.kind {
                    ParamKind::Weight => a,
                    ParamKind::Bias => &ones,
                };
                gemm(&mut rec, &step, a_operand, w, &u)?;
            }
            // s(n, :) += U[:, n, :] g_n, one matrix-vector product per example.
            let mut contract = Gemm::new(k, 1, d_out, false, false)
                .batched(b)
                .scaled(1.0, 1.0);
            contract.lda = b * d_out;
            contract.stride_a = d_out;
            contract.ldb = 1;
            contract.stride_b = d_out;
            contract.ldc = 1;
            contract.stride_c = k;
            gemm(&mut rec, &contract, &u, g, &s)?;
            temporaries.push(u);
        }
        rec.submit()?;
        drop(temporaries);
        scores.extend(ctx.read(&s)?);
    }
    Ok(scores)
}

/// Row-major `[rows, cols]` → row-major `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// Ranks `0..n` of `values` (ascending; ties are broken by index).
fn ranks(values: &[f32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut r = vec![0.0; values.len()];
    for (rank, &i) in order.iter().enumerate() {
        r[i] = rank as f64;
    }
    r
}

/// Spearman's rank correlation of two equally long score lists.
fn spearman(x: &[f32], y: &[f32]) -> f64 {
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mean) * (b - mean);
        sxx += (a - mean).powi(2);
        syy += (b - mean).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

fn main() -> Result<()> {
    let (model, data) = digits_problem()?;
    let ctx = GpuContext::new()?;
    let train = subset(&data, 0, TRAIN)?;
    let test = subset(&data, TRAIN, data.len - TRAIN)?;
    let k = test.len;
    println!(
        "Influence functions on the bundled digits: Linear(64,32)-Tanh-Linear(32,10), \
         training set = examples 0..{TRAIN}, test queries = examples {TRAIN}..{}\n",
        data.len
    );

    let options = digits_options();
    let fitted = fit(&ctx, &model, &train, &options, Some(DAMPING))?;
    let state = &fitted.state;
    let layout = &state.layout;
    let p = layout.num_params;
    let mean_eigenvalue = state
        .corrected
        .as_ref()
        .map(|c| c.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / p as f64)
        .unwrap_or(f64::NAN);
    println!(
        "EKFAC ({} Fisher, {} {}) fitted on {TRAIN} examples, {p} parameters; mean \
         corrected eigenvalue {mean_eigenvalue:.3e}, damping δ = {DAMPING:e}",
        options.fisher, options.loss, options.reduction
    );

    // Test gradients g_t, then w_t = (F + δI)⁻¹ g_t for all queries in one product.
    let net = Network::new(&ctx, &model)?;
    let mut g_test = Vec::with_capacity(k * p);
    for t in 0..k {
        g_test.extend(example_gradient(&ctx, &net, layout, &test, t)?);
    }
    let operator = Operator::new(&ctx, state)?;
    let inverse = Transform::Inverse {
        damping: DAMPING,
        mode: DampingMode::Exact,
    };
    let g_columns = transpose(&g_test, k, p);
    let mut scores = Vec::new();
    for approx in [Approximation::Ekfac, Approximation::Kfac] {
        let w = operator.apply(&g_columns, k, approx, inverse)?;
        let w_rows = transpose(&w, p, k);
        let w_gpu = ctx.upload(&w_rows, &[k, p])?;
        let s = influence_scores(&ctx, &net, layout, &train, &w_gpu, k)?;
        if approx == Approximation::Ekfac {
            // The GEMM scores against explicit per-example gradients (f64 dot products).
            let mut worst: f64 = 0.0;
            let scale = s.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs())));
            for &n in &CHECKED {
                let g_n = example_gradient(&ctx, &net, layout, &train, n)?;
                for t in 0..k {
                    let exact: f64 = g_n
                        .iter()
                        .zip(&w_rows[t * p..(t + 1) * p])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    worst = worst.max((exact - f64::from(s[n * k + t])).abs() / scale);
                }
            }
            println!(
                "check: GEMM scores of training examples {CHECKED:?} against explicit \
                 batch-of-one gradients: largest difference {worst:.1e} of the largest |score|\n"
            );
        }
        scores.push(s);
    }
    let (ekfac_scores, kfac_scores) = (&scores[0], &scores[1]);

    let y_train = labels(&train);
    let y_test = labels(&test);
    let column = |s: &[f32], t: usize| -> Vec<f32> { (0..TRAIN).map(|n| s[n * k + t]).collect() };
    let c = net.num_outputs();
    let logits = ctx.read(
        net.forward(&ctx, ctx.upload(&test.x, &[k, test.example_len()])?)?
            .output(),
    )?;
    println!(
        "EKFAC influence, score = ∇ℓ_trainᵀ (F + δI)⁻¹ ∇ℓ_test; entries are #index(label) score"
    );
    let (mut same_helpful, mut same_harmful, mut rho_sum, mut rho_min) = (0, 0, 0.0, 1.0f64);
    let mut overlap = 0;
    for t in 0..k {
        let s = column(ekfac_scores, t);
        let mut order: Vec<usize> = (0..TRAIN).collect();
        order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
        let helpful = &order[..TOP];
        let harmful: Vec<usize> = order.iter().rev().take(TOP).copied().collect();
        let row = &logits[t * c..(t + 1) * c];
        let predicted = (0..c)
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .unwrap_or(0);
        println!(
            "test #{} label {} (predicted {predicted})",
            TRAIN + t,
            y_test[t]
        );
        let list = |ids: &[usize]| {
            ids.iter()
                .map(|&n| format!("#{n}({}) {:+.2e}", y_train[n], s[n]))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("  helpful: {}", list(helpful));
        println!("  harmful: {}", list(&harmful));
        same_helpful += helpful.iter().filter(|&&n| y_train[n] == y_test[t]).count();
        same_harmful += harmful.iter().filter(|&&n| y_train[n] == y_test[t]).count();

        let s_kfac = column(kfac_scores, t);
        let rho = spearman(&s, &s_kfac);
        rho_sum += rho;
        rho_min = rho_min.min(rho);
        let mut order_kfac: Vec<usize> = (0..TRAIN).collect();
        order_kfac.sort_by(|&i, &j| s_kfac[j].total_cmp(&s_kfac[i]));
        overlap += helpful
            .iter()
            .filter(|n| order_kfac[..TOP].contains(n))
            .count();
    }
    let base_rate = (0..k)
        .map(|t| y_train.iter().filter(|&&y| y == y_test[t]).count())
        .sum::<usize>() as f64
        / (k * TRAIN) as f64;
    let total = (k * TOP) as f64;
    println!(
        "\nsanity: {:.0}% of the top-{TOP} helpful training examples share the query's label, \
         {:.0}% of the top-{TOP} harmful ones (base rate of a random training example: {:.0}%)",
        100.0 * same_helpful as f64 / total,
        100.0 * same_harmful as f64 / total,
        100.0 * base_rate
    );
    println!(
        "KFAC vs EKFAC (both exact damping δ = {DAMPING:e}): Spearman rank correlation of the \
         {TRAIN} scores per query: mean {:.3}, lowest {:.3}; top-{TOP} helpful sets overlap \
         {:.0}%",
        rho_sum / k as f64,
        rho_min,
        100.0 * overlap as f64 / total
    );
    Ok(())
}
