//! The GPU pipeline: one pass over the data for the Kronecker factors, their
//! eigendecomposition, a second pass for EKFAC's corrected eigenvalues.
//!
//! Per batch `b` (SPEC §2–§4; `S` positions, 1 for linear layers):
//! - `A += ÃᵀÃ / (N·S)` with `Ã` the expand-format layer input `[B·S, D]` (conv:
//!   group-averaged im2col patches; a ones column for a joint block), or for reduce
//!   `A += ĀᵀĀ / N` with the position means `[B, D]`;
//! - `G += κ_b · gᵀg` with `g` the channel-last gradients w.r.t. the layer output of the
//!   `V` backpropagated vectors (one stacked backward pass), `[V·B·S, d_out]` for
//!   expand or position sums `[V·B, d_out]` for reduce;
//! - correction (always expand format): without sharing `Λ += κ_b · hᵀ (ÃQ_A)^{∘2}` with
//!   `h = Σ_v (g_v Q_G)^{∘2}` (`[B, d_out]`), the per-example identity
//!   `Q_Gᵀ(g ãᵀ)Q_A = (Q_Gᵀg)(Q_Aᵀã)ᵀ`; with sharing the fused kernel
//!   [`correct_shared`] forms tiles of `Q_Gᵀ(Σ_s g_s ã_sᵀ)Q_A` in registers. Neither
//!   forms a `B × d_out × D` tensor. Bias blocks get `λ += κ_b · 1ᵀh` from position sums.
//!
//! The backpropagated vectors come from the GPU loss kernel ([`record_backprop_vectors`],
//! the Philox contract of [`crate::rng`]), so the logits never leave the GPU, and both
//! passes see the same samples.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::curvature::eigen::{EigenSolver, Factor, JacobiSolver};
use crate::curvature::layout::{BlockKind, CurvatureLayer, ParamLayout};
use crate::curvature::options::{FisherType, KfacApprox, LossKind, Options};
use crate::curvature::state::{
    CurvatureState, FORMAT_NAME, FORMAT_VERSION, FactorEigen, LayerFactors, ParamEntry, StateMeta,
};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::loss::{Targets, check_targets};
use crate::model::data::{Dataset, TargetsSlice};
use crate::model::sequential::{Backward, Forward, Sequential};
use crate::model::{Conv2dSpec, Layer, Model, ModelSpec};
use crate::ops::eigencorrect::{correct_shared, square_sum_stack};
use crate::ops::gemm::{Gemm, gemm};
use crate::ops::im2col::im2col_group_mean;
use crate::ops::loss::{GpuTargets, record_backprop_vectors};
use crate::ops::reduce::{Sum, append_ones_column, copy, square, sum_cols, sum_rows, transpose};

/// Wall-clock milliseconds of the phases of a fit.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Timings {
    pub load: f64,
    pub factors: f64,
    pub eigendecomposition: f64,
    pub correction: f64,
    pub scalars: f64,
    pub save: f64,
}

/// GPU milliseconds of the compute passes of each phase of a fit, from timestamp
/// queries ([`GpuContext::set_profiling`]). Only the time the GPU spends inside the
/// crate's compute passes: uploads, readbacks, host work and gaps between passes are
/// not included, so each phase is at most about its wall-clock time in [`Timings`].
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct GpuTimings {
    pub factors: f64,
    pub eigendecomposition: f64,
    pub correction: f64,
}

/// GPU phase labels of a fit ([`GpuContext::gpu_phase`]).
const FACTORS_PHASE: &str = "factors";
const EIGENDECOMPOSITION_PHASE: &str = "eigendecomposition";
const CORRECTION_PHASE: &str = "correction";

impl GpuTimings {
    /// The fit's phases from the context's GPU totals before and after the fit.
    fn between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> Self {
        let phase = |label: &str| {
            after.get(label).copied().unwrap_or(0.0) - before.get(label).copied().unwrap_or(0.0)
        };
        Self {
            factors: phase(FACTORS_PHASE),
            eigendecomposition: phase(EIGENDECOMPOSITION_PHASE),
            correction: phase(CORRECTION_PHASE),
        }
    }
}

/// What a fit produced besides the state.
pub struct Fitted {
    pub state: CurvatureState,
    /// Wall-clock times of the phases.
    pub timings: Timings,
    /// GPU times of the phases when the context was profiling, otherwise `None`.
    pub gpu_timings_ms: Option<GpuTimings>,
    /// Largest number of bytes of GPU buffers the crate held at once during the fit.
    pub peak_gpu_bytes: u64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The factor accumulators of one curvature layer.
struct LayerAccumulators {
    /// `A`, `[D, D]`, when a block of the layer needs it.
    input: Option<GpuTensor>,
    /// `G`, `[d_out, d_out]`, unless forward-only.
    gradient: Option<GpuTensor>,
}

/// Fits KFAC and (unless forward-only) EKFAC of `model` on `data` with `options`.
/// `damping` is recorded in the state as the default for inverse products.
pub fn fit(
    ctx: &GpuContext,
    model: &Model,
    data: &Dataset,
    options: &Options,
    damping: Option<f64>,
) -> Result<Fitted> {
    fit_from(ctx, model, data, options, damping, None)
}

/// [`fit`], warm-starting each factor's eigendecomposition from the eigenbasis of the
/// same layer in `previous` (a state fitted before the weights moved), where the
/// layer exists there with the same factor sizes. The result does not depend on the
/// warm start beyond f32 round-off; Jacobi needs fewer sweeps when the factors moved
/// little.
pub fn fit_from(
    ctx: &GpuContext,
    model: &Model,
    data: &Dataset,
    options: &Options,
    damping: Option<f64>,
    previous: Option<&CurvatureState>,
) -> Result<Fitted> {
    fit_with(
        ctx,
        model,
        data,
        options,
        damping,
        previous,
        &JacobiSolver::default(),
    )
}

/// [`fit_from`] with the factors eigendecomposed by `solver` (the others use
/// [`JacobiSolver::default`]).
pub fn fit_with(
    ctx: &GpuContext,
    model: &Model,
    data: &Dataset,
    options: &Options,
    damping: Option<f64>,
    previous: Option<&CurvatureState>,
    solver: &dyn EigenSolver,
) -> Result<Fitted> {
    options.validate()?;
    let layout = ParamLayout::from_options(model, options)?;
    data.check(&model.spec, options.loss == LossKind::CrossEntropy)?;
    if data.len == 0 {
        return Err(Error::Options("the dataset has no examples".into()));
    }
    check_all_targets(data, options, model.num_outputs())?;
    ctx.memory().reset_peak();
    let network = Sequential::new(ctx, model)?;
    let mut timings = Timings::default();
    let gpu_before = ctx.gpu_times_ms()?;

    let start = Instant::now();
    let phase = ctx.gpu_phase(FACTORS_PHASE);
    let chunks = chunking(
        ctx,
        &network,
        options,
        &layout,
        options.num_vectors(network.num_outputs()),
    )?;
    let accumulators = factor_pass(ctx, &network, &model.spec, data, options, &layout, chunks)?;
    timings.factors = ms(start);
    drop(phase);

    let start = Instant::now();
    let phase = ctx.gpu_phase(EIGENDECOMPOSITION_PHASE);
    // Every factor with its warm start, layer by layer: A (if any), then G (if any).
    let mut factors = Vec::new();
    for (layer, acc) in layout.layers.iter().zip(&accumulators) {
        let warm = previous.and_then(|p| p.layer_factors(&layer.name));
        if let Some(a) = &acc.input {
            factors.push(Factor {
                matrix: a,
                warm_start: warm.and_then(|w| w.input.as_ref()),
            });
        }
        if let Some(g) = &acc.gradient {
            factors.push(Factor {
                matrix: g,
                warm_start: warm.map(|w| &w.gradient),
            });
        }
    }
    let mut decomposed = solver.eigendecompose(ctx, &factors)?.into_iter();
    let mut next = || {
        decomposed
            .next()
            .ok_or_else(|| Error::gpu("the eigendecomposition", "a factor has no result"))
    };
    let mut bases = Vec::with_capacity(layout.layers.len());
    for (layer, acc) in layout.layers.iter().zip(&accumulators) {
        let input = acc.input.as_ref().map(|_| next()).transpose()?;
        let gradient = match &acc.gradient {
            Some(_) => {
                let (e, t) = next()?;
                (e, Some(t))
            }
            None => (FactorEigen::identity(layer.d_out), None),
        };
        bases.push(LayerBasis { input, gradient });
    }
    drop(accumulators);
    timings.eigendecomposition = ms(start);
    drop(phase);

    let start = Instant::now();
    let phase = ctx.gpu_phase(CORRECTION_PHASE);
    let corrected = if options.fisher == FisherType::ForwardOnly {
        None
    } else {
        Some(correction_pass(
            ctx,
            &network,
            &model.spec,
            data,
            options,
            &layout,
            &bases,
            chunks,
        )?)
    };
    timings.correction = ms(start);
    drop(phase);
    let gpu_timings_ms = match (gpu_before, ctx.gpu_times_ms()?) {
        (Some(before), Some(after)) => Some(GpuTimings::between(&before, &after)),
        _ => None,
    };

    let meta = StateMeta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        crate_version: env!("CARGO_PKG_VERSION").into(),
        options: options.clone(),
        damping,
        num_data: data.len,
        num_params: layout.num_params,
        params: layout
            .params
            .iter()
            .map(|p| ParamEntry {
                name: p.name.clone(),
                shape: p.shape.clone(),
                offset: p.offset,
            })
            .collect(),
        model: serde_json::from_str(&model.spec.to_json())
            .map_err(|e| Error::model("(whole model)", format!("serialising: {e}")))?,
        model_fingerprint: model.fingerprint(),
        adapter: ctx.adapter_summary(),
    };
    let state = CurvatureState {
        meta,
        layout,
        layers: bases
            .into_iter()
            .map(|b| LayerFactors {
                input: b.input.map(|(e, _)| e),
                gradient: b.gradient.0,
            })
            .collect(),
        corrected,
    };
    state.validate("fit")?;
    Ok(Fitted {
        state,
        timings,
        gpu_timings_ms,
        peak_gpu_bytes: ctx.memory().peak_bytes(),
    })
}

/// The eigenbases of one layer: host copies (for the state) and GPU copies (for the
/// correction pass). `gradient.1` is `None` for forward-only's identity `G`.
struct LayerBasis {
    input: Option<(FactorEigen, GpuTensor)>,
    gradient: (FactorEigen, Option<GpuTensor>),
}

/// The GPU tensors of one batch after the forward pass, with its `V` backpropagated
/// vectors (none for forward-only).
struct BatchPass {
    forward: Forward,
    /// `[V, B, C]`.
    vectors: Option<GpuTensor>,
    /// κ_b.
    kappa: f64,
}

impl BatchPass {
    /// Runs the stacked backward pass over chunks of at most `chunk` vectors and calls
    /// `f(backward, stack)` for each; every per-vector quantity of the curvature is a
    /// sum over vectors, so the chunks' contributions simply add up.
    fn for_each_chunk(
        &self,
        ctx: &GpuContext,
        network: &Sequential,
        chunk: usize,
        mut f: impl FnMut(&Backward, usize) -> Result<()>,
    ) -> Result<()> {
        let Some(vectors) = &self.vectors else {
            return Ok(());
        };
        let [nv, batch, outputs] = [vectors.shape()[0], vectors.shape()[1], vectors.shape()[2]];
        let per_vector = batch * outputs;
        for v0 in (0..nv).step_by(chunk.max(1)) {
            let stack = chunk.min(nv - v0);
            let backward = if stack == nv {
                network.backward(ctx, &self.forward, vectors, nv, false)?
            } else {
                let slice = ctx.zeros(&[stack, batch, outputs])?;
                let mut rec = ctx.recorder();
                copy(
                    &mut rec,
                    vectors,
                    v0 * per_vector,
                    &slice,
                    0,
                    stack * per_vector,
                )?;
                rec.submit()?;
                network.backward(ctx, &self.forward, &slice, stack, false)?
            };
            f(&backward, stack)?;
        }
        Ok(())
    }
}

/// How a batch is processed within the context's memory budget.
#[derive(Clone, Copy, Debug)]
struct Chunking {
    /// Examples per pass over the network (at most the batch size).
    examples: usize,
    /// Backpropagated vectors per stacked backward pass.
    vectors: usize,
}

/// Splits batches and stacks of vectors so that one pass fits the memory budget and
/// every tensor fits one storage binding. The conv layers' im2col workspaces are
/// bounded by the budget on their own ([`Sequential::workspace_bytes`]) and come off it
/// first. Per example, a pass holds the forward activations, about three tensors the
/// size of the activations per stacked vector (gradients, repeated saved activations,
/// rotated gradients), and per layer with an input factor three `[S, D]` input
/// matrices (the expand-format inputs, their copy with a ones column, and their
/// rotation in the correction pass).
fn chunking(
    ctx: &GpuContext,
    network: &Sequential,
    options: &Options,
    layout: &ParamLayout,
    nv: usize,
) -> Result<Chunking> {
    let workspaces = network.workspace_bytes(ctx);
    let budget = ctx.memory_budget().saturating_sub(workspaces);
    let binding = ctx.limits.max_storage_buffer_binding_size;
    let inputs = layout
        .layers
        .iter()
        .filter_map(|layer| Some(layer.positions * layer.input_dim(layout)?));
    let per_example =
        4 * (network.activation_elements() + 3 * inputs.clone().sum::<usize>()) as u64;
    let largest = 4 * network
        .largest_activation()
        .max(inputs.max().unwrap_or(0))
        .max(1) as u64;
    let stack = nv.max(1) as u64;
    // Per example: the forward set plus three backward sets per stacked vector.
    let fits = |examples: u64, vectors: u64| {
        examples * per_example * (1 + 3 * vectors) <= budget
            && examples * vectors * largest <= binding
            && examples * largest <= binding
    };
    if !fits(1, 1) {
        return Err(Error::Memory(format!(
            "one example with one backpropagated vector needs about {} bytes of GPU memory \
             ({per_example} per example and vector, largest tensor {largest} bytes), more than \
             the memory budget of {} bytes less {workspaces} bytes of conv workspaces, or the \
             adapter's binding limit of {binding} bytes",
            per_example * 4,
            ctx.memory_budget(),
        )));
    }
    let mut examples = options.batch_size as u64;
    while examples > 1 && !fits(examples, 1) {
        examples = examples.div_ceil(2);
    }
    let mut vectors = stack;
    while vectors > 1 && !fits(examples, vectors) {
        vectors = vectors.div_ceil(2);
    }
    Ok(Chunking {
        examples: examples as usize,
        vectors: vectors as usize,
    })
}

/// Runs the network on one batch and computes its backpropagated vectors, all on the
/// GPU: upload `x` and `y`, forward, loss vectors, with no readback in between.
fn run_batch(
    ctx: &GpuContext,
    network: &Sequential,
    data: &Dataset,
    options: &Options,
    start: usize,
    len: usize,
) -> Result<BatchPass> {
    let batch = data.batch(start, len);
    let mut shape = vec![len];
    shape.extend(&data.example_shape);
    let x = ctx.upload(batch.x, &shape)?;
    let forward = network.forward(ctx, x)?;
    if options.fisher == FisherType::ForwardOnly {
        return Ok(BatchPass {
            forward,
            vectors: None,
            kappa: 1.0,
        });
    }
    let outputs = network.num_outputs();
    let targets = match batch.y {
        TargetsSlice::Classes(y) => {
            let classes: Vec<u32> = y.iter().map(|&c| c as u32).collect();
            ctx.upload_u32(&classes, &[len])?
        }
        TargetsSlice::Values { data: y, .. } => ctx.upload(y, &[len, outputs])?,
    };
    let gpu_targets = match batch.y {
        TargetsSlice::Classes(_) => GpuTargets::Classes(&targets),
        TargetsSlice::Values { .. } => GpuTargets::Dense(&targets),
    };
    let nv = options.num_vectors(outputs);
    let vectors = ctx.zeros(&[nv, len, outputs])?;
    let mut rec = ctx.recorder();
    let kappa = record_backprop_vectors(
        &mut rec,
        options,
        forward.output(),
        gpu_targets,
        start,
        data.len,
        &vectors,
    )?;
    rec.submit()?;
    Ok(BatchPass {
        forward,
        vectors: Some(vectors),
        kappa,
    })
}

/// Checks every target once before the passes: class indices below `C` for
/// cross-entropy, finite values for MSE/BCE, {0, 1} for BCE with type-2.
fn check_all_targets(data: &Dataset, options: &Options, outputs: usize) -> Result<()> {
    let batch = data.batch(0, data.len);
    let classes: Vec<usize>;
    let values: Vec<f64>;
    let targets = match batch.y {
        TargetsSlice::Classes(y) => {
            classes = y.iter().map(|&c| c as usize).collect();
            Targets::Classes(&classes)
        }
        TargetsSlice::Values { data: y, .. } => {
            values = y.iter().map(|&v| f64::from(v)).collect();
            Targets::Dense(&values)
        }
    };
    check_targets(options.loss, options.fisher, targets, data.len, outputs)
}

/// A GPU tensor either borrowed from the forward/backward pass or made for one layer;
/// owned ones are kept until the compute pass that uses them is submitted.
enum Held<'a> {
    Borrowed(&'a GpuTensor),
    Owned(GpuTensor),
}

impl std::ops::Deref for Held<'_> {
    type Target = GpuTensor;
    fn deref(&self) -> &GpuTensor {
        match self {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }
}

/// What the curvature needs of one layer in one batch, recorded into one pass.
struct LayerView<'a> {
    ctx: &'a GpuContext,
    layer: &'a CurvatureLayer,
    /// Conv2d hyper-parameters and the per-example input shape `[C, H, W]`.
    conv: Option<(&'a Conv2dSpec, &'a [usize])>,
    /// Whether the layer is one joint weight-and-bias block (inputs get a ones column).
    joint: bool,
    batch: usize,
}

impl<'a> LayerView<'a> {
    fn new(
        ctx: &'a GpuContext,
        model: &'a ModelSpec,
        shapes: &'a [Vec<usize>],
        layout: &ParamLayout,
        layer: &'a CurvatureLayer,
        batch: usize,
    ) -> Self {
        let conv = match &model.layers[layer.layer] {
            Layer::Conv2d(spec) => Some((spec, shapes[layer.layer].as_slice())),
            _ => None,
        };
        let joint = layer
            .blocks
            .iter()
            .any(|&b| layout.blocks[b].kind == BlockKind::Joint);
        Self {
            ctx,
            layer,
            conv,
            joint,
            batch,
        }
    }

    /// `x` with a ones column appended when the layer is joint: `[rows, d_in(+1)]`.
    fn with_ones<'t>(&self, rec: &mut Recorder, x: Held<'t>) -> Result<Held<'t>> {
        if !self.joint {
            return Ok(x);
        }
        let rows = x.len() / self.layer.d_in;
        let out = self.ctx.zeros(&[rows, self.layer.d_in + 1])?;
        append_ones_column(rec, &x, &out, rows, self.layer.d_in)?;
        Ok(Held::Owned(out))
    }

    /// Expand-format inputs `ã`: `[B·S, D]` (conv: group-averaged im2col patches).
    fn expand_inputs<'t>(&self, rec: &mut Recorder, input: &'t GpuTensor) -> Result<Held<'t>> {
        let x = match self.conv {
            None => Held::Borrowed(input),
            Some((spec, shape)) => {
                let geo = spec.geometry(self.batch, [shape[1], shape[2]]);
                let patches = self
                    .ctx
                    .zeros(&[self.batch * self.layer.positions, self.layer.d_in])?;
                im2col_group_mean(rec, &geo, input, 0..self.batch, &patches)?;
                Held::Owned(patches)
            }
        };
        self.with_ones(rec, x)
    }

    /// The rows whose Gram matrix gives `A` (scaled by `1/(N·S)` for expand, `1/N` for
    /// reduce): expand `ã` `[B·S, D]`, or reduce `[mean_s a; 1]` `[B, D]`.
    fn factor_inputs<'t>(
        &self,
        rec: &mut Recorder,
        keep: &mut Vec<Held<'t>>,
        input: &'t GpuTensor,
        approx: KfacApprox,
    ) -> Result<Held<'t>> {
        if approx == KfacApprox::Expand || self.layer.positions == 1 {
            return self.expand_inputs(rec, input);
        }
        let (spec, shape) = self.conv.expect("only conv2d layers share weights");
        let geo = spec.geometry(self.batch, [shape[1], shape[2]]);
        let (s, d) = (self.layer.positions, self.layer.d_in);
        let patches = self.ctx.zeros(&[self.batch * s, d])?;
        im2col_group_mean(rec, &geo, input, 0..self.batch, &patches)?;
        let mean = self.ctx.zeros(&[self.batch, d])?;
        let ones = self.ctx.upload(&vec![1.0; s], &[1, s])?;
        let mut average = Gemm::new(1, d, s, false, false)
            .batched(self.batch)
            .scaled(1.0 / s as f32, 0.0);
        average.stride_a = 0;
        gemm(rec, &average, &ones, &patches, &mean)?;
        keep.push(Held::Owned(patches));
        keep.push(Held::Owned(ones));
        self.with_ones(rec, Held::Owned(mean))
    }

    /// Output gradients channel-last, `[V·B·S, d_out]` (conv: transposed from NCHW).
    fn expand_grads<'t>(&self, rec: &mut Recorder, grads: &'t GpuTensor) -> Result<Held<'t>> {
        if self.conv.is_none() {
            return Ok(Held::Borrowed(grads));
        }
        let (s, d_out) = (self.layer.positions, self.layer.d_out);
        let rows = grads.len() / (s * d_out);
        let out = self.ctx.zeros(&[rows * s, d_out])?;
        transpose(rec, grads, &out, rows, d_out, s)?;
        Ok(Held::Owned(out))
    }

    /// Output gradients summed over positions, `[V·B, d_out]` (the NCHW gradients as
    /// `[V·B·d_out, S]` rows, each summed).
    fn summed_grads<'t>(&self, rec: &mut Recorder, grads: &'t GpuTensor) -> Result<Held<'t>> {
        if self.conv.is_none() {
            return Ok(Held::Borrowed(grads));
        }
        let (s, d_out) = (self.layer.positions, self.layer.d_out);
        let rows = grads.len() / s;
        let out = self.ctx.zeros(&[rows / d_out, d_out])?;
        sum_cols(rec, grads, &out, &Sum::new(rows, s))?;
        Ok(Held::Owned(out))
    }

    /// The rows whose Gram matrix (times κ) gives `G`: expand `[V·B·S, d_out]`, reduce
    /// position sums `[V·B, d_out]`.
    fn factor_grads<'t>(
        &self,
        rec: &mut Recorder,
        grads: &'t GpuTensor,
        approx: KfacApprox,
    ) -> Result<Held<'t>> {
        match approx {
            KfacApprox::Expand => self.expand_grads(rec, grads),
            KfacApprox::Reduce => self.summed_grads(rec, grads),
        }
    }
}

/// `C += α·XᵀX` for row-major `x` `[rows, n]` and `c` `[n, n]`.
fn accumulate_gram(
    rec: &mut Recorder,
    x: &GpuTensor,
    n: usize,
    alpha: f64,
    c: &GpuTensor,
) -> Result<()> {
    let rows = x.len() / n;
    gemm(
        rec,
        &Gemm::new(n, n, rows, true, false).scaled(alpha as f32, 1.0),
        x,
        x,
        c,
    )
}

fn factor_pass(
    ctx: &GpuContext,
    network: &Sequential,
    model: &ModelSpec,
    data: &Dataset,
    options: &Options,
    layout: &ParamLayout,
    chunks: Chunking,
) -> Result<Vec<LayerAccumulators>> {
    let shapes = model.shapes()?;
    let accumulators = layout
        .layers
        .iter()
        .map(|layer| {
            let input_dim = layer.input_dim(layout);
            Ok(LayerAccumulators {
                input: input_dim.map(|d| ctx.zeros(&[d, d])).transpose()?,
                gradient: (options.fisher != FisherType::ForwardOnly)
                    .then(|| ctx.zeros(&[layer.d_out, layer.d_out]))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = data.len as f64;
    for start in (0..data.len).step_by(chunks.examples) {
        let len = chunks.examples.min(data.len - start);
        let pass = run_batch(ctx, network, data, options, start, len)?;
        let views: Vec<LayerView> = layout
            .layers
            .iter()
            .map(|layer| LayerView::new(ctx, model, &shapes, layout, layer, len))
            .collect();
        let mut rec = ctx.recorder();
        let mut keep = Vec::new();
        for ((layer, acc), view) in layout.layers.iter().zip(&accumulators).zip(&views) {
            if let Some(a) = &acc.input {
                let d = a.shape()[0];
                let input = pass.forward.layer_input(layer.layer);
                let x = view.factor_inputs(&mut rec, &mut keep, input, options.approx)?;
                let scale = match options.approx {
                    KfacApprox::Expand => 1.0 / (n * layer.positions as f64),
                    KfacApprox::Reduce => 1.0 / n,
                };
                accumulate_gram(&mut rec, &x, d, scale, a)?;
                keep.push(x);
            }
        }
        rec.submit()?;
        pass.for_each_chunk(ctx, network, chunks.vectors, |backward, _| {
            let mut rec = ctx.recorder();
            let mut keep = Vec::new();
            for ((layer, acc), view) in layout.layers.iter().zip(&accumulators).zip(&views) {
                if let Some(g) = &acc.gradient {
                    let grads = view.factor_grads(
                        &mut rec,
                        backward.output_grad(layer.layer),
                        options.approx,
                    )?;
                    accumulate_gram(&mut rec, &grads, layer.d_out, pass.kappa, g)?;
                    keep.push(grads);
                }
            }
            rec.submit()?;
            ctx.wait("accumulating Kronecker factors")
        })?;
        ctx.wait("accumulating Kronecker factors")?;
        drop(keep);
    }
    Ok(accumulators)
}

#[allow(clippy::too_many_arguments)]
fn correction_pass(
    ctx: &GpuContext,
    network: &Sequential,
    model: &ModelSpec,
    data: &Dataset,
    options: &Options,
    layout: &ParamLayout,
    bases: &[LayerBasis],
    chunks: Chunking,
) -> Result<Vec<Vec<f32>>> {
    let shapes = model.shapes()?;
    let corrected = layout
        .blocks
        .iter()
        .map(|b| ctx.zeros(&[b.d_out, b.d_in]))
        .collect::<Result<Vec<_>>>()?;
    for start in (0..data.len).step_by(chunks.examples) {
        let len = chunks.examples.min(data.len - start);
        let pass = run_batch(ctx, network, data, options, start, len)?;
        let kappa = pass.kappa as f32;
        let views: Vec<LayerView> = layout
            .layers
            .iter()
            .map(|layer| LayerView::new(ctx, model, &shapes, layout, layer, len))
            .collect();
        // Rotated expand-format inputs x̃ = ã Q_A, [B·S, D], and for layers without
        // weight sharing their squares.
        let mut rec = ctx.recorder();
        let mut keep = Vec::new();
        let mut rotated_inputs = Vec::with_capacity(layout.layers.len());
        for ((layer, basis), view) in layout.layers.iter().zip(bases).zip(&views) {
            rotated_inputs.push(match &basis.input {
                Some((_, q_a)) => {
                    let d = q_a.shape()[0];
                    let rows = len * layer.positions;
                    let x = view.expand_inputs(&mut rec, pass.forward.layer_input(layer.layer))?;
                    let rotated = ctx.zeros(&[rows, d])?;
                    gemm(
                        &mut rec,
                        &Gemm::new(rows, d, d, false, false),
                        &x,
                        q_a,
                        &rotated,
                    )?;
                    keep.push(x);
                    if layer.positions == 1 {
                        let squared = ctx.zeros(&[rows, d])?;
                        square(&mut rec, 1.0, &rotated, 0.0, &squared)?;
                        keep.push(Held::Owned(rotated));
                        Some(squared)
                    } else {
                        Some(rotated)
                    }
                }
                None => None,
            });
        }
        rec.submit()?;
        pass.for_each_chunk(ctx, network, chunks.vectors, |backward, nv| {
            let mut rec = ctx.recorder();
            let mut keep = Vec::new();
            for (((layer, basis), view), x) in layout
                .layers
                .iter()
                .zip(bases)
                .zip(&views)
                .zip(&rotated_inputs)
            {
                let q_g = basis.gradient.1.as_ref().expect("EKFAC has G");
                let d_out = layer.d_out;
                let grads = backward.output_grad(layer.layer);
                for &b in &layer.blocks {
                    let block = &layout.blocks[b];
                    match (block.kind, x) {
                        (BlockKind::Weight | BlockKind::Joint, Some(x)) if layer.positions > 1 => {
                            // Fused: Λ += κ Σ_{v,n} (Σ_s g̃_{v,n,s} x̃_{n,s}ᵀ)^∘2.
                            let g = view.expand_grads(&mut rec, grads)?;
                            let rows = g.len() / d_out;
                            let rotated = ctx.zeros(&[rows, d_out])?;
                            gemm(
                                &mut rec,
                                &Gemm::new(rows, d_out, d_out, false, false),
                                &g,
                                q_g,
                                &rotated,
                            )?;
                            correct_shared(
                                &mut rec,
                                &rotated,
                                x,
                                &corrected[b],
                                nv,
                                layer.positions,
                                kappa,
                            )?;
                            keep.push(g);
                            keep.push(Held::Owned(rotated));
                        }
                        (BlockKind::Weight | BlockKind::Joint, Some(squared)) => {
                            // No sharing: Λ += κ hᵀ (x̃)^∘2 with h = Σ_v (g_v Q_G)^∘2.
                            let h = rotated_square_sum(
                                ctx, &mut rec, &mut keep, grads, q_g, nv, len, d_out,
                            )?;
                            gemm(
                                &mut rec,
                                &Gemm::new(d_out, block.d_in, len, true, false).scaled(kappa, 1.0),
                                &h,
                                squared,
                                &corrected[b],
                            )?;
                            keep.push(Held::Owned(h));
                        }
                        (BlockKind::Bias, _) => {
                            // λ += κ 1ᵀ Σ_v (Q_Gᵀ Σ_s g_{v,s})^∘2.
                            let summed = view.summed_grads(&mut rec, grads)?;
                            let h = rotated_square_sum(
                                ctx, &mut rec, &mut keep, &summed, q_g, nv, len, d_out,
                            )?;
                            let sum = Sum {
                                alpha: kappa,
                                beta: 1.0,
                                ..Sum::new(len, d_out)
                            };
                            sum_rows(ctx, &mut rec, &h, &corrected[b], &sum)?;
                            keep.push(summed);
                            keep.push(Held::Owned(h));
                        }
                        (_, None) => unreachable!("weight blocks have an input factor"),
                    }
                }
            }
            rec.submit()?;
            ctx.wait("correcting eigenvalues")
        })?;
        drop(keep);
        drop(rotated_inputs);
    }
    corrected.iter().map(|t| ctx.read(t)).collect()
}

/// `h = Σ_v (g_v Q_G)^∘2`, `[B, d_out]`, for `g` `[V·B, d_out]`.
#[allow(clippy::too_many_arguments)]
fn rotated_square_sum<'t>(
    ctx: &GpuContext,
    rec: &mut Recorder,
    keep: &mut Vec<Held<'t>>,
    g: &GpuTensor,
    q_g: &GpuTensor,
    stack: usize,
    batch: usize,
    d_out: usize,
) -> Result<GpuTensor> {
    let projected = ctx.zeros(&[stack * batch, d_out])?;
    gemm(
        rec,
        &Gemm::new(stack * batch, d_out, d_out, false, false),
        g,
        q_g,
        &projected,
    )?;
    let h = ctx.zeros(&[batch, d_out])?;
    square_sum_stack(rec, &projected, &h)?;
    keep.push(Held::Owned(projected));
    Ok(h)
}
