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
//! The scores come from the library ([`ekfac::curvature::influence`]): GEMMs on the
//! layer inputs and output gradients of one forward and one backward pass per batch,
//! without per-example training gradients (`tests/influence.rs` checks them against
//! explicit f64 gradients). The example reports how often the top proponents share the
//! query's label and compares the rankings of KFAC and EKFAC scores (Spearman's rank
//! correlation).

use ekfac::Result;
use ekfac::curvature::fit::fit;
use ekfac::curvature::influence::{InfluenceOptions, influence};
use ekfac::curvature::operator::Approximation;
use ekfac::demo::{digits_labels, digits_options, digits_problem, digits_subset};
use ekfac::gpu::GpuContext;
use ekfac::graph::Network;
use ekfac::progress::Silent;

/// Examples `0..TRAIN` are the training set, `TRAIN..` the test queries.
const TRAIN: usize = 1000;
/// `δ` of the damped inverse `(F + δI)⁻¹`.
const DAMPING: f64 = 1e-3;
/// Training examples per scoring batch.
const SCORE_BATCH: usize = 250;
/// Proponents and opponents listed per query.
const TOP: usize = 5;

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
    // SAFETY: the first statement of main: no other thread exists.
    unsafe { ekfac::progress::quiet_headless_vulkan() };
    let (model, data) = digits_problem()?;
    let ctx = GpuContext::new()?;
    let train = digits_subset(&data, 0, TRAIN)?;
    let test = digits_subset(&data, TRAIN, data.len - TRAIN)?;
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

    // Scores [K, N] per approximation: queries preconditioned once, the training set
    // streamed in batches.
    let net = Network::new(&ctx, &model)?;
    let mut scores = Vec::new();
    for approx in [Approximation::Ekfac, Approximation::Kfac] {
        let options = InfluenceOptions {
            damping: Some(DAMPING),
            approx,
            batch_size: SCORE_BATCH,
            self_influence: false,
        };
        let result = influence(&ctx, &model, state, [&train, &test], &options, &Silent)?;
        if approx == Approximation::Ekfac {
            // The first query's grid: the 8×8 images of the query and its top helpful and
            // harmful training examples.
            let top = ekfac::report::TopK::new(&result, TRAIN, TOP)?;
            let grid = ekfac::report::influence_grid(&train, &test, &top, 0, [1, 8, 8])?;
            let path = std::env::temp_dir().join("ekfac-influence-query0.png");
            ekfac::io::write_atomic(&path, &grid.encode(ekfac::plot::Format::Png, &path)?)?;
            println!(
                "wrote the image grid of the first query to {} ({} × {} pixels)\n",
                path.display(),
                grid.width,
                grid.height
            );
        }
        scores.push(result.scores);
    }
    let (ekfac_scores, kfac_scores) = (&scores[0], &scores[1]);

    let y_train = digits_labels(&train);
    let y_test = digits_labels(&test);
    let column = |s: &[f32], t: usize| -> Vec<f32> { s[t * TRAIN..(t + 1) * TRAIN].to_vec() };
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
