//! The GPU pipeline, stage by stage: one pass over the data for the Kronecker factors
//! ([`super::factors`]), their eigendecomposition (an [`EigenSolver`]), a second pass for
//! EKFAC's corrected eigenvalues ([`super::correction`]); both passes run the batch loop
//! of [`super::batches`].

use std::collections::BTreeMap;
use std::time::Instant;

use crate::curvature::batches::{Batches, chunking};
use crate::curvature::correction::{LayerBasis, correction_pass};
use crate::curvature::eigen::{EigenSolver, Factor, JacobiSolver};
use crate::curvature::factors::{LayerAccumulators, LayerSums, factor_pass};
use crate::curvature::layout::ParamLayout;
use crate::curvature::options::{FisherType, Options};
use crate::curvature::state::{
    CurvatureState, FORMAT_NAME, FORMAT_VERSION, FactorEigen, LayerFactors, ParamEntry, StateMeta,
};
use crate::data::DataSource;
use crate::distributed::{Communicator, Partition, RankShare, Single, agree, check_same};
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
/// rank checks and runs its share of the batches, and the factors and corrected
/// eigenvalues are summed over the ranks of `comm`; the eigendecompositions are spread
/// over the ranks ([`eigenbases`]) and broadcast. Every rank returns the same state, or
/// the same error when any rank failed. With [`Single`] this is exactly [`fit_run`],
/// and any number of ranks on the same kind of adapter gives the same state bits.
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
        crate::data::check_layout(data, &model.graph, options.loss)?;
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
    // The ranks must fit the same problem.
    check_same(comm, "the number of examples N", data.len() as u64)?;
    let fingerprint = u64::from_str_radix(&model.fingerprint(), 16).unwrap_or(0);
    check_same(comm, "the model and weights' fingerprint", fingerprint)?;
    let options_json = serde_json::to_string(options).unwrap_or_default();
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&options_json, &mut hasher);
    check_same(
        comm,
        "the options' hash",
        std::hash::Hasher::finish(&hasher),
    )?;
    // Every rank splits the data into the same batches (the smallest any adapter's
    // memory budget allows).
    chunks.examples = comm.min(chunks.examples as u64)? as usize;
    let partition = Partition::of(comm);
    // Each rank checks the values of the batches it reads.
    agree(
        comm,
        crate::data::check(
            data,
            &model.graph,
            options.loss,
            options.fisher,
            partition
                .batches(data.len(), chunks.examples)
                .map(|span| (span.start, span.len)),
        ),
    )?;
    let batches = Batches {
        ctx,
        network: &network,
        data,
        options,
        layout: &layout,
        chunks,
        partition,
    };
    let mut timings = Timings::default();
    let gpu_before = ctx.gpu_times_ms()?;

    let start = Instant::now();
    let phase = ctx.gpu_phase(FACTORS_PHASE);
    let sums = agree(comm, factor_pass(&batches, progress))?;
    let accumulators = agree(comm, sum_factors(ctx, comm, sums))?;
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
    let bases = eigenbases(
        ctx,
        comm,
        solver,
        &layout,
        &accumulators,
        previous,
        progress,
    )?;
    drop(accumulators);
    timings.eigendecomposition = ms(start);
    drop(phase);

    let start = Instant::now();
    let phase = ctx.gpu_phase(CORRECTION_PHASE);
    let corrected = if options.fisher == FisherType::ForwardOnly {
        None
    } else {
        let mut sums = agree(comm, correction_pass(&batches, &bases, progress))?;
        Some(
            sums.iter_mut()
                .map(|block| block.total(comm))
                .collect::<Result<Vec<_>>>()?,
        )
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

/// Every factor summed over the batches of every rank and rounded once to f32
/// ([`crate::distributed::CompensatedSum::total`], collective), uploaded for the
/// eigendecomposition.
fn sum_factors(
    ctx: &GpuContext,
    comm: &dyn Communicator,
    mut sums: Vec<LayerSums>,
) -> Result<Vec<LayerAccumulators>> {
    // Every collective first, so that an upload failing on one rank cannot leave the
    // others waiting in one.
    let mut totals = Vec::new();
    for layer in &mut sums {
        for sum in [&mut layer.input, &mut layer.gradient]
            .into_iter()
            .flatten()
        {
            totals.push((sum.total(comm)?, sum.shape().to_vec()));
        }
    }
    let layers: Vec<(bool, bool)> = sums
        .iter()
        .map(|l| (l.input.is_some(), l.gradient.is_some()))
        .collect();
    drop(sums);
    let mut totals = totals.into_iter();
    let mut upload = |present: bool| -> Result<Option<GpuTensor>> {
        if !present {
            return Ok(None);
        }
        let (values, shape) = totals
            .next()
            .expect("one total per factor, in the same order");
        ctx.upload(&values, &shape).map(Some)
    };
    layers
        .iter()
        .map(|&(input, gradient)| {
            Ok(LayerAccumulators {
                input: upload(input)?,
                gradient: upload(gradient)?,
            })
        })
        .collect()
}

/// Which rank eigendecomposes each of `factors` among `size` ranks. A solver may stack
/// factors of the same size and warm-start status and let their results depend on each
/// other ([`JacobiSolver`] sweeps a stack until all of it has converged), so such a
/// group stays whole on one rank and, passed to the solver in its original order, gives
/// the bits one process computes. Groups go, the most work (`Σ n³`) first, to the rank
/// with the least work so far (the lowest such rank on ties).
fn owners(factors: &[Factor], size: usize) -> Vec<usize> {
    let key = |f: &Factor| (f.dim(), f.warm_start.is_some_and(|w| w.dim() == f.dim()));
    let mut groups: Vec<((usize, bool), f64, Vec<usize>)> = Vec::new();
    for (i, factor) in factors.iter().enumerate() {
        let cost = (factor.dim() as f64).powi(3);
        match groups.iter_mut().find(|(k, _, _)| *k == key(factor)) {
            Some((_, work, members)) => {
                *work += cost;
                members.push(i);
            }
            None => groups.push((key(factor), cost, vec![i])),
        }
    }
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut load = vec![0.0f64; size];
    let mut owner = vec![0; factors.len()];
    for (_, work, members) in groups {
        let rank = (0..size)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .unwrap_or(0);
        load[rank] += work;
        for i in members {
            owner[i] = rank;
        }
    }
    owner
}

/// The eigenbases of every layer's factors by `solver`, each warm-started from the
/// same layer of `previous` where it exists there with the same size. Each rank
/// decomposes the factors [`owners`] gives it (with one rank: all of them, in one call
/// to the solver); each basis is then broadcast from its rank, so every rank returns
/// every basis. Progress reports this rank's factors.
fn eigenbases(
    ctx: &GpuContext,
    comm: &dyn Communicator,
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
    let owner = owners(&factors, comm.size());
    let mine: Vec<Factor> = factors
        .iter()
        .zip(&owner)
        .filter(|&(_, &o)| o == comm.rank())
        .map(|(f, _)| *f)
        .collect();
    progress.report(&Event::Started {
        stage: Stage::Eigendecomposition,
        total: mine.len(),
    });
    let decomposed = solver.eigendecompose(ctx, &mine, progress).and_then(|d| {
        if d.len() == mine.len() {
            Ok(d)
        } else {
            Err(Error::gpu(
                "the eigendecomposition",
                format!("{} factors gave {} results", mine.len(), d.len()),
            ))
        }
    });
    let mut decomposed = agree(comm, decomposed)?.into_iter();
    progress.report(&Event::Finished {
        stage: Stage::Eigendecomposition,
    });
    // Every basis from its rank, in factor order (the collectives first, then the
    // uploads, so that a failed upload cannot leave another rank in a broadcast).
    let mut all = Vec::with_capacity(factors.len());
    for (factor, &o) in factors.iter().zip(&owner) {
        let n = factor.dim();
        let (mut eigen, tensor) = if o == comm.rank() {
            let (e, t) = decomposed.next().expect("checked: one result per factor");
            (e, Some(t))
        } else {
            let zeros = FactorEigen {
                values: vec![0.0; n],
                vectors: vec![0.0; n * n],
            };
            (zeros, None)
        };
        if comm.size() > 1 {
            comm.broadcast(o, &mut eigen.values)?;
            comm.broadcast(o, &mut eigen.vectors)?;
        }
        all.push((eigen, tensor));
    }
    let uploaded = all
        .into_iter()
        .map(|(eigen, tensor)| {
            let tensor = match tensor {
                Some(t) => t,
                None => ctx.upload(&eigen.vectors, &[eigen.dim(), eigen.dim()])?,
            };
            Ok((eigen, tensor))
        })
        .collect::<Result<Vec<_>>>();
    let mut next = agree(comm, uploaded)?.into_iter();
    let mut bases = Vec::with_capacity(layout.layers.len());
    for (layer, acc) in layout.layers.iter().zip(accumulators) {
        let input = acc
            .input
            .as_ref()
            .map(|_| next.next().expect("one per factor"));
        let gradient = match &acc.gradient {
            Some(_) => {
                let (e, t) = next.next().expect("one per factor");
                (e, Some(t))
            }
            None => (FactorEigen::identity(layer.d_out), None),
        };
        bases.push(LayerBasis { input, gradient });
    }
    Ok(bases)
}
