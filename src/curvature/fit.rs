//! The GPU pipeline, stage by stage: one pass over the data for the Kronecker factors
//! ([`super::factors`]), their eigendecomposition (an [`EigenSolver`]), a second pass for
//! EKFAC's corrected eigenvalues ([`super::correction`]); both passes run the batch loop
//! of [`super::batches`].

use std::collections::BTreeMap;
use std::time::Instant;

use crate::curvature::batches::chunking;
use crate::curvature::correction::{LayerBasis, correction_pass};
use crate::curvature::eigen::{EigenSolver, Factor, JacobiSolver};
use crate::curvature::factors::{LayerAccumulators, factor_pass};
use crate::curvature::layout::ParamLayout;
use crate::curvature::options::{FisherType, Options};
use crate::curvature::state::{
    CurvatureState, FORMAT_NAME, FORMAT_VERSION, FactorEigen, LayerFactors, ParamEntry, StateMeta,
};
use crate::data::DataSource;
use crate::distributed::{Communicator, Partition, RankShare, Single, agree, sum_f32};
use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuTensor};
use crate::graph::{Model, Network};
use crate::progress::{Event, Progress, Silent, Stage};

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
    /// Each rank's share of the batches (one entry for a single-process fit).
    pub ranks: Vec<RankShare>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Fits KFAC and (unless forward-only) EKFAC of `model` on `data` with `options`.
/// `damping` is recorded in the state as the default for inverse products.
pub fn fit(
    ctx: &GpuContext,
    model: &Model,
    data: &dyn DataSource,
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
    data: &dyn DataSource,
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
    data: &dyn DataSource,
    options: &Options,
    damping: Option<f64>,
    previous: Option<&CurvatureState>,
    solver: &dyn EigenSolver,
) -> Result<Fitted> {
    let run = FitRun {
        damping,
        previous,
        solver,
        progress: &Silent,
    };
    fit_run(ctx, model, data, options, &run)
}

/// How a fit runs, besides the [`Options`] that determine what it computes.
pub struct FitRun<'a> {
    /// Recorded in the state as the default damping of inverse products.
    pub damping: Option<f64>,
    /// A state to warm-start the eigendecompositions from (see [`fit_from`]).
    pub previous: Option<&'a CurvatureState>,
    /// The eigensolver of the factors (e.g. [`JacobiSolver`]).
    pub solver: &'a dyn EigenSolver,
    /// Receives the progress of each stage: [`Stage::Factors`] (batches),
    /// [`Stage::Eigendecomposition`] (factors), [`Stage::Correction`] (batches; not for
    /// forward-only), each `Started`, `Advanced` per unit, `Finished`.
    pub progress: &'a dyn Progress,
}

/// The fit of [`fit_with`] with everything that shapes the run in `run`, progress
/// included.
pub fn fit_run(
    ctx: &GpuContext,
    model: &Model,
    data: &dyn DataSource,
    options: &Options,
    run: &FitRun,
) -> Result<Fitted> {
    fit_distributed(ctx, model, data, options, run, &Single)
}

/// [`fit_run`] as one rank of a distributed fit (see [`crate::distributed`]): this
/// rank runs its share of the batches, and the factors and corrected eigenvalues are
/// summed over the ranks of `comm`; the eigendecomposition runs on rank 0 and its
/// bases are broadcast. Every rank returns the same state, or the same error when any
/// rank failed. With [`Single`] this is exactly [`fit_run`].
pub fn fit_distributed(
    ctx: &GpuContext,
    model: &Model,
    data: &dyn DataSource,
    options: &Options,
    run: &FitRun,
    comm: &dyn Communicator,
) -> Result<Fitted> {
    let FitRun {
        damping,
        previous,
        solver,
        progress,
    } = *run;
    let prepared = (|| {
        options.validate()?;
        let layout = ParamLayout::from_options(model, options)?;
        crate::data::check(data, &model.graph, options.loss, options.fisher)?;
        ctx.memory().reset_peak();
        let network = Network::new(ctx, model)?;
        let chunks = chunking(
            ctx,
            &network,
            options,
            &layout,
            options.num_vectors(network.num_outputs()),
        )?;
        Ok((layout, network, chunks))
    })();
    let (layout, network, mut chunks) = agree(comm, prepared)?;
    // Every rank splits the data into the same batches (the smallest any adapter's
    // memory budget allows).
    chunks.examples = comm.min(chunks.examples as u64)? as usize;
    let partition = Partition::of(comm);
    let mut timings = Timings::default();
    let gpu_before = ctx.gpu_times_ms()?;

    let start = Instant::now();
    let phase = ctx.gpu_phase(FACTORS_PHASE);
    let accumulators = agree(
        comm,
        factor_pass(
            ctx, &network, data, options, &layout, chunks, partition, progress,
        )
        .and_then(|acc| sum_factors(ctx, comm, acc)),
    )?;
    agree(
        comm,
        crate::curvature::validate::check_factors_finite(
            ctx,
            layout
                .layers
                .iter()
                .zip(&accumulators)
                .map(|(l, a)| (l.name.as_str(), a.input.as_ref(), a.gradient.as_ref())),
        ),
    )?;
    timings.factors = ms(start);
    drop(phase);

    let start = Instant::now();
    let phase = ctx.gpu_phase(EIGENDECOMPOSITION_PHASE);
    let bases = if comm.rank() == 0 {
        agree(
            comm,
            eigenbases(ctx, solver, &layout, &accumulators, previous, progress),
        )?
    } else {
        agree(comm, Ok(Vec::new()))?
    };
    let bases = broadcast_bases(ctx, comm, &layout, &accumulators, bases)?;
    drop(accumulators);
    timings.eigendecomposition = ms(start);
    drop(phase);

    let start = Instant::now();
    let phase = ctx.gpu_phase(CORRECTION_PHASE);
    let corrected = if options.fisher == FisherType::ForwardOnly {
        None
    } else {
        let corrected = correction_pass(
            ctx, &network, data, options, &layout, &bases, chunks, partition, progress,
        )
        .and_then(|mut blocks| {
            for block in &mut blocks {
                sum_f32(comm, block)?;
            }
            Ok(blocks)
        });
        Some(agree(comm, corrected)?)
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
        num_data: data.len(),
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
        model: serde_json::from_str(&model.graph.to_json())
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
    agree(comm, state.validate("fit"))?;
    Ok(Fitted {
        state,
        timings,
        gpu_timings_ms,
        peak_gpu_bytes: ctx.memory().peak_bytes(),
        ranks: partition.shares(data.len(), chunks.examples),
    })
}

/// Sums every factor over the ranks (f64 in rank order, rounded once to f32). With one
/// rank the factors are left as they are.
fn sum_factors(
    ctx: &GpuContext,
    comm: &dyn Communicator,
    accumulators: Vec<LayerAccumulators>,
) -> Result<Vec<LayerAccumulators>> {
    if comm.size() == 1 {
        return Ok(accumulators);
    }
    for acc in &accumulators {
        for factor in [&acc.input, &acc.gradient].into_iter().flatten() {
            let mut values = ctx.read(factor)?;
            sum_f32(comm, &mut values)?;
            ctx.write(factor, &values)?;
        }
    }
    Ok(accumulators)
}

/// Rank 0's eigenbases on every rank: the other ranks receive the eigenvalues and
/// eigenvectors of each factor (the sizes of `accumulators`) and upload the vectors.
/// With one rank `bases` is returned as it is.
fn broadcast_bases(
    ctx: &GpuContext,
    comm: &dyn Communicator,
    layout: &ParamLayout,
    accumulators: &[LayerAccumulators],
    bases: Vec<LayerBasis>,
) -> Result<Vec<LayerBasis>> {
    if comm.size() == 1 {
        return Ok(bases);
    }
    let received = |n: usize| -> Result<(FactorEigen, GpuTensor)> {
        let mut eigen = FactorEigen {
            values: vec![0.0; n],
            vectors: vec![0.0; n * n],
        };
        comm.broadcast(&mut eigen.values)?;
        comm.broadcast(&mut eigen.vectors)?;
        let tensor = ctx.upload(&eigen.vectors, &[n, n])?;
        Ok((eigen, tensor))
    };
    if comm.rank() == 0 {
        for basis in &bases {
            let sent = basis
                .input
                .iter()
                .map(|(e, _)| e)
                .chain(basis.gradient.1.as_ref().map(|_| &basis.gradient.0));
            for eigen in sent {
                let mut values = eigen.values.clone();
                let mut vectors = eigen.vectors.clone();
                comm.broadcast(&mut values)?;
                comm.broadcast(&mut vectors)?;
            }
        }
        return Ok(bases);
    }
    let mut out = Vec::with_capacity(layout.layers.len());
    for (layer, acc) in layout.layers.iter().zip(accumulators) {
        let input = acc
            .input
            .as_ref()
            .map(|a| received(a.shape()[0]))
            .transpose()?;
        let gradient = match &acc.gradient {
            Some(g) => {
                let (e, t) = received(g.shape()[0])?;
                (e, Some(t))
            }
            None => (FactorEigen::identity(layer.d_out), None),
        };
        out.push(LayerBasis { input, gradient });
    }
    Ok(out)
}

/// The eigenbases of every layer's factors by `solver`, each warm-started from the
/// same layer of `previous` where it exists there with the same size.
fn eigenbases(
    ctx: &GpuContext,
    solver: &dyn EigenSolver,
    layout: &ParamLayout,
    accumulators: &[LayerAccumulators],
    previous: Option<&CurvatureState>,
    progress: &dyn Progress,
) -> Result<Vec<LayerBasis>> {
    // Every factor with its warm start, layer by layer: A (if any), then G (if any).
    let mut factors = Vec::new();
    for (layer, acc) in layout.layers.iter().zip(accumulators) {
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
    progress.report(&Event::Started {
        stage: Stage::Eigendecomposition,
        total: factors.len(),
    });
    let mut decomposed = solver.eigendecompose(ctx, &factors, progress)?.into_iter();
    progress.report(&Event::Finished {
        stage: Stage::Eigendecomposition,
    });
    let mut next = || {
        decomposed
            .next()
            .ok_or_else(|| Error::gpu("the eigendecomposition", "a factor has no result"))
    };
    let mut bases = Vec::with_capacity(layout.layers.len());
    for (layer, acc) in layout.layers.iter().zip(accumulators) {
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
    Ok(bases)
}
