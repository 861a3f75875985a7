//! Influence functions (data attribution, as Kronfluence): for training examples `n`
//! and queries `q`,
//!
//! `score[q, n] = ∇ℓ_qᵀ (F + δI)⁻¹ ∇ℓ_n`,
//!
//! with `ℓ_n` the loss of example `n` alone (reduction `sum`), gradients over the
//! state's parameters in model order, `F` the state's EKFAC (or KFAC) and exact damping.
//! A positive score marks a helpful training example (more weight on it lowers the
//! query's loss), a negative one a harmful one.
//!
//! How: the query gradients `[k, P]` (chunks of `k` queries within the memory budget)
//! are preconditioned once, `W = (F + δI)⁻¹ Gq` ([`Operator::apply`]); then one pass
//! over the training set in batches scores every example by GEMMs on the layer inputs
//! and output gradients, without per-example gradients: a layer `y_s = W a_s + b`
//! applied at positions `s` has `∇_W ℓ_n = Σ_s g_{n,s} ã_{n,s}ᵀ`, so
//! `score[q, n] = Σ_s g_{n,s}ᵀ (W_q ã_{n,s} + b_q)`: per layer `U = Ã W_qᵀ + 1 b_qᵀ`
//! (`[k, B·S, d_out]`, one batched GEMM) and `score[n, :] += U[:, n] · g_n` (a batched
//! matrix-vector product). No `[N, P]` matrix exists; per-example gradients are formed
//! only for the queries and, for [`InfluenceOptions::self_influence`], one training
//! batch at a time (`[B, P]`).

use crate::curvature::batches::run_batch;
use crate::curvature::layer::CurvatureLayer;
use crate::curvature::layout::{ParamKind, ParamLayout};
use crate::curvature::operator::{Approximation, Operator, Transform};
use crate::curvature::options::{DampingMode, FisherType, Options, Reduction};
use crate::curvature::state::CurvatureState;
use crate::data::DataSource;
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::{Backward, Forward, Model, Network};
use crate::layers::Pass;
use crate::ops::gemm::{Gemm, gemm};
use crate::progress::{Event, Progress, Stage};

/// How influence is computed.
#[derive(Clone, Debug, PartialEq)]
pub struct InfluenceOptions {
    /// `δ` of `(F + δI)⁻¹` (exact damping); `None` takes the state's.
    pub damping: Option<f64>,
    /// EKFAC (default) or KFAC.
    pub approx: Approximation,
    /// Training examples per scoring batch (fewer when the memory budget asks).
    pub batch_size: usize,
    /// Also compute `∇ℓ_nᵀ (F + δI)⁻¹ ∇ℓ_n` for every training example.
    pub self_influence: bool,
}

impl Default for InfluenceOptions {
    fn default() -> Self {
        Self {
            damping: None,
            approx: Approximation::Ekfac,
            batch_size: 128,
            self_influence: false,
        }
    }
}

/// Influence scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Influence {
    /// `[Q, N]`, row-major: `scores[q·N + n]`.
    pub scores: Vec<f32>,
    /// `[N]` when asked for.
    pub self_influence: Option<Vec<f32>>,
    /// The damping used.
    pub damping: f64,
}

/// The `k` largest and `k` smallest entries of each row of `scores` (`[rows, cols]`):
/// (indices, values) of the helpful (largest first) and harmful (most negative
/// first) ones, `[rows, k]` each; ties go to the lower index.
pub fn top_k(scores: &[f32], cols: usize, k: usize) -> [(Vec<i64>, Vec<f32>); 2] {
    let mut helpful = (Vec::new(), Vec::new());
    let mut harmful = (Vec::new(), Vec::new());
    for row in scores.chunks(cols.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        for &i in order.iter().take(k) {
            helpful.0.push(i as i64);
            helpful.1.push(row[i]);
        }
        order.sort_by(|&i, &j| row[i].total_cmp(&row[j]).then(i.cmp(&j)));
        for &i in order.iter().take(k) {
            harmful.0.push(i as i64);
            harmful.1.push(row[i]);
        }
    }
    [helpful, harmful]
}

/// Checks that `state` was fitted for `model` (same description and weights, same
/// parameter layout); `origin` names the state in errors.
pub fn check_state_matches(state: &CurvatureState, model: &Model, origin: &str) -> Result<()> {
    let fingerprint = model.fingerprint();
    if state.meta.model_fingerprint != fingerprint {
        return Err(Error::input(
            origin,
            format!(
                "the state was fitted for another model (model fingerprint {} in the state, \
                 {fingerprint} for the given model and weights)",
                state.meta.model_fingerprint
            ),
        ));
    }
    let layout = ParamLayout::from_options(model, &state.meta.options)?;
    if layout != state.layout {
        return Err(Error::input(
            origin,
            "the state's parameter layout differs from the model's".to_string(),
        ));
    }
    Ok(())
}

/// Influence of every example of `train` on every example of `query` through the
/// curvature in `state`, fitted for `model` (checked). Both data sets are checked
/// against the model and the state's loss ([`crate::data::check_all`], streaming) and
/// then read a batch at a time, so host memory holds a few batches and the `[Q, N]`
/// scores whatever the sources' sizes. Reports [`Stage::Preconditioning`]
/// (queries) and [`Stage::Scoring`] (batches) to `progress`.
pub fn influence(
    ctx: &GpuContext,
    model: &Model,
    state: &CurvatureState,
    data: [&dyn DataSource; 2],
    options: &InfluenceOptions,
    progress: &dyn Progress,
) -> Result<Influence> {
    let [train, query] = data;
    check_state_matches(state, model, "state")?;
    if options.approx == Approximation::Ekfac && !state.has_ekfac() {
        return Err(Error::Options(
            "the state was fitted with the forward-only Fisher, which has no EKFAC; use KFAC"
                .into(),
        ));
    }
    if options.batch_size == 0 {
        return Err(Error::Options(
            "batch size must be at least 1, found 0".into(),
        ));
    }
    let damping = options
        .damping
        .or(state.meta.damping)
        .ok_or_else(|| Error::Options("no damping given and none recorded in the state".into()))?;
    if !(damping.is_finite() && damping >= 0.0) {
        return Err(Error::Options(format!(
            "the damping must be finite and non-negative, found {damping}"
        )));
    }
    // The exact per-example loss gradients: the empirical Fisher's vectors with
    // reduction `sum` are `∂ℓ_n/∂f_n`.
    let grads = Options {
        fisher: FisherType::Empirical,
        reduction: Reduction::Sum,
        mc_samples: 1,
        ..state.meta.options.clone()
    };
    for data in [train, query] {
        crate::data::check_all(data, &model.graph, grads.loss, grads.fisher)?;
    }
    let network = Network::new(ctx, model)?;
    let scorer = Scorer::new(&network, &state.layout, &grads)?;
    let plan = scorer.plan(ctx, query.len(), options)?;
    let operator = Operator::new(ctx, state)?;
    let inverse = Transform::Inverse {
        damping,
        mode: DampingMode::Exact,
    };
    let (n, q_all, p) = (train.len(), query.len(), state.layout.num_params);
    let mut scores = vec![0.0f32; q_all * n];
    let mut self_influence = options.self_influence.then(|| vec![0.0f32; n]);
    let query_chunks = q_all.div_ceil(plan.queries);
    let batches = n.div_ceil(plan.examples);
    progress.report(&Event::Started {
        stage: Stage::Preconditioning,
        total: q_all,
    });
    let mut preconditioned = Vec::with_capacity(query_chunks);
    for q0 in (0..q_all).step_by(plan.queries) {
        let k = plan.queries.min(q_all - q0);
        let g = scorer.gradients(ctx, query, q0, k)?;
        let w = operator.apply(&transpose(&ctx.read(&g)?, k, p), k, options.approx, inverse)?;
        preconditioned.push((q0, k, transpose(&w, p, k)));
        progress.report(&Event::Advanced {
            stage: Stage::Preconditioning,
            done: q0 + k,
            total: q_all,
            examples: q0 + k,
            sweeps: None,
        });
    }
    progress.report(&Event::Finished {
        stage: Stage::Preconditioning,
    });
    let total = query_chunks * batches;
    progress.report(&Event::Started {
        stage: Stage::Scoring,
        total,
    });
    let mut done = 0;
    for (chunk, (q0, k, w)) in preconditioned.into_iter().enumerate() {
        let w = ctx.upload(&w, &[k, p])?;
        for start in (0..n).step_by(plan.examples) {
            let len = plan.examples.min(n - start);
            let (forward, backward) = scorer.backward(ctx, train, start, len)?;
            let s = scorer.score(ctx, &forward, &backward, &w, k)?;
            for (i, row) in ctx.read(&s)?.chunks(k).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    scores[(q0 + j) * n + start + i] = v;
                }
            }
            if let (Some(out), 0) = (self_influence.as_mut(), chunk) {
                let g = ctx.read(&scorer.gradients_of(ctx, &forward, &backward)?)?;
                let w = operator.apply(&transpose(&g, len, p), len, options.approx, inverse)?;
                for i in 0..len {
                    out[start + i] = (0..p)
                        .map(|j| f64::from(g[i * p + j]) * f64::from(w[j * len + i]))
                        .sum::<f64>() as f32;
                }
            }
            done += 1;
            progress.report(&Event::Advanced {
                stage: Stage::Scoring,
                done,
                total,
                examples: chunk * n + start + len,
                sweeps: None,
            });
        }
    }
    progress.report(&Event::Finished {
        stage: Stage::Scoring,
    });
    Ok(Influence {
        scores,
        self_influence,
        damping,
    })
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

/// How the work is cut to fit the memory budget.
struct Plan {
    /// Queries preconditioned and scored together.
    queries: usize,
    /// Training examples per scoring batch.
    examples: usize,
}

/// The per-example gradient and scoring GEMMs of one network and parameter layout.
struct Scorer<'a> {
    network: &'a Network,
    layout: &'a ParamLayout,
    /// Per layout layer: its curvature layer.
    layers: Vec<&'a dyn CurvatureLayer>,
    grads: &'a Options,
}

impl<'a> Scorer<'a> {
    fn new(network: &'a Network, layout: &'a ParamLayout, grads: &'a Options) -> Result<Self> {
        let graph = network.graph();
        let mut layers = Vec::with_capacity(layout.layers.len());
        for l in &layout.layers {
            let node = &graph.nodes[l.layer];
            layers.push(
                graph
                    .layer(l.layer)
                    .curvature()
                    .ok_or_else(|| Error::model(&node.name, "not a curvature layer"))?,
            );
        }
        Ok(Self {
            network,
            layout,
            layers,
            grads,
        })
    }

    /// Chunks of queries and examples whose tensors fit the budget and one binding.
    fn plan(&self, ctx: &GpuContext, queries: usize, options: &InfluenceOptions) -> Result<Plan> {
        let budget = ctx
            .memory_budget()
            .saturating_sub(self.network.workspace_bytes(ctx));
        let binding = ctx.limits.max_storage_buffer_binding_size;
        let p = self.layout.num_params as u64;
        let rows = |f: &dyn Fn(&dyn CurvatureLayer) -> usize| {
            self.layers.iter().map(|l| f(*l) as u64).max().unwrap_or(1)
        };
        // Per query and example: one row of U per position and output.
        let u = rows(&|l| l.positions() * l.out_features());
        let inputs = rows(&|l| l.positions() * (l.in_features() + l.out_features()));
        let largest = (self.network.largest_activation() as u64).max(inputs);
        // W and the query gradients take at most a quarter of the budget.
        let queries = (budget / 4 / (8 * p).max(1))
            .min(binding / (4 * p).max(1))
            .min(binding / (4 * u))
            .min(queries as u64)
            .max(1);
        let per_example = 4
            * (4 * self.network.activation_elements() as u64
                + 2 * inputs
                + queries * u
                + if options.self_influence { 3 * p } else { 0 });
        let left = budget.saturating_sub(8 * queries * p);
        let fits = |b: u64| {
            b * per_example <= left
                && b * 4 * largest.max(queries * u) <= binding
                && (!options.self_influence || b * 4 * p <= binding)
        };
        if !fits(1) {
            return Err(Error::Memory(format!(
                "influence of one query on one example needs about {} bytes of GPU memory \
                 ({per_example} per example, {} for the preconditioned query), more than the \
                 memory budget of {budget} bytes or the binding limit of {binding} bytes",
                per_example + 8 * p,
                8 * p
            )));
        }
        let mut examples = options.batch_size as u64;
        while examples > 1 && !fits(examples) {
            examples = examples.div_ceil(2);
        }
        Ok(Plan {
            queries: queries as usize,
            examples: examples as usize,
        })
    }

    /// Forward and backward of examples `start..start + len` with the loss vectors
    /// `∂ℓ_n/∂f_n` (one per example).
    fn backward(
        &self,
        ctx: &GpuContext,
        data: &dyn DataSource,
        start: usize,
        len: usize,
    ) -> Result<(Forward, Backward)> {
        let batch = run_batch(ctx, self.network, data, self.grads, start, len)?;
        let vectors = batch
            .vectors
            .as_ref()
            .ok_or_else(|| Error::gpu("influence", "no loss vectors"))?;
        let backward = self
            .network
            .backward(ctx, &batch.forward, vectors, 1, false)?;
        Ok((batch.forward, backward))
    }

    /// The per-example gradients `[len, P]` (model order) of examples
    /// `start..start + len`.
    fn gradients(
        &self,
        ctx: &GpuContext,
        data: &dyn DataSource,
        start: usize,
        len: usize,
    ) -> Result<GpuTensor> {
        let (forward, backward) = self.backward(ctx, data, start, len)?;
        self.gradients_of(ctx, &forward, &backward)
    }

    /// `[B, P]`: `∇_W ℓ_n = Σ_s g_{n,s} ã_{n,s}ᵀ` (one batched GEMM per layer) and
    /// `∇_b ℓ_n = Σ_s g_{n,s}`.
    fn gradients_of(
        &self,
        ctx: &GpuContext,
        forward: &Forward,
        backward: &Backward,
    ) -> Result<GpuTensor> {
        let b = forward.batch();
        let p = self.layout.num_params;
        let out = ctx.zeros(&[b, p])?;
        let mut pass = Pass::new(ctx);
        for (blocks, layer) in self.layout.layers.iter().zip(&self.layers) {
            let (s, d_out, d) = (layer.positions(), layer.out_features(), layer.in_features());
            // Group `j` of `G`: output features `j·d_g ..`, inputs `a[j]`.
            let (groups, d_g) = (layer.groups(), d_out / layer.groups());
            let a = layer.gradient_inputs(&mut pass, forward.layer_input(blocks.layer), b)?;
            let g = layer.expand_grads(&mut pass, backward.output_grad(blocks.layer))?;
            let ones = pass.ctx().upload(&vec![1.0f32; s], &[s, 1])?;
            for param in self
                .layout
                .params
                .iter()
                .filter(|x| x.layer == blocks.layer)
            {
                // ∇_W ℓ_n[group j rows] = g_nᵀ[j] a_n[j]; ∇_b ℓ_n = g_nᵀ 1.
                let parts = match param.kind {
                    ParamKind::Weight => groups,
                    ParamKind::Bias => 1,
                };
                for j in 0..parts {
                    let mut step = match param.kind {
                        ParamKind::Weight => {
                            let mut step = Gemm::new(d_g, d, s, true, false).batched(b);
                            step.offset_b = j * b * s * d;
                            step.stride_b = s * d;
                            step.ldb = d;
                            step.offset_a = j * d_g;
                            step.offset_c = param.offset + j * d_g * d;
                            step.ldc = d;
                            step
                        }
                        ParamKind::Bias => {
                            let mut step = Gemm::new(d_out, 1, s, true, false).batched(b);
                            step.stride_b = 0;
                            step.offset_c = param.offset;
                            step.ldc = 1;
                            step
                        }
                    };
                    step.lda = d_out;
                    step.stride_a = s * d_out;
                    step.stride_c = p;
                    let other = match param.kind {
                        ParamKind::Weight => &a,
                        ParamKind::Bias => &ones,
                    };
                    gemm(&mut pass.rec, &step, &g, other, &out)?;
                }
            }
            pass.keep(a);
            pass.keep(g);
            pass.keep(ones);
        }
        pass.submit()?;
        ctx.wait("forming per-example gradients")?;
        Ok(out)
    }

    /// `[B, k]` scores of the batch against the `k` preconditioned queries `w`
    /// (`[k, P]`).
    fn score(
        &self,
        ctx: &GpuContext,
        forward: &Forward,
        backward: &Backward,
        w: &GpuTensor,
        k: usize,
    ) -> Result<GpuTensor> {
        let b = forward.batch();
        let p = self.layout.num_params;
        let scores = ctx.zeros(&[b, k])?;
        let mut pass = Pass::new(ctx);
        for (blocks, layer) in self.layout.layers.iter().zip(&self.layers) {
            let (s, d_out, d) = (layer.positions(), layer.out_features(), layer.in_features());
            let rows = b * s;
            let (groups, d_g) = (layer.groups(), d_out / layer.groups());
            let a = layer.gradient_inputs(&mut pass, forward.layer_input(blocks.layer), b)?;
            let g = layer.expand_grads(&mut pass, backward.output_grad(blocks.layer))?;
            let ones = pass.ctx().upload(&vec![1.0f32; rows], &[rows, 1])?;
            // U[q] = Ã W_qᵀ + 1 b_qᵀ, [k, B·S, d_out]; group j's columns j·d_g.. from
            // its inputs a[j] and its weight rows.
            let u = pass.zeros(&[k, rows, d_out])?;
            for param in self
                .layout
                .params
                .iter()
                .filter(|x| x.layer == blocks.layer)
            {
                let (parts, width, inner, operand) = match param.kind {
                    ParamKind::Weight => (groups, d_g, d, &a),
                    ParamKind::Bias => (1, d_out, 1, &ones),
                };
                for j in 0..parts {
                    let mut step = Gemm::new(rows, width, inner, false, true)
                        .batched(k)
                        .scaled(1.0, 1.0);
                    step.stride_a = 0;
                    step.offset_a = j * rows * inner;
                    step.offset_b = param.offset + j * width * inner;
                    step.stride_b = p;
                    step.offset_c = j * width;
                    step.ldc = d_out;
                    step.stride_c = rows * d_out;
                    gemm(&mut pass.rec, &step, operand, w, &u)?;
                }
            }
            // score[n, :] += U[:, n] · g_n over the S·d_out entries of example n.
            let per = s * d_out;
            let mut contract = Gemm::new(k, 1, per, false, false)
                .batched(b)
                .scaled(1.0, 1.0);
            contract.lda = rows * d_out;
            contract.stride_a = per;
            contract.ldb = 1;
            contract.stride_b = per;
            contract.ldc = 1;
            contract.stride_c = k;
            gemm(&mut pass.rec, &contract, &u, &g, &scores)?;
            pass.keep(a);
            pass.keep(g);
            pass.keep(ones);
            pass.keep(u);
        }
        pass.submit()?;
        ctx.wait("scoring training examples")?;
        Ok(scores)
    }
}
