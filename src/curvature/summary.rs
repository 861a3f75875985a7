//! Scalars of a fitted state per layer and in total, and the JSON summary of `ekfac fit`.

use serde::{Deserialize, Serialize};

use crate::curvature::fit::Timings;
use crate::curvature::layout::BlockKind;
use crate::curvature::scalars::{Scalars, ekfac_block, kfac_block, total};
use crate::curvature::state::CurvatureState;
use crate::gpu::AdapterSummary;

/// [`Scalars`] as written to JSON: non-finite numbers become `null`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ScalarsJson {
    pub trace: Option<f64>,
    pub det: Option<f64>,
    pub logdet: Option<f64>,
    pub logdet_damped: Option<f64>,
    pub frobenius_norm: Option<f64>,
    pub zero_eigenvalues: usize,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl From<Scalars> for ScalarsJson {
    fn from(s: Scalars) -> Self {
        Self {
            trace: finite(s.trace),
            det: finite(s.det),
            logdet: finite(s.logdet),
            logdet_damped: finite(s.logdet_damped),
            frobenius_norm: finite(s.frobenius_norm),
            zero_eigenvalues: s.zero_eigenvalues,
        }
    }
}

/// KFAC and EKFAC scalars of one curvature layer (all its blocks).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerSummary {
    pub name: String,
    pub kfac: ScalarsJson,
    pub ekfac: Option<ScalarsJson>,
}

/// The JSON summary written by `ekfac fit --summary`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub num_data: usize,
    pub num_params: usize,
    pub params: Vec<String>,
    pub kfac: ScalarsJson,
    pub ekfac: Option<ScalarsJson>,
    pub layers: Vec<LayerSummary>,
    pub damping: f64,
    pub adapter: AdapterSummary,
    pub timings_ms: Timings,
    pub peak_gpu_bytes: u64,
    /// The eigensolver that decomposed the factors ([`EigenSolver::name`]), where the
    /// caller says.
    ///
    /// [`EigenSolver::name`]: crate::curvature::eigen::EigenSolver::name
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eigensolver: Option<String>,
    /// `K`, the number of ranks that ran the fit (1 unless distributed).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Each rank's batches and examples, where the caller says (their examples add up
    /// to `num_data`).
    #[serde(default)]
    pub ranks: Vec<crate::distributed::RankShare>,
}

fn one() -> usize {
    1
}

/// KFAC and EKFAC scalars of every block of `state`, in layout order, with the damped
/// logdet at `damping`.
pub fn block_scalars(state: &CurvatureState, damping: f64) -> Vec<(Scalars, Option<Scalars>)> {
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let mut out = vec![None; state.layout.blocks.len()];
    for (layer, factors) in state.layout.layers.iter().zip(&state.layers) {
        let g = f64s(&factors.gradient.values);
        let a = factors.input.as_ref().map(|a| f64s(&a.values));
        for &b in &layer.blocks {
            let block = &state.layout.blocks[b];
            let kfac = match block.kind {
                BlockKind::Bias => kfac_block(&g, None, damping),
                _ => kfac_block(&g, a.as_deref(), damping),
            };
            let ekfac = state
                .corrected
                .as_ref()
                .map(|c| ekfac_block(&f64s(&c[b]), damping));
            out[b] = Some((kfac, ekfac));
        }
    }
    out.into_iter()
        .map(|s| s.expect("every block belongs to a layer"))
        .collect()
}

/// Total KFAC and EKFAC scalars of `state`.
pub fn total_scalars(state: &CurvatureState, damping: f64) -> (Scalars, Option<Scalars>) {
    let blocks = block_scalars(state, damping);
    let kfac: Vec<Scalars> = blocks.iter().map(|b| b.0).collect();
    let ekfac: Option<Vec<Scalars>> = blocks.iter().map(|b| b.1).collect();
    (total(&kfac), ekfac.map(|e| total(&e)))
}

impl Summary {
    /// The summary of a fitted `state`.
    pub fn new(
        state: &CurvatureState,
        damping: f64,
        timings: Timings,
        peak_gpu_bytes: u64,
    ) -> Self {
        let blocks = block_scalars(state, damping);
        let kfac_of = |idx: &[usize]| total(&idx.iter().map(|&b| blocks[b].0).collect::<Vec<_>>());
        let ekfac_of = |idx: &[usize]| {
            idx.iter()
                .map(|&b| blocks[b].1)
                .collect::<Option<Vec<_>>>()
                .map(|s| total(&s).into())
        };
        let layers = state
            .layout
            .layers
            .iter()
            .map(|l| LayerSummary {
                name: l.name.clone(),
                kfac: kfac_of(&l.blocks).into(),
                ekfac: ekfac_of(&l.blocks),
            })
            .collect();
        let all: Vec<usize> = (0..blocks.len()).collect();
        Self {
            num_data: state.meta.num_data,
            num_params: state.layout.num_params,
            params: state.layout.param_names(),
            kfac: kfac_of(&all).into(),
            ekfac: ekfac_of(&all),
            layers,
            damping,
            adapter: state.meta.adapter.clone(),
            timings_ms: timings,
            peak_gpu_bytes,
            eigensolver: None,
            world_size: 1,
            ranks: Vec::new(),
        }
    }

    /// A readable multi-line rendering.
    pub fn render(&self) -> String {
        let num = |x: Option<f64>| x.map_or("-inf/undefined".to_string(), |v| format!("{v:.6e}"));
        let row = |name: &str, s: &ScalarsJson| {
            format!(
                "  {name:<10} trace {:>14}  ‖·‖_F {:>14}  logdet {:>14}  logdet(+δI) {:>14}  zero eigenvalues {}\n",
                num(s.trace),
                num(s.frobenius_norm),
                num(s.logdet),
                num(s.logdet_damped),
                s.zero_eigenvalues
            )
        };
        let mut out = format!(
            "ekfac on {} ({}, {})\n{} examples, {} parameters: {}\ndamping δ = {}\n",
            self.adapter.name,
            self.adapter.backend,
            self.adapter.device_type,
            self.num_data,
            self.num_params,
            crate::io::cut_names(&self.params),
            self.damping
        );
        if let Some(solver) = &self.eigensolver {
            out += &format!("eigensolver: {solver}\n");
        }
        if self.world_size > 1 {
            let shares: Vec<String> = self
                .ranks
                .iter()
                .map(|r| format!("{} ({} batches)", r.examples, r.batches))
                .collect();
            out += &format!(
                "ranks: {}, examples per rank {}\n",
                self.world_size,
                shares.join(", ")
            );
        }
        out += &row("KFAC", &self.kfac);
        if let Some(e) = &self.ekfac {
            out += &row("EKFAC", e);
        }
        for layer in &self.layers {
            out += &format!("layer {}:\n", layer.name);
            out += &row("KFAC", &layer.kfac);
            if let Some(e) = &layer.ekfac {
                out += &row("EKFAC", e);
            }
        }
        let t = &self.timings_ms;
        out += &format!(
            "time (ms): load {:.1}, factors {:.1}, eigendecomposition {:.1}, correction {:.1}, \
             scalars {:.1}, save {:.1}; peak GPU memory {:.2} MiB\n",
            t.load,
            t.factors,
            t.eigendecomposition,
            t.correction,
            t.scalars,
            t.save,
            self.peak_gpu_bytes as f64 / (1024.0 * 1024.0)
        );
        out
    }
}
