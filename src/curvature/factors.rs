//! The factor pass (SPEC §2–§3): per batch `b`,
//! - `A += ÃᵀÃ / (N·S)` with `Ã` the expand-format layer inputs `[B·S, D]` (a ones
//!   column for a joint block), or for reduce `A += ĀᵀĀ / N` with the position means
//!   `[B, D]`;
//! - `G += κ_b · gᵀg` with `g` the output gradients of the `V` backpropagated vectors
//!   as rows, `[V·B·S, d_out]` for expand or position sums `[V·B, d_out]` for reduce.

use crate::curvature::batches::{BatchPass, BatchStage, Chunking, LayerRows, for_each_batch};
use crate::curvature::layout::ParamLayout;
use crate::curvature::options::{FisherType, KfacApprox, Options};
use crate::data::DataSource;
use crate::distributed::Partition;
use crate::error::Result;
use crate::gpu::{GpuContext, GpuTensor, Recorder};
use crate::graph::{Backward, Network};
use crate::layers::Pass;
use crate::ops::gemm::{Gemm, gemm};
use crate::progress::{Progress, Stage};

/// The factor accumulators of one curvature layer.
pub(super) struct LayerAccumulators {
    /// `A`, `[D, D]`, when a block of the layer needs it.
    pub input: Option<GpuTensor>,
    /// `G`, `[d_out, d_out]`, unless forward-only.
    pub gradient: Option<GpuTensor>,
}

/// Accumulates every layer's Kronecker factors over this rank's batches of `data`.
#[allow(clippy::too_many_arguments)] // the pass's context, its data and its share
pub(super) fn factor_pass(
    ctx: &GpuContext,
    network: &Network,
    data: &dyn DataSource,
    options: &Options,
    layout: &ParamLayout,
    chunks: Chunking,
    partition: Partition,
    progress: &dyn Progress,
) -> Result<Vec<LayerAccumulators>> {
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
    let mut stage = Factors {
        progress,
        accumulators,
        approx: options.approx,
        num_data: data.len() as f64,
    };
    for_each_batch(
        ctx, network, data, options, layout, chunks, partition, &mut stage,
    )?;
    Ok(stage.accumulators)
}

struct Factors<'a> {
    progress: &'a dyn Progress,
    accumulators: Vec<LayerAccumulators>,
    approx: KfacApprox,
    num_data: f64,
}

impl BatchStage for Factors<'_> {
    type Inputs = ();
    const STAGE: Stage = Stage::Factors;
    const WORK: &'static str = "accumulating Kronecker factors";

    fn progress(&self) -> &dyn Progress {
        self.progress
    }

    fn inputs(&mut self, pass: &mut Pass, layers: &[LayerRows], batch: &BatchPass) -> Result<()> {
        for (rows, acc) in layers.iter().zip(&self.accumulators) {
            if let Some(a) = &acc.input {
                let d = a.shape()[0];
                let x = rows.factor_inputs(pass, &batch.forward, self.approx)?;
                let scale = match self.approx {
                    KfacApprox::Expand => 1.0 / (self.num_data * rows.blocks.positions as f64),
                    KfacApprox::Reduce => 1.0 / self.num_data,
                };
                accumulate_gram(&mut pass.rec, &x, d, scale, a)?;
                pass.keep(x);
            }
        }
        Ok(())
    }

    fn gradients(
        &mut self,
        pass: &mut Pass,
        layers: &[LayerRows],
        _: &(),
        backward: &Backward,
        _: usize,
        batch: &BatchPass,
    ) -> Result<()> {
        for (rows, acc) in layers.iter().zip(&self.accumulators) {
            if let Some(g) = &acc.gradient {
                let grads = rows.factor_grads(pass, backward, self.approx)?;
                accumulate_gram(&mut pass.rec, &grads, rows.blocks.d_out, batch.kappa, g)?;
                pass.keep(grads);
            }
        }
        Ok(())
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
